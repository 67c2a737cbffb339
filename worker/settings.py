"""The worker's settings (environment variables with the ``NNOC_`` prefix)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from nnoculation.online.settings import CommonSettings
from nnoculation.repair.engine import RepairConfig


class WorkerSettings(CommonSettings):
    """How repairs run."""

    repair_profile: str = Field(
        "cpu",
        description="trigger-model profile: a CycleGAN profile "
        "('cpu', 'cpu-fast', 'paper', ...) or 'mean-diff'",
    )
    repair_options: dict[str, Any] = Field(
        default_factory=dict,
        description="JSON object of further RepairConfig fields, e.g. '{\"finetune_epochs\": 3}'",
    )
    work_dir: Path | None = Field(
        None,
        description="CycleGAN checkpoints of running repairs, "
        "so a killed repair resumes (default: <store_root>/.work, "
        "or <store_cache_dir>/.work for an s3:// store)",
    )
    metrics_port: int = Field(
        9101, ge=0, le=65535, description="port of the worker's /metrics (0: none)"
    )
    metrics_host: str = Field("127.0.0.1", description="address the worker's /metrics listens on")

    @field_validator("repair_options", mode="before")
    @classmethod
    def _options_json(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as err:
                raise ValueError(f"repair_options is not a JSON object: {err}") from None
        return value

    @model_validator(mode="after")
    def _config_ok(self) -> WorkerSettings:
        try:  # invalid repair settings fail at start, not mid-repair
            self.repair_config()
        except ValueError as err:
            raise ValueError(f"NNOC_REPAIR_PROFILE / NNOC_REPAIR_OPTIONS: {err}") from None
        return self

    def repair_config(self, checkpoint_dir: Path | None = None) -> RepairConfig:
        """The repair configuration these settings describe."""
        data = {"profile": self.repair_profile, **self.repair_options}
        if checkpoint_dir is not None:
            data["checkpoint_dir"] = str(checkpoint_dir)
        return RepairConfig.from_dict(data)

    def checkpoint_dir(self, repair_id: str) -> Path:
        if self.work_dir is not None:
            root = self.work_dir
        else:  # beside the bundles: the store's directory, or the cache of an s3:// store
            root = (self.local_store_dir() or self.store_cache_dir) / ".work"
        return root / self.deployment / repair_id
