"""The README's way in: `mediagate up --detach`, a key from the CLI, the README snippet, `down`.

Marked `own_ray_cluster`: it starts its own Ray head with `ray start` and `down`
runs `ray stop`, so it runs before the session's shared cluster exists.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import free_port, mediagate_up

ROOT = Path(__file__).resolve().parents[2]
MEDIAGATE = str(Path(sys.executable).with_name("mediagate"))


def readme_python_snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- quickstart-python -->\n```python\n(.*?)```", readme, re.S)
    assert match, "README lost its quick-start snippet"
    return match.group(1)


def foreground_up(env: dict[str, str], *options: str) -> tuple[subprocess.Popen[str], str]:
    """`mediagate up OPTIONS...` in the foreground, as a newcomer runs it in a terminal;
    returns the process and the base URL it printed once the service answered."""
    process = subprocess.Popen(
        [MEDIAGATE, "up", *options],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    printed = process.stdout.readline().strip()  # the URL, printed once it is ready
    if not printed:
        process.kill()
        pytest.fail(f"`mediagate up` ended without serving (exit {process.wait()})")
    return process, printed


@pytest.mark.own_ray_cluster
def test_up_serve_readme_snippet_down(tmp_path: Path) -> None:
    from mediagate.cli.service import ray_session_processes

    port, dashboard_port, ray_port = free_port(), free_port(), free_port()
    env = {**os.environ, "MEDIAGATE_HOME": str(tmp_path / "home")}
    up, printed = foreground_up(
        env,
        *("--port", str(port), "--dashboard-port", str(dashboard_port)),
        *("--ray-port", str(ray_port)),
    )
    run_file = tmp_path / "home" / "run.json"
    session_dir = json.loads(run_file.read_text())["ray_session_dir"] if run_file.exists() else ""
    try:
        assert printed == f"http://127.0.0.1:{port}/v1"
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        assert ray_session_processes(session_dir), "no Ray processes found for its session"

        created = subprocess.run(
            [MEDIAGATE, "keys", "create", "--tier", "pro", "--account", "readme"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        key = created.stdout.strip().splitlines()[-1]
        snippet = readme_python_snippet().replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        ran = subprocess.run(
            [sys.executable, "-c", snippet],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env={**env, "MEDIAGATE_API_KEY": key},
            timeout=120,
        )
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.strip() == "wrote 2 images and a 4 s video: completed"
        assert (tmp_path / "image-1.png").read_bytes().startswith(b"\x89PNG")
        import av

        with av.open(str(tmp_path / "video.mp4")) as container:
            assert sum(1 for _ in container.decode(video=0)) == 33
        assert (tmp_path / "thumbnail.webp").read_bytes()[8:12] == b"WEBP"

        # The deployed config is on disk for later `serve deploy` updates.
        assert f"port: {port}" in (tmp_path / "home" / "serve.yaml").read_text()
        again = subprocess.run(
            [MEDIAGATE, "up", "--detach"], env=env, capture_output=True, text=True
        )
        assert again.returncode == 1 and "already runs" in again.stderr
    finally:
        # `down` from another terminal: the foreground `up` notices and exits.
        down = subprocess.run(
            [MEDIAGATE, "down"], env=env, capture_output=True, text=True, timeout=300
        )
        try:
            exited: int | None = up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
            exited = None
    assert down.returncode == 0, down.stderr
    assert exited == 0, "the foreground `mediagate up` kept running after `mediagate down`"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    assert session_dir and not ray_session_processes(session_dir), "its Ray is still running"
    address_file = Path(session_dir).parent / "ray_current_cluster"  # a later ray.init() reads it
    assert not address_file.is_file() or not address_file.read_text().endswith(f":{ray_port}")


def haproxy_processes(ray_port: int) -> set[tuple[int, float]]:
    """(pid, start time) of the HAProxy processes under the Ray head on ``ray_port``
    (its raylet, whose GCS address ends in that port, is an ancestor): never the
    system's, nor another run's."""
    import psutil

    def is_our_raylet(process: psutil.Process) -> bool:
        return any(
            arg.startswith("--gcs-address=") and arg.endswith(f":{ray_port}")
            for arg in process.cmdline()
        )

    ours: set[tuple[int, float]] = set()
    for process in psutil.process_iter(["name", "create_time"]):
        if process.info["name"] != "haproxy":
            continue
        try:
            if any(is_our_raylet(parent) for parent in process.parents()):
                ours.add((process.pid, process.info["create_time"]))
        except psutil.Error:  # it, or a parent, ended meanwhile
            continue
    return ours


def still_running(processes: set[tuple[int, float]]) -> set[int]:
    """The pids of ``processes`` that still run (the same process: same start time)."""
    import psutil

    running = set()
    for pid, started in processes:
        try:
            process = psutil.Process(pid)
            if process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE:
                running.add(pid)
        except psutil.NoSuchProcess:
            continue
    return running


@pytest.mark.own_ray_cluster
def test_up_in_serve_throughput_mode_serves_through_haproxy(tmp_path: Path) -> None:
    port, dashboard_port, ray_port = free_port(), free_port(), free_port()
    env = {**os.environ, "MEDIAGATE_HOME": str(tmp_path / "home")}
    up = mediagate_up(
        env,
        "--serve-throughput-mode",
        *("--port", str(port), "--dashboard-port", str(dashboard_port)),
        *("--ray-port", str(ray_port)),
    )
    ours: set[tuple[int, float]] = set()  # every HAProxy seen under this test's Ray
    try:
        assert up.returncode == 0, up.stderr
        ours |= haproxy_processes(ray_port)
        assert ours, "no HAProxy runs under this Ray: the throughput mode did not start"
        key = (
            subprocess.run(
                [MEDIAGATE, "keys", "create", "--tier", "pro", "--account", "fast"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        image = client.images.generate(model="tiny-sd", prompt="a red square", size="64x64")
        assert image.data and image.data[0].b64_json
        # Errors keep the OpenAI envelope on this path too.
        bad = httpx.post(
            f"http://127.0.0.1:{port}/v1/images/generations",
            json={"model": "tiny-sd", "prompt": "x", "n": 0},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "n"
    finally:
        ours |= haproxy_processes(ray_port)  # a reload may have started new ones
        down = subprocess.run(
            [MEDIAGATE, "down"], env=env, capture_output=True, text=True, timeout=300
        )
    assert down.returncode == 0, down.stderr
    # By pid: once Ray is gone, an HAProxy left behind no longer has it as an ancestor.
    assert not still_running(ours), "`mediagate down` left HAProxy running"


def test_throughput_mode_is_refused_for_a_cluster_it_does_not_start(tmp_path: Path) -> None:
    env = {**os.environ, "MEDIAGATE_HOME": str(tmp_path / "home")}
    refused = mediagate_up(env, "--serve-throughput-mode", "--address", "http://127.0.0.1:1")
    assert refused.returncode != 0
    assert "RAY_SERVE_ENABLE_HA_PROXY=1" in refused.stderr
