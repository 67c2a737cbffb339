"""``nnoculation serve`` and ``nnoculation worker`` refuse invalid settings before starting
anything: exit 2 and a line naming the variable to fix."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nnoculation.cli import main

CASES = {
    "serve, batch size 0": (["serve"], {"NNOC_MAX_BATCH_SIZE": "0"}, "NNOC_MAX_BATCH_SIZE"),
    "serve, bad redis url": (["serve"], {"NNOC_REDIS_URL": "http://x"}, "NNOC_REDIS_URL"),
    "serve, bad deployment": (["serve"], {"NNOC_DEPLOYMENT": "a:b"}, "NNOC_DEPLOYMENT"),
    "serve, no workers": (["serve", "--workers", "0"], {}, "--workers"),
    "worker, unknown profile": (["worker"], {"NNOC_REPAIR_PROFILE": "nope"}, "NNOC_REPAIR_PROFILE"),
    "worker, bad options": (
        ["worker"], {"NNOC_REPAIR_OPTIONS": '{"finetune_epochs": 0}'}, "finetune_epochs",
    ),
    "worker, options not json": (["worker"], {"NNOC_REPAIR_OPTIONS": "{"}, "NNOC_REPAIR_OPTIONS"),
    "worker, negative ttl": (["worker"], {"NNOC_HEARTBEAT_TTL_S": "-1"}, "NNOC_HEARTBEAT_TTL_S"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CASES))
def test_invalid_settings_exit_2_naming_the_variable(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args, env, named = CASES[name]
    for key in [k for k in os.environ if k.startswith("NNOC_") and k != "NNOC_THREADS"]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    multiproc = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    assert main(args) == 2  # refused before anything starts (or execs)
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    assert os.environ.get("PROMETHEUS_MULTIPROC_DIR") == multiproc


def test_the_installed_command_refuses_them_too() -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NNOC_")}
    result = subprocess.run(
        [sys.executable, "-m", "nnoculation.cli", "serve"],
        env={**clean, "NNOC_MAX_QUEUE": "zero"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "NNOC_MAX_QUEUE" in result.stderr
