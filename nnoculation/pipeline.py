"""Pre-deployment end to end: search, then write the deployment bundle and the reports.

The deployment bundle holds the BadNet, the GoodNet, the defender's validation set (the
repair stage needs it: domain A of the CycleGAN and the clean half of the fine-tuning set)
and the provenance of the choice.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch

from models.nets import Net
from models.store_base import BundleStore
from nnoculation.bundle_io import write_bundle_dir
from nnoculation.data.imageset import ImageSet
from nnoculation.data.splits import Splits
from nnoculation.predeploy import PredeployConfig, PredeployResult, run_predeploy
from nnoculation.reports import grid_markdown, heatmap, markdown_table, pct

if TYPE_CHECKING:  # annotations only: importing this module must not load the attack suite
    from nnoculation.metrics import EvalAttack  # a catalog AttackSpec or a user's triggered set

DEPLOYMENT_DIR = "bundle"
VALIDATION_GROUP = "validation"


@dataclass
class PredeployOutcome:
    result: PredeployResult
    report: dict[str, Any]
    out_dir: Path


# The memorisation warning (see :func:`check_validation`): the BadNet's CA on the validation
# images may exceed its CA on unseen images by chance only within MEMORISATION_Z standard
# errors of the difference, and a gap under MEMORISATION_MIN_GAP is too small to matter.
MEMORISATION_MIN_GAP = 0.01  # 1 point of CA
MEMORISATION_Z = 2.5  # one-sided: a net that never saw the images warns in ~0.6 % of draws


@dataclass(frozen=True)
class ValidationCheck:
    """Where the validation set came from, and whether the BadNet looks as if it was trained
    on it: its CA on the validation images (retrain + hold-out) against its CA on the unseen
    images, the stream and test pools (the rest of the test split)."""

    source: str  # "train" or "test": the publisher's split the validation set was drawn from
    sizes: dict[str, int]
    retrain_ca: float
    holdout_ca: float
    validation_ca: float
    unseen_images: int  # the stream and test pools together
    unseen_ca: float | None  # None (and no verdict) when both pools are empty
    gap: float | None  # validation_ca - unseen_ca
    standard_error: float | None  # of the gap, for two independent samples
    z: float | None  # gap / standard_error
    min_gap: float
    z_threshold: float
    memorised: bool
    warning: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _per_class(correct: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[list[int], list[int]]:
    """Images and correct answers per class."""
    n = torch.bincount(labels, minlength=k).tolist()
    ok = torch.bincount(labels, weights=correct, minlength=k).round().long().tolist()
    return n, ok


def _weighted_ca(n: list[int], ok: list[int], weights: list[float]) -> tuple[float, float]:
    """Class-weighted accuracy and its variance (per-class binomial errors; the rate in the
    variance is ``(ok + 0.5) / (n + 1)``, so a class answered all right or all wrong still
    counts as uncertain)."""
    ca = sum(w * o / c for w, c, o in zip(weights, n, ok, strict=True) if w)
    var = sum(
        w * w * ((o + 0.5) / (c + 1)) * (1 - (o + 0.5) / (c + 1)) / c
        for w, c, o in zip(weights, n, ok, strict=True)
        if w
    )
    return ca, var


def check_validation(
    badnet: Net,
    splits: Splits,
    min_gap: float = MEMORISATION_MIN_GAP,
    z_threshold: float = MEMORISATION_Z,
) -> ValidationCheck:
    """Measure whether ``badnet`` looks as if it memorised the validation images.

    The rule: warn when the BadNet's CA on the validation images is above its CA on the
    unseen images (the stream and test pools together) by at least ``min_gap`` (1 point)
    *and* by at least ``z_threshold`` (2.5) standard errors of that difference. A net that
    never saw either set labels both as well on average, so the gap is noise around zero (a
    net that never saw them warns in about 0.6 % of draws); a net trained on the validation
    images labels them better than images it never saw (the generalisation gap). The 1-point
    floor keeps a significant but negligible gap (large pools) quiet, the z-test keeps small
    pools from warning on noise. The unseen CA is weighted to the validation set's class mix
    (classes either set lacks are left out of both), so a pool with another class balance does
    not pass for a gap. Only the warning uses the pools: nothing in the search depends on it.
    The pools come from the test split, so the comparison means something when the validation
    set is drawn from the training split, and reads zero on average when it comes from the
    test split too.
    """
    unseen = ImageSet.concat([splits.stream, splits.test])
    k = splits.retrain.num_classes
    retrain_ok = (badnet.predict(splits.retrain.images) == splits.retrain.labels).float()
    holdout_ok = (badnet.predict(splits.holdout.images) == splits.holdout.labels).float()
    val_labels = torch.cat([splits.retrain.labels, splits.holdout.labels])
    n_val, ok_val = _per_class(torch.cat([retrain_ok, holdout_ok]), val_labels, k)
    val_ca = sum(ok_val) / sum(n_val)
    n_un, ok_un = _per_class(
        (badnet.predict(unseen.images) == unseen.labels).float(), unseen.labels, k
    )
    shared = [a > 0 and b > 0 for a, b in zip(n_val, n_un, strict=True)]
    total = sum(c for c, keep in zip(n_val, shared, strict=True) if keep)
    unseen_ca = gap = se = z = None
    memorised, warning = False, None
    if total:  # else no class is in both sets (e.g. empty pools): no verdict
        weights = [c / total if keep else 0.0 for c, keep in zip(n_val, shared, strict=True)]
        val_ca, var_val = _weighted_ca(n_val, ok_val, weights)
        unseen_ca, var_un = _weighted_ca(n_un, ok_un, weights)
        gap = val_ca - unseen_ca
        se = math.sqrt(var_val + var_un)
        z = gap / se
        memorised = gap >= min_gap and z >= z_threshold
        if memorised:
            remedy = "use images it never saw"
            if splits.validation_source == "train":
                remedy = "draw it from the test split (`--validation-source test`) or " + remedy
            warning = (
                f"the BadNet looks memorised on its validation set: its CA on the {sum(n_val)} "
                f"validation images ({pct(val_ca)} %, drawn from the {splits.validation_source} "
                f"split) is {100 * gap:.1f} points above its CA on the {len(unseen)} unseen "
                f"images of the stream and test pools ({pct(unseen_ca)} %; z = {z:.1f}; the "
                f"warning needs >= {100 * min_gap:g} point and z >= {z_threshold:g}). It was "
                "probably trained on them, which makes the theta rule and the repair's "
                f"validation gate stricter than on new inputs; {remedy}"
            )
    return ValidationCheck(
        source=splits.validation_source,
        sizes=splits.sizes(),
        retrain_ca=float(retrain_ok.mean()),
        holdout_ca=float(holdout_ok.mean()),
        validation_ca=val_ca,
        unseen_images=len(unseen),
        unseen_ca=unseen_ca,
        gap=gap,
        standard_error=se,
        z=z,
        min_gap=min_gap,
        z_threshold=z_threshold,
        memorised=memorised,
        warning=warning,
    )


def validation_tensors(splits: Splits) -> dict[str, Any]:
    return {
        "retrain_images": splits.retrain.images,
        "retrain_labels": splits.retrain.labels,
        "holdout_images": splits.holdout.images,
        "holdout_labels": splits.holdout.labels,
    }


def build_report(
    result: PredeployResult,
    attack: EvalAttack | None,
    floor: dict[str, float] | None,
    source: dict[str, Any],
    validation: ValidationCheck,
) -> dict[str, Any]:
    """``report.json``: the search's result with where its data came from (``validation``:
    the validation set's source split, the pools' sizes and the memorisation check)."""
    picked = result.picked
    return {
        "source": source,
        "validation": validation.to_dict(),
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
    lines.append(f"Search: {result.config.mode}.\n")
    if result.pick_at_grid_edge:
        lines.append(f"**{EDGE_WARNING}**\n")
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
    lines += validation_markdown(report["validation"])
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


def validation_markdown(check: dict[str, Any]) -> list[str]:
    """The report's lines on the validation set: its source, the pools, the memorisation check."""
    sizes = check["sizes"]
    lines = [
        "## Validation set",
        "",
        f"Drawn from the **{check['source']}** split: {sizes['retrain']} images to retrain, "
        f"{sizes['holdout']} held out; stream pool {sizes['stream']}, test pool {sizes['test']}.",
        "",
    ]
    if check["unseen_ca"] is not None:
        lines += [
            f"BadNet CA on the validation images {pct(check['validation_ca'])} % (retrain "
            f"{pct(check['retrain_ca'])} %, hold-out {pct(check['holdout_ca'])} %), on the "
            f"{check['unseen_images']} unseen images of the stream and test pools "
            f"{pct(check['unseen_ca'])} %: a gap of "
            f"{100 * check['gap']:.1f} points, z = {check['z']:.1f} (warning at >= "
            f"{100 * check['min_gap']:g} point and z >= {check['z_threshold']:g}).",
            "",
        ]
    if check["warning"]:
        lines += [f"**Warning**: {check['warning']}.", ""]
    return lines


