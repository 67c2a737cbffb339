"""A local append-only spool for quarantine entries while Redis is unreachable.

Each API process appends to its own file ``<spool_dir>/<host>-<pid>-<random>.spool`` and
holds an exclusive ``flock`` on it for as long as it lives. A record is
``<length:4><crc32:4><json>``, written with one ``write`` and fsynced before the request is
answered, so an acknowledged entry survives a crash of the process or the machine; a torn last
record (a crash mid-write) fails its length or checksum and is ignored.

Replay (when Redis answers again) sends every record with a per-record event id, which the
quarantine applies at most once, then deletes the file. A process replays its own file and any
file whose owner died (its lock can be taken), so nothing waits for a process that is gone.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import struct
import threading
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from models.durable import fsync_path

logger = logging.getLogger(__name__)

HEADER = struct.Struct(">II")  # length, crc32
SUFFIX = ".spool"
MAX_RECORD_BYTES = 64 * 1024 * 1024


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Every complete record of a spool file, in order; stops at a torn tail."""
    data = path.read_bytes()
    offset = 0
    while offset + HEADER.size <= len(data):
        length, crc = HEADER.unpack_from(data, offset)
        start, end = offset + HEADER.size, offset + HEADER.size + length
        if length > MAX_RECORD_BYTES or end > len(data) or zlib.crc32(data[start:end]) != crc:
            logger.warning("spool %s: torn record at byte %d ignored", path, offset)
            return
        yield json.loads(data[start:end])
        offset = end


class Spool:
    """This process's spool file plus the replay of every replayable spool in the folder."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = None
        self._path: Path | None = None
        self._lock = threading.Lock()  # appends and the rotation before a replay

    def _open(self) -> int:
        if self._fd is None:
            name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}{SUFFIX}"
            self._path = self.directory / name
            fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fsync_path(self.directory)
            self._fd = fd
        return self._fd

    def append(self, record: dict[str, Any]) -> str:
        """Append ``record`` durably; returns the event id it was given."""
        event_id = record.setdefault("event_id", uuid.uuid4().hex)
        payload = json.dumps(record, separators=(",", ":")).encode()
        with self._lock:
            fd = self._open()
            os.write(fd, HEADER.pack(len(payload), zlib.crc32(payload)) + payload)
            os.fsync(fd)
        return event_id

    def count(self) -> int:
        """Complete records in every spool file of the folder (for the metric)."""
        return sum(sum(1 for _ in read_records(path)) for path in self.files())

    def close(self) -> None:
        """Close (and unlock) this process's file; another process may then replay it."""
        with self._lock:
            self._rotate()

    def _rotate(self) -> Path | None:
        """Close our file so new records go to a new one; returns the closed file."""
        path, fd = self._path, self._fd
        self._fd, self._path = None, None
        if fd is not None:
            os.close(fd)
        return path

    def files(self) -> list[Path]:
        return sorted(self.directory.glob(f"*{SUFFIX}"))

    def replay(self, apply: Callable[[dict[str, Any]], None]) -> int:
        """Send every record of our own file and of orphaned files to ``apply`` (which raises
        when Redis is still away); a file is deleted once all its records went through.
        Returns the records applied."""
        with self._lock:
            self._rotate()  # our file is unlocked now and replayed below like any orphan
        applied = 0
        for path in self.files():
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live process owns it and will replay it
                applied += self._replay_file(path, apply)
            finally:
                os.close(fd)
        return applied

    def _replay_file(self, path: Path, apply: Callable[[dict[str, Any]], None]) -> int:
        records = list(read_records(path))
        for record in records:
            apply(record)  # raises on failure: the file stays, to be replayed again
        path.unlink(missing_ok=True)
        fsync_path(self.directory)
        if records:
            logger.info("replayed %d spooled quarantine entries from %s", len(records), path)
        return len(records)
