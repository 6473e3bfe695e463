"""The local Ray instance's lock-down, without starting Ray: the token, the HAProxy
wrapper that binds its stats and metrics listeners to loopback, the files under the
home, and the `ray start` command. (tests/integration/test_cli_up.py checks a real
`mediagate up` end to end: listening sockets, refused requests without the token.)"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from mediagate.cli import local_ray
from mediagate.cli.command import CommandError
from mediagate.cli.local_ray import (
    LOOPBACK,
    RAY_DEFAULT_PORTS,
    LocalRayPorts,
    auth_environment,
    ensure_ray_token,
    free_port,
    haproxy_link,
    local_ray_environment,
    ray_auth_token,
    ray_start_command,
)
from mediagate.settings import HomeLayout

PORTS = LocalRayPorts(
    gcs=6390,
    dashboard=8265,
    client_server=10011,
    dashboard_agent=52366,
    haproxy_stats=18404,
    haproxy_metrics=19101,
    metrics=18080,
)

# The listeners as Ray 2.60's template writes them (haproxy_templates.py).
GENERATED = """global
    stats socket /x/admin.sock mode 666 level admin expose-fd listeners
frontend prometheus
    bind :19101
    mode http
frontend http_frontend
    bind *:8000
listen stats
  bind *:18404
  stats enable
