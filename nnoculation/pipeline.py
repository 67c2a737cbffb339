"""Pre-deployment end to end: search, then write the deployment bundle and the reports.

The deployment bundle holds the BadNet, the GoodNet, the defender's validation set (the
repair stage needs it: domain A of the CycleGAN and the clean half of the fine-tuning set)
and the provenance of the choice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch

from models.nets import Net
from models.store_base import BundleStore
from nnoculation.bundle_io import write_bundle_dir
from nnoculation.data.splits import Splits
from nnoculation.predeploy import PredeployConfig, PredeployResult, run_predeploy
from nnoculation.reports import grid_markdown, heatmap, markdown_table, pct

if TYPE_CHECKING:  # annotations only: importing this module must not load the attack suite
    from nnoculation.attacks import AttackSpec

DEPLOYMENT_DIR = "bundle"
VALIDATION_GROUP = "validation"


@dataclass
class PredeployOutcome:
    result: PredeployResult
    report: dict[str, Any]
    out_dir: Path


def validation_tensors(splits: Splits) -> dict[str, Any]:
    return {
        "retrain_images": splits.retrain.images,
        "retrain_labels": splits.retrain.labels,
        "holdout_images": splits.holdout.images,
        "holdout_labels": splits.holdout.labels,
    }


def build_report(
    result: PredeployResult,
    attack: AttackSpec | None,
    floor: dict[str, float] | None,
    source: dict[str, Any],
) -> dict[str, Any]:
    picked = result.picked
    return {
        "source": source,
        "attack": None if attack is None else attack.name,
        "theta": result.config.theta,
        "baseline_holdout_ca": result.baseline_ca,
        "alpha": None if picked is None else picked.alpha,
        "gamma": None if picked is None else picked.gamma,
        "floor": floor,
        **result.to_dict(),
    }


def report_markdown(report: dict[str, Any], result: PredeployResult) -> str:
    lines = ["# Pre-deployment report", ""]
    if report["attack"]:
        lines.append(f"Attack used for evaluation only: `{report['attack']}`.\n")
    if result.picked is None:
        lines.append(
            "**No GoodNet**: no grid cell kept hold-out CA within "
            f"theta = {result.config.theta:.0%} "
            f"of the BadNet's {pct(result.baseline_ca)} %.\n"
        )
    else:
        lines.append(
            f"Picked alpha = {result.picked.alpha:.4g}, gamma = {result.picked.gamma:.0%} after "
            f"training {result.cells_trained} of "
            f"{len(result.config.alphas) * len(result.config.gammas)} cells in "
            f"{result.seconds:.0f} s.\n"
        )
    rows = []
    floor = report.get("floor") or {}
    for role, ev in (("BadNet", result.badnet_test), ("GoodNet", result.goodnet_test)):
        if ev is not None:
            asr = ", ".join(f"{k} {pct(v)}" for k, v in ev.asr.items()) or "-"
            rows.append([role, pct(ev.ca), asr])
    if floor:
        rows.append(
            ["floor (clean model)", "-", ", ".join(f"{k} {pct(v)}" for k, v in floor.items())]
        )
    if rows:
        lines += ["## Test pool", "", markdown_table(["net", "CA %", "ASR %"], rows), ""]
    lines += [
        "## Grid: hold-out CA % (bold: within theta; *: picked)",
        "",
        f"BadNet hold-out CA: {pct(result.baseline_ca)} %",
        "",
        grid_markdown(result, "holdout_ca"),
        "",
    ]
    if result.badnet_test is not None and any(c.test for c in result.cells):
        lines += ["## Grid: test ASR % (worst trigger)", "", grid_markdown(result, "test_asr"), ""]
    return "\n".join(lines)


def predeploy_to_dir(
    badnet: Net,
    splits: Splits,
    cfg: PredeployConfig,
    out_dir: Path,
    attack: AttackSpec | None = None,
    floor: dict[str, float] | None = None,
    source: dict[str, Any] | None = None,
) -> PredeployOutcome:
    """Run the search and write ``out_dir/{bundle/, report.json, report.md, heatmap_*.png}``.

    The bundle is written only when a GoodNet was found; the reports always are, before it.
    A bundle that cannot be written (e.g. torch refuses to export a net) raises
    :class:`PredeploySaveError` naming the pick and the reports, with the GoodNet's weights kept
    in ``out_dir/goodnet_weights.safetensors``.
    """
    result = run_predeploy(
        badnet,
        splits.retrain,
        splits.holdout,
        cfg,
        test=splits.test if attack is not None else None,
        attack=attack,
    )
    report = build_report(result, attack, floor, source or {})
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "report.json": (json.dumps(report, indent=2) + "\n").encode(),
        "report.md": report_markdown(report, result).encode(),
    }
    for name, data in files.items():
        (out_dir / name).write_bytes(data)
    heatmap(result, "holdout_ca", out_dir / "heatmap_ca.png", "hold-out CA %")
    if attack is not None:
        heatmap(result, "test_asr", out_dir / "heatmap_asr.png", "test ASR % (worst trigger)")
    if result.goodnet is not None:
        try:
            _write_deployment(out_dir, badnet, result.goodnet, result, splits, source or {}, files)
        except Exception as err:
            raise PredeploySaveError(_save_failure(out_dir, result.goodnet, result, err)) from err
    return PredeployOutcome(result, report, out_dir)


class PredeploySaveError(ValueError):
    """The search finished and its reports are written, but the bundle could not be saved."""


GOODNET_WEIGHTS = "goodnet_weights.safetensors"


def _save_failure(out_dir: Path, goodnet: Net, result: PredeployResult, err: Exception) -> str:
    """The message for a bundle that could not be written. The GoodNet's weights are kept as
    plain tensors beside the reports (best effort), so the search is not lost."""
    where = str(out_dir / "report.json")
    if result.picked is not None:
        where = f"alpha = {result.picked.alpha:.4g}, gamma = {result.picked.gamma:.0%}, in {where}"
    kept = ""
    state = {
        name: tensor.detach().to("cpu").contiguous().clone()
        for name, tensor in goodnet.module.state_dict().items()
    }
    try:
        safetensors.torch.save_file(state, str(out_dir / GOODNET_WEIGHTS))
        kept = f"; the GoodNet's weights (its state dict) are in {out_dir / GOODNET_WEIGHTS}"
    except Exception:  # the save error is the one to report
        pass
    return f"the search finished ({where}) but the bundle could not be written: {err}{kept}"


def _write_deployment(
    out_dir: Path,
    badnet: Net,
    goodnet: Net,
    result: PredeployResult,
    splits: Splits,
    source: dict[str, Any],
    files: dict[str, bytes],
) -> None:
    """Write the deployment bundle: both nets, the validation set and the provenance."""
    write_bundle_dir(
        out_dir / DEPLOYMENT_DIR,
        name="deployment",
        nets={"badnet": badnet, "goodnet": goodnet},
        class_names=splits.retrain.class_names,
        tensors={VALIDATION_GROUP: validation_tensors(splits)},
        metrics={
            "baseline_holdout_ca": result.baseline_ca,
            "goodnet_holdout_ca": result.picked.holdout_ca if result.picked else None,
        },
        provenance={
            "predeploy": result.config.to_dict(),
            "alpha": result.picked.alpha if result.picked else None,
            "gamma": result.picked.gamma if result.picked else None,
            "source": source,
        },
        extra_files=files,
    )


def publish_deployment(
    outcome: PredeployOutcome, store: BundleStore, deployment: str, *, activate: bool = True
) -> str | None:
    """Publish the deployment bundle that :func:`predeploy_to_dir` wrote into ``store`` as a
    new version of ``deployment`` (checksums verified, id allocated by the store, no parent),
    active unless ``activate`` is False. Returns the version id, or None when the search found
    no GoodNet (no bundle was written, nothing is published)."""
    if outcome.result.goodnet is None:
        return None
    return store.import_bundle(deployment, outcome.out_dir / DEPLOYMENT_DIR, activate=activate)
