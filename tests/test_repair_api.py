"""The repair engine as the worker calls it: validated configs (also from JSON), progress
reports, cancellation and the device argument."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from models.bundle import load_bundle
from models.nets import Net
from models.store import ModelStore, RepairLockedError
from nnoculation.repair import engine
from nnoculation.repair.cyclegan import CHECKPOINT_FILE
from nnoculation.repair.engine import (
    STAGES,
    RepairCancelled,
    RepairConfig,
    RepairConfigError,
    RepairProgress,
    repair,
    repair_in_store,
)
from nnoculation.repair.purify import PurifyConfig
from nnoculation.repair.reverse import MEAN_DIFF
from tests.conftest import synthetic_set
from tests.deployment_fixtures import make_deployment, triggered


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"profile": "nope"}, r"unknown profile 'nope'; known: .*cpu"),
        ({"domain_a_size": 0}, r"domain_a_size must lie in \[1, inf\)"),
        ({"finetune_epochs": 0}, r"finetune_epochs must lie in \[1, inf\)"),
        ({"finetune_epochs": 2.5}, "finetune_epochs must be an integer"),
        ({"batch_size": -1}, "batch_size must lie in"),
        ({"finetune_lr": 0.0}, r"finetune_lr must lie in \(0, inf\)"),
        ({"finetune_lr": float("nan")}, "finetune_lr must be finite"),
        ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'"),
        ({"theta": 0.0}, r"theta must lie in \(0, 1\)"),
        ({"theta": 1.0}, r"theta must lie in \(0, 1\)"),
        ({"theta": "0.1"}, "theta must be a number"),
        ({"cyclegan_epochs": 0}, "cyclegan_epochs must lie in"),
        ({"cyclegan_lr": -1e-3}, "cyclegan_lr must lie in"),
        ({"time_budget_s": 0}, "time_budget_s must lie in"),
        ({"affine_share": 1.5}, r"affine_share must lie in \[0, 1\]"),
        ({"distill_weight": -0.1}, r"distill_weight must lie in \[0, 1\]"),
        ({"distill_temperature": 0}, "distill_temperature must lie in"),
        ({"distill_min_trigger_effect": 2}, "distill_min_trigger_effect must lie in"),
        ({"seed": -1}, "seed must lie in"),
        ({"seed": True}, "seed must be an integer"),
        ({"purify": {"min_share": 0}}, "min_share"),
    ],
)
def test_bad_configs_are_refused_when_made(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(RepairConfigError, match=message):
        RepairConfig(**changes)
    with pytest.raises(ValueError, match=message):  # RepairConfigError is a ValueError
        RepairConfig.from_dict(changes)


def test_from_dict_inverts_to_dict() -> None:
    cfg = RepairConfig(
        profile="test",
        finetune_lr=2e-3,
        optimizer="sgd",
        theta=0.05,
        cyclegan_epochs=3,
        checkpoint_dir="ckpt",
        purify=PurifyConfig(enabled=False, min_share=0.2),
        distill_weight=0.0,
    )
    data = json.loads(json.dumps(cfg.to_dict()))
    again = RepairConfig.from_dict(data)
    assert again == cfg and isinstance(again.purify, PurifyConfig)
    assert RepairConfig.from_dict({}) == RepairConfig()
    assert RepairConfig.from_dict({"purify": {"enabled": False}}).purify == PurifyConfig(False)
    with pytest.raises(RepairConfigError, match=r"unknown setting\(s\) thetta; allowed: .*theta"):
        RepairConfig.from_dict({"thetta": 0.1})
    with pytest.raises(RepairConfigError, match=r"unknown purify setting\(s\) share"):
        RepairConfig.from_dict({"purify": {"share": 0.1}})
    with pytest.raises(RepairConfigError, match="must be a mapping"):
        RepairConfig.from_dict([("theta", 0.1)])  # type: ignore[arg-type]


@pytest.fixture
def deployment(tiny_net: Net, tmp_path: Path) -> tuple[Path, torch.Tensor]:
    path, attack, _ = make_deployment(tiny_net, tmp_path)
    return path, triggered(attack, synthetic_set(40, seed=21).images)


def test_the_device_argument_is_the_one_used(
    deployment: tuple[Path, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``device=`` decides where the repair trains; the machine's default is not consulted."""
    path, quarantine = deployment
    trained_on: list[str] = []
    real_train = engine.train

    def recording_train(net: Net, *args: Any, **kwargs: Any) -> Any:
        trained_on.append(str(next(net.module.parameters()).device))
        return real_train(net, *args, **kwargs)

    def no_default() -> torch.device:
        raise AssertionError("the repair asked for the default device although one was given")

    monkeypatch.setattr(engine, "train", recording_train)
    monkeypatch.setattr(engine, "default_device", no_default)
    cfg = RepairConfig(profile=MEAN_DIFF, finetune_epochs=1, theta=0.99)
    outcome = repair(load_bundle(path), quarantine, cfg, progress=False, device="cpu")
    assert trained_on == ["cpu", "cpu"]  # the BadNet's fine-tune, then the GoodNet's
    assert outcome.goodnet is not None


