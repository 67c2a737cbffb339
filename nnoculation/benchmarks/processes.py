"""Real processes for the online demo and the serving benchmark: a private Redis with the
persistence settings the service needs, ``nnoculation serve`` and ``nnoculation worker``.

Only loopback addresses are used; every process is stopped when its context ends."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

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


def wait_until(check: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except RuntimeError:  # the thing died: no point waiting
            raise
        except Exception:  # not up yet
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not happen within {timeout_s:.0f} s")


@contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    """A private ``redis-server`` on a free loopback port; yields its URL."""
    import redis

    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
         "--logfile", "redis.log", *REDIS_SETTINGS],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_until(lambda: redis.Redis.from_url(url).ping(), 15, "redis-server to answer")
        yield url
    finally:
        proc.terminate()
        proc.wait(15)


class Child:
    """A child process in its own session, logging to a file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._file = log.open("ab")
        self.popen = subprocess.Popen(
            args, env=env, stdout=self._file, stderr=subprocess.STDOUT, start_new_session=True
        )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        self._file.close()


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

        def ready() -> bool:
            if not child.alive():
                raise RuntimeError(f"the API exited; see {log}")
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200

        wait_until(ready, 120, "the API to be ready")
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
