"""The API process's settings (environment variables with the ``NNOC_`` prefix)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr

from nnoculation.inputs import DEFAULT_PIXEL_CAP_FACTOR
from nnoculation.online.settings import CommonSettings


class ServiceSettings(CommonSettings):
    """Serving limits, batching, security and where the spool lives."""

    workers: int = Field(2, ge=1, description="uvicorn worker processes of `nnoculation serve`")
    max_batch_size: int = Field(32, ge=1, description="most inputs per forward pass")
    max_wait_ms: float = Field(
        2.0,
        ge=0,
        description="longest a request waits for others to "
        "join its batch, from the oldest request's arrival; only when "
        "more requests are already arriving",
    )
    batching: bool = Field(True, description="off: every request runs alone (benchmarks)")
    max_queue: int = Field(
        512,
        ge=1,
        description="requests waiting for the model before new ones get 503 + Retry-After",
    )
    deadline_ms: float = Field(5000.0, gt=0, description="a request not answered in time gets 504")
    max_body_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        description="largest request body; larger ones get 413 before they are read",
    )
    max_batch_items: int = Field(64, ge=1, description="most images in one /predict/batch")
    pixel_cap_factor: int = Field(
        DEFAULT_PIXEL_CAP_FACTOR,
        ge=1,
        description="largest image accepted, in multiples of the model's input pixels",
    )
    resize: bool = Field(
        True,
        description="resize images to the model's input size (bilinear); off: other sizes get 422",
    )
    admin_token: SecretStr | None = Field(
        None, description="bearer token of /admin; unset: every admin route answers 401"
    )
    expose_quarantine: bool = Field(
        False,
        description="show every caller whether its input "
        "was quarantined (default: admin callers only, so an "
        "attacker cannot learn which inputs were caught)",
    )
    spool_dir: Path = Field(
        Path("spool"),
        description="local append-only spool for quarantine entries while Redis is unreachable",
    )
    poll_interval_s: float = Field(
        2.0,
        gt=0,
        description="how often each process checks the "
        "store's active pointer (besides announcements)",
    )
    process_ttl_s: float = Field(
        6.0, gt=0, description="a process not seen for this long drops out of /admin/status"
    )
    nets: Literal["ensemble", "badnet"] = Field(
        "ensemble",
        description="'badnet' serves the "
        "BadNet alone, without quarantine: a baseline "
        "for benchmarks, not a defense",
    )

    def torch_threads(self) -> int:
        """Threads per process: the setting, else the cores divided among the workers."""
        if self.threads:
            return self.threads
        return max(1, len(os.sched_getaffinity(0)) // self.workers)
