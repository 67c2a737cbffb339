"""Settings both online processes read: one ``NNOC_`` environment prefix, validated at start.

``service.settings.ServiceSettings`` and ``worker.settings.WorkerSettings`` extend this class,
so a variable means the same thing to the API and the worker (README, "Settings").
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from models.store_names import StoreError
from models.store_open import check_location, is_remote, open_store
from nnoculation.online.keys import check_name

if TYPE_CHECKING:
    from models.store_base import BundleStore

ENV_PREFIX = "NNOC_"
DEFAULT_N = 200  # sec. 4.2.2: the quarantine size that starts a repair


class CommonSettings(BaseSettings):
    """Where the deployment lives and the rules both processes follow."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis for quarantine, repair jobs and announcements",
    )
    key_prefix: str = Field("nnoc", description="prefix of every Redis key")
    deployment: str = Field("default", description="deployment name in the store and in Redis")
    store_root: str = Field(
        "store",
        description="model store: a directory (a shared volume when API and worker run on "
        "different machines) or object storage as s3://bucket/prefix",
    )
    store_cache_dir: Path = Field(
        Path("store-cache"),
        description="local verified copies of the bundles of an s3:// store "
        "(unused with a directory store)",
    )
    device: str = Field(
        "auto", description="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ..."
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads per process "
        "(default: the service divides the cores among its workers)",
    )
    quarantine_n: int = Field(
        DEFAULT_N,
        ge=1,
        description="N: pending "
        "quarantined inputs of the active version that start a repair "
        "(sec. 4.2.2)",
    )
    quarantine_cap: int = Field(
        5000,
        ge=1,
        description="most quarantined inputs kept before "
        "repairs archive them; more are counted and refused, loudly",
    )
    repair_timeout_s: int = Field(3600, ge=60, description="RQ job timeout of a repair")
    repair_backoff_s: float = Field(
        60.0,
        ge=0,
        description="pause before another automatic repair after one failed or was cancelled",
    )
    heartbeat_ttl_s: float = Field(
        15.0,
        gt=0,
        description="a running repair that has not "
        "refreshed its heartbeat for this long is taken for dead",
    )
    reconcile_interval_s: float = Field(
        5.0, gt=0, description="seconds between reconciliation passes"
    )
    redis_timeout_s: float = Field(1.0, gt=0, description="socket timeout of Redis calls")

    @field_validator("key_prefix")
    @classmethod
    def _prefix_ok(cls, value: str) -> str:
        return check_name("key prefix", value)

    @field_validator("deployment")
    @classmethod
    def _deployment_ok(cls, value: str) -> str:
        return check_name("deployment name", value)

    @field_validator("store_root", mode="before")
    @classmethod
    def _store_root_text(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("store_root")
    @classmethod
    def _store_root_ok(cls, value: str) -> str:
        try:
            return check_location(value)
        except StoreError as err:
            raise ValueError(str(err)) from None

    def open_store(self) -> BundleStore:
        """The model store these settings name (directory or ``s3://``)."""
        return open_store(self.store_root, self.store_cache_dir)

    def local_store_dir(self) -> Path | None:
        """The store's directory, or ``None`` when the store is object storage."""
        return None if is_remote(self.store_root) else Path(self.store_root)

    @field_validator("redis_url")
    @classmethod
    def _redis_url_ok(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redis_url must start with redis://, rediss:// or unix://")
        return value

    @field_validator("device")
    @classmethod
    def _device_ok(cls, value: str) -> str:
        if value != "auto":
            import torch

            try:
                torch.device(value)
            except RuntimeError as err:
                raise ValueError(f"unknown device {value!r}: {err}") from None
        return value


def describe_errors(err: ValidationError | SettingsError) -> str:
    """One line per invalid setting, named as the environment variable a user sets."""
    if isinstance(err, SettingsError):  # a value that could not even be parsed (bad JSON)
        return "  " + re.sub(r'field "(\w+)"', lambda m: ENV_PREFIX + m.group(1).upper(), str(err))
    lines = []
    for problem in err.errors():
        message = problem["msg"].removeprefix("Value error, ")
        if not problem["loc"]:  # a check across settings names them itself
            lines.append(f"  {message}")
            continue
        variable = ENV_PREFIX + ".".join(str(part) for part in problem["loc"]).upper()
        lines.append(f"  {variable}: {message} (got {problem.get('input')!r})")
    return "\n".join(lines)
