"""Activation announcements: the worker or an operator activates a version in the store and
publishes it on the deployment's channel; every API process loads it at once. Pub/sub is
fire-and-forget, so each process also polls the store's active pointer (a missed message costs
one poll interval, never a stale model)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis

from nnoculation.online.keys import Keys

ACTIVATED = "activated"


@dataclass(frozen=True)
class Announcement:
    type: str
    version: str
    time: float
    source: str

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, data: bytes | str) -> Announcement:
        raw = json.loads(data)
        return cls(str(raw["type"]), str(raw["version"]), float(raw["time"]), str(raw["source"]))


def announce_activation(client: redis.Redis, keys: Keys, version: str, source: str) -> int:
    """Publish that ``version`` is now active; returns how many listeners got it."""
    message = Announcement(ACTIVATED, version, time.time(), source)
    return int(client.publish(keys.channel, message.to_json()))