def predeploy_to_dir(
    badnet: Net,
    splits: Splits,
    cfg: PredeployConfig,
    out_dir: Path,
    attack: EvalAttack | None = None,
    floor: dict[str, float] | None = None,
    source: dict[str, Any] | None = None,
    warn: Callable[[str], None] | None = None,
) -> PredeployOutcome:
    """Run the search and write ``out_dir/{bundle/, report.json, report.md, heatmap_*.png}``.

    Before the search, :func:`check_validation` measures whether the BadNet looks memorised on
    the validation set; its warning goes to ``warn`` at once and, with the validation set's
    source, into the reports and the bundle's provenance.
    The bundle is written only when a GoodNet was found; the reports always are, before it.
    A bundle that cannot be written (e.g. torch refuses to export a net) raises
    :class:`PredeploySaveError` naming the pick and the reports, with the GoodNet's weights kept
    in ``out_dir/goodnet_weights.safetensors``.
    """
    badnet.check_trainable()  # a refused net fails before any other work
    check = check_validation(badnet, splits)
    if check.warning and warn is not None:
        warn(check.warning)
    result = run_predeploy(
        badnet,
        splits.retrain,
        splits.holdout,
        cfg,
        test=splits.test if attack is not None else None,
        attack=attack,
    )
    if result.pick_at_grid_edge and warn is not None:
        warn(EDGE_WARNING)
    report = build_report(result, attack, floor, source or {}, check)
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
            _write_deployment(
                out_dir, badnet, result.goodnet, result, splits, source or {}, files, check
            )
        except Exception as err:
            raise PredeploySaveError(_save_failure(out_dir, result.goodnet, result, err)) from err
    return PredeployOutcome(result, report, out_dir)


EDGE_WARNING = (
    "The pick is at the grid's largest alpha: a wider grid might pick a larger one "
    "(add larger `--alpha-multiples`)."
)


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
    check: ValidationCheck,
) -> None:
    """Write the deployment bundle: both nets, the validation set and the provenance (with
    the validation set's source and memorisation check)."""
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
            "validation": check.to_dict(),
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
