"""Real processes for the online demo and the serving benchmark: a private Redis with the
persistence settings the service needs, ``nnoculation serve`` and ``nnoculation worker``.

Only loopback addresses are used; every process is stopped when its context ends."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import httpx

T = TypeVar("T")

REDIS_SETTINGS = (
    # What the quarantine's "lose nothing" needs (README, "Redis"): every write to the AOF and
    # fsynced before Redis answers, and no eviction of keys under memory pressure.
    "--appendonly", "yes", "--appendfsync", "always", "--maxmemory-policy", "noeviction",
    "--save", "",
)  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.2) -> T:
    """Poll ``check`` until it returns something truthy and return that. An exception other
    than RuntimeError means "not yet"; RuntimeError means the thing died (raised at once)."""
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except RuntimeError:
            raise
        except Exception as err:  # not up yet
            last = err
        time.sleep(interval_s)
    raise TimeoutError(f"{what} did not happen within {timeout_s:.0f} s (last error: {last!r})")


class RedisServer:
    """A private ``redis-server`` on a free loopback port with :data:`REDIS_SETTINGS`; it can
    be stopped (or killed) and started again on the same port and data directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        import redis

        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.directory), "--logfile", "redis.log", *REDIS_SETTINGS],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_timeout=1)
        wait_until(client.ping, 15, "redis-server to answer", interval_s=0.1)
        client.close()
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(15)
        self.process = None


@contextmanager
def redis_server(directory: Path) -> Iterator[RedisServer]:
    """A started :class:`RedisServer`, stopped when the context ends."""
    server = RedisServer(directory).start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def redis_url_for(given: str | None, directory: Path) -> Iterator[str]:
    """``given`` (a user's Redis, e.g. ``$REDIS_URL``), else a private server's URL."""
    if given:
        yield given
        return
    with redis_server(directory) as server:
        yield server.url


class Child:
    """A child process in its own session (so it can be signalled with all it started),
    logging to a file."""

    def __init__(
        self, args: list[str], env: dict[str, str], log: Path, cwd: Path | None = None
    ) -> None:
        self.log = log
        self._file = log.open("ab")
        self.popen = subprocess.Popen(
            args, env=env, cwd=cwd, stdout=self._file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the process group and wait for its leader."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            self.popen.wait(20)
        self._file.close()

    def stop(self) -> None:
        """SIGTERM (graceful), SIGKILL if that takes over 20 s."""
        if self.alive():
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._file.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_http(self, url: str, timeout_s: float, what: str) -> None:
        """Poll ``url`` until it answers 200; raise at once, with the end of the log, if this
        process exits first (``what`` names what is awaited, for the messages)."""

        def up() -> bool:
            if not self.alive():
                raise RuntimeError(f"exited while waiting for {what}:\n{self.output()[-3000:]}")
            return httpx.get(url, timeout=2).status_code == 200

        wait_until(up, timeout_s, what)


def nnoculation(*args: str) -> list[str]:
    return [sys.executable, "-m", "nnoculation.cli", *args]


@contextmanager
def api_server(env: dict[str, str], log: Path, workers: int) -> Iterator[str]:
    """``nnoculation serve`` on a free port, ready; yields its base URL."""
    port = free_port()
    child = Child(nnoculation("serve", "--port", str(port), "--workers", str(workers),
                              "--log-level", "warning"), env, log)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        child.wait_http(f"{url}/readyz", 120, "the API to be ready")
        yield url
    finally:
        child.stop()


@contextmanager
def worker_process(env: dict[str, str], log: Path) -> Iterator[Child]:
    child = Child(nnoculation("worker"), env, log)
    try:
        yield child
    finally:
        child.stop()
