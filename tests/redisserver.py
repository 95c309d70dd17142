"""A real redis-server for the tests: its own process on a free 127.0.0.1 port, in a temporary
directory, with no persistence (``--save '' --appendonly no``), stopped at teardown.

    server = RedisServer(tmp_path)      # started; server.url is redis://127.0.0.1:PORT/0
    server.stop(); server.start()       # an outage: the same port again, the data gone

The `redis_server` fixture (tests/conftest.py) skips a test, saying why, when
/usr/bin/redis-server is missing (`apt-get install redis-server`; scripts/test installs it in CI).
"""
from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

REDIS_SERVER = Path("/usr/bin/redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = Path(directory)
        self.port = port or 0
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Start on self.port (a free one the first time; another try if it was taken meanwhile)."""
        for attempt in range(5):
            port = self.port or free_port()
            log = open(self.directory / "redis.log", "ab")
            self.proc = subprocess.Popen(
                [str(REDIS_SERVER), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.directory)],
                stdout=log, stderr=subprocess.STDOUT)
            log.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                if answers_ping(port):
                    self.port = port
                    return
                time.sleep(0.02)
            self.proc.kill()
            self.proc.wait()
            if self.port:
                break
        raise RuntimeError(f"redis-server did not start; its log:\n{self.log_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_text(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""


def redis_server_fixture(tmp_path_factory):
    import pytest
    if not REDIS_SERVER.exists():
        pytest.skip(f"{REDIS_SERVER} is missing (apt-get install redis-server): the Redis history "
                    "store is not tested")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()
