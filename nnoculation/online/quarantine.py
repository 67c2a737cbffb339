"""The quarantine in Redis: the inputs on which BadNet and GoodNet disagreed (sec. 3.3).

Layout under the deployment's key base (see :class:`nnoculation.online.keys.Keys`):

* ``q:item:<sha>``: a hash per distinct input: the preprocessed image (uint8 ``[C, H, W]``,
  raw bytes, lossless), its shape, both nets' labels, the serving version, first/last time and
  a count (a duplicate, same sha256 of shape + pixels, only raises the count);
* ``q:pending:<version>``: a sorted set of the shas caught while ``version`` served, oldest
  first; ``q:labels:<version>`` the BadNet-label histogram of those (the attacked label piles
  up here, the signal purification uses);
* ``q:size``: entries stored and not yet archived, bounded by the cap; an entry refused at the
  cap is counted in ``q:overflow`` and logged by the caller, never dropped silently;
* a repair *claims* a version's pending set by renaming it to ``q:claimed:<repair_id>`` (new
  inputs start a fresh pending set), and when it ends the claimed entries are *archived* under
  ``q:archive:<repair_id>`` (items renamed to ``q:archive:<repair_id>:<sha>``), never deleted;
  a repair that crashed or was cancelled *releases* them back to pending.

Every change is one Lua script, so concurrent API processes and a worker cannot interleave
half-updates. Durability is Redis's: run it with AOF (``appendonly yes``,
``appendfsync always`` to lose nothing acknowledged, or ``everysec`` to risk about a second)
and ``maxmemory-policy noeviction``.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import redis
import torch

from nnoculation.online.connection import text
from nnoculation.online.keys import Keys

EVENT_MEMORY = 16  # write ids remembered per item, to apply a replayed write once

ADDED = "added"
DUPLICATE = "duplicate"
FULL = "full"
REPLAYED = "replayed"

# An event id makes a write idempotent: each item remembers the ids of its last
# EVENT_MEMORY writes, so a write whose answer was lost (Redis died after applying it) and that
# is replayed from the spool is not counted twice.
_ADD = """
local base, sha, version, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local cap, event, memory = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[13])
local pending = base..':q:pending:'..version
local item = base..':q:item:'..sha
if redis.call('EXISTS', item) == 1 then
  local events = redis.call('HGET', item, 'events') or ''
  if event ~= '' and string.find(','..events..',', ','..event..',', 1, true) then
    return {'replayed', redis.call('ZCARD', pending)}
  end
  redis.call('INCR', base..':q:events')
  redis.call('HINCRBY', item, 'count', 1)
  local kept = {}
  for id in string.gmatch(events, '[^,]+') do table.insert(kept, id) end
  table.insert(kept, event)
  while #kept > memory do table.remove(kept, 1) end
  redis.call('HSET', item, 'last_seen', now, 'events', table.concat(kept, ','))
  return {'duplicate', redis.call('ZCARD', pending)}
end
redis.call('INCR', base..':q:events')
local size = tonumber(redis.call('GET', base..':q:size') or '0')
if size >= cap then
  redis.call('INCR', base..':q:overflow')
  return {'full', redis.call('ZCARD', pending)}
end
redis.call('HSET', item, 'image', ARGV[7], 'shape', ARGV[8], 'badnet_label', ARGV[9],
  'goodnet_label', ARGV[10], 'version', version, 'first_seen', ARGV[11], 'last_seen', now,
  'count', ARGV[12], 'events', event)
redis.call('ZADD', pending, ARGV[11], sha)
redis.call('SADD', base..':q:versions', version)
redis.call('HINCRBY', base..':q:labels:'..version, ARGV[9], 1)
redis.call('INCR', base..':q:size')
return {'added', redis.call('ZCARD', pending)}
"""

# Claim a version's pending entries for a repair; idempotent (a retried job finds its claim).
_CLAIM = """
local base, version, rid = ARGV[1], ARGV[2], ARGV[3]
local claimed = base..':q:claimed:'..rid
if redis.call('EXISTS', claimed) == 1 then return redis.call('ZCARD', claimed) end
if redis.call('EXISTS', base..':q:archive:'..rid) == 1 then return -1 end
local pending = base..':q:pending:'..version
if redis.call('EXISTS', pending) == 0 then return 0 end
redis.call('RENAME', pending, claimed)
redis.call('DEL', base..':q:labels:'..version)
redis.call('SREM', base..':q:versions', version)
return redis.call('ZCARD', claimed)
"""

# Archive a claim under the repair id; idempotent.
_ARCHIVE = """
local base, rid, now = ARGV[1], ARGV[2], ARGV[3]
local claimed = base..':q:claimed:'..rid
local archive = base..':q:archive:'..rid
if redis.call('EXISTS', claimed) == 0 then return 0 end
local shas = redis.call('ZRANGE', claimed, 0, -1)
local moved = 0
for _, sha in ipairs(shas) do
  local item = base..':q:item:'..sha
  if redis.call('EXISTS', item) == 1 then
    redis.call('RENAME', item, archive..':'..sha)
    moved = moved + 1
  end
