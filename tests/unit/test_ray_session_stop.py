"""`mediagate down` stops the processes of the Ray session it started, and no others."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mediagate.cli.service import ray_session_processes, stop_ray_session

SLEEPER = "import subprocess, sys, time; {spawn}time.sleep(60)"


def start(session_dir: str, *, with_child: bool) -> subprocess.Popen[bytes]:
    """A stand-in daemon naming ``session_dir`` on its command line, optionally with a
    child that does not (as a raylet's workers do not)."""
    spawn = (
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        if with_child
        else ""
    )
    return subprocess.Popen(
        [sys.executable, "-c", SLEEPER.format(spawn=spawn), f"--session-dir={session_dir}"]
    )


def test_only_the_named_sessions_processes_and_their_children_are_stopped(
    tmp_path: Path,
) -> None:
    (tmp_path / "ray").mkdir()
    ours = str(tmp_path / "ray" / "session_2026-12-02_10-00-00_000001_1")
    theirs = str(tmp_path / "ray" / "session_2026-12-02_10-00-00_000002_2")
    daemon, other = start(ours, with_child=True), start(theirs, with_child=False)
    try:
        for _ in range(200):  # until the child has started
            found = ray_session_processes(ours)
            if len(found) == 2:
                break
            subprocess.run(["sleep", "0.05"], check=True)
        assert {process.pid for process in found} >= {daemon.pid}
        assert other.pid not in {process.pid for process in found}
        address_file = tmp_path / "ray" / "ray_current_cluster"
        address_file.write_text("10.0.0.5:6390")
        assert stop_ray_session(ours, 6390, grace_s=10) == 2
        assert not address_file.exists()  # no later ray.init() tries to join it
        assert daemon.wait(timeout=10) is not None
        assert ray_session_processes(ours) == []
        assert other.poll() is None  # another Ray's process keeps running
    finally:
        for process in (daemon, other):
            process.kill()
            process.wait()


def test_the_cluster_address_of_another_cluster_is_kept(tmp_path: Path) -> None:
    (tmp_path / "ray").mkdir()
    address_file = tmp_path / "ray" / "ray_current_cluster"
    address_file.write_text("10.0.0.5:7000")
    assert stop_ray_session(str(tmp_path / "ray" / "session_x"), 6390, grace_s=1) == 0
    assert address_file.read_text() == "10.0.0.5:7000"
