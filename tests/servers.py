"""Real servers that tests start on free ports: redis-server and moto's S3 server.

A process started in a development session is gone before CI runs, so the tests
start their own. ``scripts/test.sh`` installs redis-server when it is missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from mediagate.cli.local_ray import free_port as free_port  # one definition, re-exported


def _wait_until(ready: Callable[[], bool], what: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if ready():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not start within {timeout_s} s")


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]
    password: str | None = None
    data_dir: str | None = None  # durable: every write on disk before it is answered

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)

    def kill(self) -> None:
        """A crash: SIGKILL, no shutdown save."""
        self.process.kill()
        self.process.wait(timeout=10)

    def start_again(self) -> None:
        """Restart on the same port (for outage tests); a durable one reloads its data."""
        self.process = _spawn_redis(self.port, self.password, self.data_dir)
        _wait_redis(self.port, self.password)


def _spawn_redis(
    port: int, password: str | None = None, data_dir: str | None = None
) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (scripts/test.sh installs it as root)")
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    if data_dir is None:
        command += ["--appendonly", "no"]
    else:  # as production should run the state store: an fsync per write
        command += ["--appendonly", "yes", "--appendfsync", "always", "--dir", data_dir]
    if password:
        command += ["--requirepass", password]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_redis(port: int, password: str | None = None) -> None:
    import redis

    def ping() -> bool:
        client = redis.Redis(port=port, password=password, socket_connect_timeout=0.5)
        return bool(client.ping())

    _wait_until(ping, "redis-server")


@contextmanager
def redis_server(
    *, password: str | None = None, data_dir: str | None = None
) -> Iterator[RedisServer]:
    port = free_port()
    server = RedisServer(port, _spawn_redis(port, password, data_dir), password, data_dir)
    try:
        _wait_redis(port, password)
        yield server
    finally:
        server.stop()


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str

    def client(self) -> object:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")


MOTO_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextmanager
def moto_s3_server() -> Iterator[S3Server]:
    """moto's standalone server: a real HTTP endpoint that speaks the S3 API."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **MOTO_CREDENTIALS},
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_until(lambda: httpx.get(endpoint, timeout=1).status_code < 500, "moto server")
        yield S3Server(endpoint_url=endpoint)
    finally:
        process.terminate()
        process.wait(timeout=10)


class CuttableProxy:
    """A TCP forwarder on a free loopback port to ``target_port``, for outages of a
    server whose state must survive them (moto keeps its buckets in memory): ``cut()``
    resets every open connection and refuses new ones, as a store that went away does;
    ``restore()`` listens on the same port again."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target_port = target_port
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.restore()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
            listener.close()
        with self._lock:
            connections, self._open = self._open, set()
        for connection in connections:  # RST rather than FIN: the peer sees a reset
            with contextlib.suppress(OSError):
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                connection.shutdown(socket.SHUT_RD)  # wakes its pump's blocked recv()
            connection.close()

    def close(self) -> None:
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)  # the timeout was for connecting only
            with self._lock:
                self._open |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        """Copy one direction; when it ends, end the pair (each pump closes its source,
        so both sockets are closed once both directions are done)."""
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                source.shutdown(socket.SHUT_RD)
            with self._lock:
                self._open.discard(source)
            source.close()


@dataclass
class ReceivedHook:
    headers: dict[str, str]
    body: bytes
    at: float


class WebhookReceiver:
    """A real HTTP server on loopback that records what is POSTed to it and answers
    each request with the next of ``answers`` (a status, or ``(status, headers, body)``;
    200 once they run out). ``hold`` makes the next request wait until released (a
    receiver that is slow, for killing a sender mid-delivery)."""

    def __init__(self, answers: list[int | tuple[int, dict[str, str], bytes]] | None = None):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.answers = list(answers or [])
        self.received: list[ReceivedHook] = []
        self.arrived = threading.Event()  # set at each request
        self.hold_next = threading.Event()  # set: the next request waits for `release`
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                hold = receiver.hold_next.is_set()
                receiver.hold_next.clear()
                receiver.received.append(
                    ReceivedHook({k.lower(): v for k, v in self.headers.items()}, body, time.time())
                )
                receiver.arrived.set()
                if hold:
                    receiver.release.wait(60)
                answer = receiver.answers.pop(0) if receiver.answers else 200
                status, headers, content = (
                    answer if isinstance(answer, tuple) else (answer, {}, b"ok")
                )
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("content-length", str(len(content)))
                    self.end_headers()
                    self.wfile.write(content)
                except OSError:
                    pass  # the sender went away

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hooks"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()

    def wait_for(self, count: int, timeout_s: float = 30) -> list[ReceivedHook]:
        deadline = time.monotonic() + timeout_s
        while len(self.received) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.received)} of {count} webhooks arrived")
            time.sleep(0.02)
        return self.received