def test_progress_reports_every_stage_and_epoch(deployment: tuple[Path, torch.Tensor]) -> None:
    path, quarantine = deployment
    bundle = load_bundle(path)
    cfg = RepairConfig(profile="test", cyclegan_epochs=2, finetune_epochs=2, theta=0.99)
    seen: list[RepairProgress] = []
    polls = []

    def cancel() -> bool:
        polls.append(len(seen))
        return False

    outcome = repair(
        bundle, quarantine, cfg, progress=False, on_progress=seen.append, should_cancel=cancel,
        device="cpu",
    )  # fmt: skip
    steps = [(p.stage, p.epoch, p.epochs) for p in seen]
    assert steps == [
        ("purify", None, None),
        ("trigger_model", None, 2),
        ("trigger_model", 1, 2),
        ("trigger_model", 2, 2),
        ("treatment", None, None),
        ("finetune_badnet", None, 2),
        ("finetune_badnet", 1, 2),
        ("finetune_badnet", 2, 2),
        ("finetune_goodnet", None, 2),
        ("finetune_goodnet", 1, 2),
        ("finetune_goodnet", 2, 2),
        ("gate", None, None),
        ("done", None, None),
    ]
    assert {p.stage for p in seen} == set(STAGES)
    assert set(seen[2].losses) >= {"G", "D", "cycle", "identity"}
    assert set(seen[6].losses) == {"loss"} and seen[6].losses["loss"] > 0
    assert all(not p.losses for p in seen if p.epoch is None)
    assert [p.elapsed_s for p in seen] == sorted(p.elapsed_s for p in seen)
    assert polls == list(range(1, len(seen)))  # after every report but "done"
    assert outcome.badnet.device.type == "cpu" and outcome.goodnet.device.type == "cpu"


def test_cancelled_repair_keeps_only_the_checkpoint_and_resumes(
    deployment: tuple[Path, torch.Tensor], tmp_path: Path
) -> None:
    path, quarantine = deployment
    bundle = load_bundle(path)
    ckpt = tmp_path / "ckpt"
    cfg = RepairConfig(
        profile="test", cyclegan_epochs=3, finetune_epochs=1, theta=0.99, checkpoint_dir=str(ckpt)
    )
    seen: list[RepairProgress] = []

    def after_first_cyclegan_epoch() -> bool:
        return seen[-1].stage == "trigger_model" and seen[-1].epoch == 1

    with pytest.raises(RepairCancelled, match="trigger_model, epoch 1"):
        repair(bundle, quarantine, cfg, progress=False, on_progress=seen.append,
               should_cancel=after_first_cyclegan_epoch)  # fmt: skip
    assert seen[-1].stage == "trigger_model" and seen[-1].epoch == 1
    assert [p.name for p in ckpt.iterdir()] == [CHECKPOINT_FILE]
    outcome = repair(bundle, quarantine, cfg, progress=False)
    assert outcome.poison.report()["resumed_from_epoch"] == 1
    assert outcome.poison.report()["epochs_done"] == 3


def test_cancel_between_stages_and_during_finetune(deployment: tuple[Path, torch.Tensor]) -> None:
    path, quarantine = deployment
    bundle = load_bundle(path)
    cfg = RepairConfig(profile=MEAN_DIFF, finetune_epochs=2, theta=0.99)
    with pytest.raises(RepairCancelled, match=r"\(purify\)"):
        repair(bundle, quarantine, cfg, progress=False, should_cancel=lambda: True)
    seen: list[RepairProgress] = []

    def during_goodnet() -> bool:
        return seen[-1].stage == "finetune_goodnet" and seen[-1].epoch == 1

    with pytest.raises(RepairCancelled, match="finetune_goodnet, epoch 1"):
        repair(bundle, quarantine, cfg, progress=False, on_progress=seen.append,
               should_cancel=during_goodnet)  # fmt: skip
    assert [p.stage for p in seen if p.epoch is None] == [
        "purify",
        "trigger_model",
        "treatment",
        "finetune_badnet",
        "finetune_goodnet",
    ]


def test_repair_in_store_locks_publishes_and_passes_callbacks(
    deployment: tuple[Path, torch.Tensor], tmp_path: Path
) -> None:
    path, quarantine = deployment
    store = ModelStore(tmp_path / "store")
    store.import_bundle("d", path, activate=True)
    seen: list[RepairProgress] = []
    cfg = RepairConfig(profile=MEAN_DIFF, finetune_epochs=1, theta=0.5)
    done = repair_in_store(store, "d", quarantine, cfg, on_progress=seen.append, device="cpu")
    assert (done.parent, done.version, done.activated) == ("v0001", "v0002", True)
    assert store.active("d") == "v0002" and store.manifest("d", "v0002").parent == "v0001"
    assert seen[-1].stage == "done"
    pinned = repair_in_store(store, "d", lambda b: quarantine, cfg, version="v0001",
                             activate=False)  # fmt: skip
    assert (pinned.parent, pinned.version, pinned.activated) == ("v0001", "v0003", False)
    assert store.active("d") == "v0002"
    failing = RepairConfig(profile=MEAN_DIFF, finetune_epochs=1, finetune_lr=5.0, theta=0.02)
    gated = repair_in_store(store, "d", quarantine, failing)
    assert gated.version is None and not gated.outcome.passed_gate
    # The refused nets are kept as a rejected candidate, never active (tests/test_gate_candidates).
    assert gated.candidate == "v0004" and not gated.activated and store.active("d") == "v0002"
    assert store.versions("d") == ["v0001", "v0002", "v0003", "v0004"]
    with store.repair_lock("d"), pytest.raises(RepairLockedError):
        repair_in_store(store, "d", quarantine, cfg)
    with pytest.raises(RepairCancelled):
        repair_in_store(store, "d", quarantine, cfg, should_cancel=lambda: True)
    assert store.versions("d") == ["v0001", "v0002", "v0003", "v0004"]