end
redis.call('RENAME', claimed, archive)
redis.call('DECRBY', base..':q:size', moved)
redis.call('ZADD', base..':q:archives', now, rid)
return moved
"""

# Give a claim back to the pending set of its version (the repair did not use it); idempotent.
_RELEASE = """
local base, rid = ARGV[1], ARGV[2]
local claimed = base..':q:claimed:'..rid
if redis.call('EXISTS', claimed) == 0 then return 0 end
local entries = redis.call('ZRANGE', claimed, 0, -1, 'WITHSCORES')
for i = 1, #entries, 2 do
  local sha, score = entries[i], entries[i + 1]
  local item = base..':q:item:'..sha
  local version = redis.call('HGET', item, 'version')
  if version then
    redis.call('ZADD', base..':q:pending:'..version, score, sha)
    redis.call('SADD', base..':q:versions', version)
    redis.call('HINCRBY', base..':q:labels:'..version, redis.call('HGET', item, 'badnet_label'), 1)
  end
end
redis.call('DEL', claimed)
return #entries / 2
"""


def content_hash(image: torch.Tensor) -> str:
    """sha256 of a uint8 ``[C, H, W]`` image's shape and pixels: duplicates share it."""
    digest = hashlib.sha256(str(tuple(image.shape)).encode())
    digest.update(image.contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class QuarantineEntry:
    """One disagreement, as the service records it."""

    image: torch.Tensor  # uint8 [C, H, W]
    badnet_label: int
    goodnet_label: int
    version: str
    time: float
    sha256: str = ""

    def __post_init__(self) -> None:
        if self.image.dtype != torch.uint8 or self.image.ndim != 3:
            raise ValueError("a quarantine entry holds a uint8 [C, H, W] image")
        if not self.sha256:
            object.__setattr__(self, "sha256", content_hash(self.image))

    def to_record(self) -> dict[str, Any]:
        """JSON-friendly form (the spool file's); the image as hex bytes."""
        return {
            "image": self.image.contiguous().numpy().tobytes().hex(),
            "shape": list(self.image.shape),
            "badnet_label": self.badnet_label,
            "goodnet_label": self.goodnet_label,
            "version": self.version,
            "time": self.time,
            "sha256": self.sha256,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> QuarantineEntry:
        shape = tuple(int(v) for v in record["shape"])
        image = torch.frombuffer(bytearray(bytes.fromhex(record["image"])), dtype=torch.uint8)
        entry = cls(
            image=image.reshape(shape),
            badnet_label=int(record["badnet_label"]),
            goodnet_label=int(record["goodnet_label"]),
            version=str(record["version"]),
            time=float(record["time"]),
        )
        if record.get("sha256") and record["sha256"] != entry.sha256:
            raise ValueError("quarantine record fails its sha256 check")
        return entry


@dataclass(frozen=True)
class AddResult:
    """What happened to one entry: ``status`` is added / duplicate / full / replayed, and
    ``pending`` the number of distinct entries now pending for the entry's version."""

    status: str
    pending: int


@dataclass(frozen=True)
class StoredItem:
    """A quarantined input as read back from Redis."""

    sha256: str
    image: torch.Tensor
    badnet_label: int
    goodnet_label: int
    version: str
    first_seen: float
    last_seen: float
    count: int


def _item(sha: str, raw: dict[bytes, bytes]) -> StoredItem:
    shape = tuple(int(v) for v in text(raw[b"shape"]).split(","))
    image = torch.frombuffer(bytearray(raw[b"image"]), dtype=torch.uint8).reshape(shape)
    return StoredItem(
        sha256=sha,
        image=image,
        badnet_label=int(raw[b"badnet_label"]),
        goodnet_label=int(raw[b"goodnet_label"]),
        version=text(raw[b"version"]),
        first_seen=float(raw[b"first_seen"]),
        last_seen=float(raw[b"last_seen"]),
        count=int(raw[b"count"]),
    )


class Quarantine:
    """The Redis quarantine of one deployment (sync client; the service calls it in threads)."""

    def __init__(self, client: redis.Redis, keys: Keys, cap: int) -> None:
        if cap < 1:
            raise ValueError("the quarantine cap must be positive")
        self.client = client
        self.keys = keys
        self.cap = cap
        self._add = client.register_script(_ADD)
        self._claim = client.register_script(_CLAIM)
        self._archive = client.register_script(_ARCHIVE)
        self._release = client.register_script(_RELEASE)

    def add(self, entry: QuarantineEntry, event_id: str = "", count: int = 1) -> AddResult:
        """Store ``entry`` (or count a duplicate). ``event_id`` (letters and digits) makes the
        write idempotent: sent again, as a spool replay does, it is applied once."""
        if "," in event_id:
            raise ValueError("event ids must not contain ','")
        status, pending = self._add(
            args=[
                self.keys.base,
                entry.sha256,
                entry.version,
                repr(time.time()),
                self.cap,
                event_id,
                entry.image.contiguous().numpy().tobytes(),
                ",".join(str(d) for d in entry.image.shape),
                entry.badnet_label,
                entry.goodnet_label,
                repr(entry.time),
                count,
                EVENT_MEMORY,
            ]
        )
        return AddResult(text(status), int(pending))

    # --- reading ---

    def pending_count(self, version: str) -> int:
        return int(self.client.zcard(self.keys.pending(version)))

    def stats(self) -> dict[str, Any]:
        """Sizes per version, the BadNet-label histograms, cap, overflow and event count."""
        k = self.keys
        versions = sorted(text(v) for v in self.client.smembers(k.versions))
        pipe = self.client.pipeline(transaction=False)
        pipe.get(k.size)
        pipe.get(k.overflow)
        pipe.get(k.events)
        pipe.zcard(k.archives)
        for v in versions:
            pipe.zcard(k.pending(v))
            pipe.hgetall(k.labels(v))
        out = pipe.execute()
        size, overflow, events, archives = (int(x or 0) for x in out[:4])
        per_version = {}
        for i, v in enumerate(versions):
            count, labels = out[4 + 2 * i], out[5 + 2 * i]
            per_version[v] = {
                "pending": int(count),
                "badnet_labels": {int(a): int(b) for a, b in labels.items() if int(b) > 0},
            }
        return {
            "size": size,
            "cap": self.cap,
            "overflow": overflow,
            "events": events,
            "archives": archives,
            "versions": per_version,
        }

    def _read(self, keys: list[str], shas: list[str]) -> list[StoredItem]:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        return [_item(sha, raw) for sha, raw in zip(shas, pipe.execute(), strict=True) if raw]

    def samples(self, version: str, limit: int, offset: int = 0) -> list[StoredItem]:
        """Pending entries of ``version``, oldest first."""
        shas = [
            text(s)
            for s in self.client.zrange(self.keys.pending(version), offset, offset + limit - 1)
        ]
        return self._read([self.keys.item(s) for s in shas], shas)

    def item(self, sha: str) -> StoredItem | None:
        """A pending or claimed entry by content hash."""
        found = self._read([self.keys.item(sha)], [sha])
        return found[0] if found else None

    # --- repairs ---

    def claim(self, version: str, repair_id: str) -> int:
        """Move ``version``'s pending entries to ``repair_id``'s claim; returns the claim's size
        (the same claim when called again; -1 when that repair was already archived)."""
        return int(self._claim(args=[self.keys.base, version, repair_id]))

    def claimed(self, repair_id: str) -> list[StoredItem]:
        shas = [text(s) for s in self.client.zrange(self.keys.claimed(repair_id), 0, -1)]
        return self._read([self.keys.item(s) for s in shas], shas)

    def claimed_images(self, repair_id: str) -> torch.Tensor:
        """The claim's images as uint8 ``[N, C, H, W]``, oldest first (empty if none)."""
        items = self.claimed(repair_id)
        if not items:
            return torch.zeros((0, 0, 0, 0), dtype=torch.uint8)
        return torch.stack([i.image for i in items])

    def archive(self, repair_id: str) -> int:
        """Archive the claim under ``repair_id`` (kept, no longer pending); returns items moved."""
        return int(self._archive(args=[self.keys.base, repair_id, repr(time.time())]))

    def release(self, repair_id: str) -> int:
        """Return the claim to the pending sets; returns the entries released."""
        return int(self._release(args=[self.keys.base, repair_id]))

    def archived(self, repair_id: str, limit: int = 1000) -> list[StoredItem]:
        """Entries archived under ``repair_id`` (a repair's or a purge's id)."""
        base = self.keys.archive(repair_id)
        shas = [text(s) for s in self.client.zrange(base, 0, limit - 1)]
        return self._read([f"{base}:{s}" for s in shas], shas)

    def archives(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest archives (repairs' and purges'): id, time and size."""
        found: list[Any] = list(
            self.client.zrevrange(self.keys.archives, 0, limit - 1, withscores=True)
        )
        ids = [text(archive_id) for archive_id, _ in found]
        pipe = self.client.pipeline(transaction=False)
        for archive_id in ids:
            pipe.zcard(self.keys.archive(archive_id))
        sizes = pipe.execute()
        return [
            {"id": a, "time": float(t), "entries": int(n)}
            for a, (_, t), n in zip(ids, found, sizes, strict=True)
        ]

    def purge(self, version: str, purge_id: str) -> int:
        """Archive ``version``'s pending entries under ``purge_id`` (explicit, never lost)."""
        self.claim(version, purge_id)
        return self.archive(purge_id)