"""


@pytest.fixture
def no_ray_auth(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))


def test_a_fresh_home_gets_a_private_token_that_later_runs_keep(
    tmp_path: Path, no_ray_auth: None
) -> None:
    layout = HomeLayout(tmp_path / "home")
    environment = auth_environment(layout)
    token_file = Path(environment["RAY_AUTH_TOKEN_PATH"])
    assert environment["RAY_AUTH_MODE"] == "token"
    assert token_file.parent == layout.secrets
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text()
    assert len(bytes.fromhex(token)) == 32  # 256 random bits, as Ray makes them
    assert ensure_ray_token(layout).read_text() == token  # kept, not replaced
    assert ray_auth_token(layout) == token  # what the CLI sends
    other = HomeLayout(tmp_path / "other")
    assert ensure_ray_token(other).read_text() != token


def test_an_operators_token_wins(
    tmp_path: Path, no_ray_auth: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = HomeLayout(tmp_path / "home")
    ensure_ray_token(layout)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-the-operator")
    assert auth_environment(layout) == {"RAY_AUTH_MODE": "token"}  # Ray reads the variable
    assert ray_auth_token(layout) == "from-the-operator"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    given = tmp_path / "given-token"
    given.write_text("from-a-file\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(given))
    assert ray_auth_token(layout) == "from-a-file"


def test_an_empty_token_file_is_refused(tmp_path: Path, no_ray_auth: None) -> None:
    layout = HomeLayout(tmp_path / "home")
    layout.secrets.mkdir(parents=True)
    (layout.secrets / "ray_auth_token").write_text("")
    with pytest.raises(CommandError, match="empty"):
        ensure_ray_token(layout)


def test_the_haproxy_wrapper_binds_stats_and_metrics_to_loopback_only(
    tmp_path: Path, no_ray_auth: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = tmp_path / "fake-haproxy"
    recorder.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/ran-with"\n')
    recorder.chmod(0o700)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(recorder))
    layout = HomeLayout(tmp_path / "h")
    environment = local_ray_environment(layout, PORTS, "haproxy")
    link = haproxy_link(layout)  # pytest's folders are long: a temp-folder link is made
    if link is not None:
        link.unlink()
    assert environment["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert environment["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"
    assert environment["RAY_SERVE_HAPROXY_METRICS_PORT"] == "19101"
    config = tmp_path / "haproxy.cfg"
    config.write_text(GENERATED)
    wrapper = environment["RAY_SERVE_HAPROXY_BINARY_PATH"]
    subprocess.run([wrapper, "-db", "-f", str(config), "-dR"], check=True)
    rewritten = config.read_text()
    assert "    bind 127.0.0.1:19101\n" in rewritten
    assert "  bind 127.0.0.1:18404\n" in rewritten
    assert "    bind *:8000\n" in rewritten  # the HTTP frontend keeps the host it was given
    assert (tmp_path / "ran-with").read_text().split() == ["-db", "-f", str(config), "-dR"]


def test_haproxy_files_live_under_the_home_even_when_its_path_is_long(
    tmp_path: Path, no_ray_auth: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", "/bin/true")
    layout = HomeLayout(tmp_path / ("a-long-folder-name-" * 4) / "home")
    environment = local_ray_environment(layout, PORTS, "haproxy")
    socket_path = Path(environment["RAY_SERVE_HAPROXY_SOCKET_PATH"])
    link = haproxy_link(layout)
    assert link is not None and socket_path.parent == link
    try:
        # Short enough for a Unix socket under Ray's node-id folder, HAProxy's temporary
        # name included; and the files land in the home.
        assert len(f"{link}/{'0' * 56}/admin.sock.4194304.tmp") <= 107
        assert link.resolve() == (layout.root / "haproxy").resolve()
        assert local_ray_environment(layout, PORTS, "haproxy") == environment  # reused
    finally:
        link.unlink()


def test_the_serve_proxy_ingress_sets_no_haproxy(tmp_path: Path, no_ray_auth: None) -> None:
    environment = local_ray_environment(HomeLayout(tmp_path / "h"), PORTS, "serve-proxy")
    assert not any(name.startswith("RAY_SERVE_") for name in environment)
    assert environment["RAY_AUTH_MODE"] == "token"


def test_ray_starts_on_loopback_with_every_fixed_port_chosen() -> None:
    command = ray_start_command("ray", PORTS, 2)
    assert f"--node-ip-address={LOOPBACK}" in command
    assert f"--dashboard-host={LOOPBACK}" in command
    for flag, port in (
        ("--port", PORTS.gcs),
        ("--ray-client-server-port", PORTS.client_server),
        ("--dashboard-port", PORTS.dashboard),
        ("--dashboard-agent-listen-port", PORTS.dashboard_agent),
        ("--metrics-export-port", PORTS.metrics),
    ):
        assert f"{flag}={port}" in command
    chosen = LocalRayPorts.choose(gcs=1, dashboard=2)
    assert (
        len({chosen.client_server, chosen.haproxy_stats, chosen.haproxy_metrics, chosen.metrics})
        == 4
    )
    assert os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") is None  # nothing leaked here


def test_a_free_port_is_never_one_that_ray_takes_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kernel hands out 52365 now and then: a Ray node's dashboard agent takes it
    unless told otherwise, so a port chosen beside a Ray node must skip it."""
    import socket

    handed_out = iter([52365, 8265, 41000])

    class Probe:
        def __enter__(self) -> Probe:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def bind(self, address: tuple[str, int]) -> None:
            self.port = next(handed_out)

        def getsockname(self) -> tuple[str, int]:
            return (LOOPBACK, self.port)

    monkeypatch.setattr(socket, "socket", Probe)
    # no room below the kernel's ephemeral range: the kernel's choice, filtered
    monkeypatch.setattr(local_ray, "ephemeral_port_range", lambda: (20050, 60999))
    assert 52365 in RAY_DEFAULT_PORTS
    assert free_port() == 41000


def test_free_ports_come_from_below_the_kernels_ephemeral_range_and_never_twice() -> None:
    """A port the kernel picked as free (bind to 0) can be picked again for one of the
    processes a Ray node starts before the listener it was chosen for binds it."""
    below = min(local_ray.CHOSEN_PORTS_TO, local_ray.ephemeral_port_range()[0])
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    if below - local_ray.CHOSEN_PORTS_FROM >= 100:  # else the kernel's choice, filtered
        assert all(local_ray.CHOSEN_PORTS_FROM <= port < below for port in ports), ports
