"""Pre-deployment defense on Fashion-MNIST BadNets: the picked alpha / gamma, GoodNet CA and
ASR beside the BadNet's and the floor, cells trained and wall seconds of the search, plus one
whole grid (Table 2 / Figure 4). Writes ``docs/results/predeploy.{json,md}`` and heatmaps.

The peer measured in the same run is the paper's ablation "NNoculation w/o {A}" (Table 13):
retraining at the picked alpha with no noise copy, to show what the noise buys.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

from nnoculation.badnets import attack_recipe, current_badnet, load_splits
from nnoculation.benchmarks.common import (
    RUNS_DIR,
    commit,
    fmt,
    load_entries,
    pct1,
    write_results,
)
from nnoculation.metrics import evaluate
from nnoculation.pipeline import predeploy_to_dir
from nnoculation.predeploy import PredeployConfig, train_cell
from nnoculation.recipes import Recipe, default_recipe
from nnoculation.reports import grid_markdown, markdown_table
from nnoculation.runtime import configure_threads

DEFAULT_ATTACKS = "patch,all-to-all,blended,varloc-patch,fsa,adaptive"
FULL_GRID_ATTACK = "patch"
ASR_TARGET = 0.40
SEARCH_SECONDS_TARGET = 180.0
TIMED_ARCH = "small_cnn"  # the search-time target is set for the small CNN (issue 2)
COMMAND = "make results-predeploy"


def _asr(values: dict[str, float]) -> float | list[float]:
    figures = [pct1(v) for v in values.values()]
    return figures[0] if len(figures) == 1 else figures


def run_one(
    name: str, recipe: Recipe, runs: Path, out: Path, full_grid: bool, splits: Any
) -> dict[str, Any]:
    bundle, attack, floor = current_badnet(name, recipe, runs.parent / "attacks" / name, splits)
    badnet = bundle.net("badnet")
    cfg = PredeployConfig(
        alpha0=recipe.train.lr, optimizer=recipe.train.optimizer, full_grid=full_grid
    )
    run_dir = runs / (name + ("-full-grid" if full_grid else ""))
    outcome = predeploy_to_dir(badnet, splits, cfg, run_dir, attack=attack, floor=floor)
    result = outcome.result
    assert result.badnet_test is not None
    arch = attack_recipe(recipe, attack).arch
    entry: dict[str, Any] = {
        "attack": name,
        "arch": arch,
        "badnet": {"ca": pct1(result.badnet_test.ca), "asr": _asr(result.badnet_test.asr)},
        "floor": _asr(floor),
        "alpha": None if result.picked is None else result.picked.alpha,
        "gamma": None if result.picked is None else result.picked.gamma,
        "goodnet": None,
        "cells_trained": result.cells_trained,
        "seconds": round(result.seconds, 1),
        "full_grid": full_grid,
        "baseline_holdout_ca": pct1(result.baseline_ca),
    }
    if result.goodnet_test is not None and result.picked is not None:
        entry["goodnet"] = {
            "ca": pct1(result.goodnet_test.ca),
            "asr": _asr(result.goodnet_test.asr),
        }
        t0 = time.perf_counter()
        peer = train_cell(badnet, splits.retrain, result.picked.alpha, 0.0, cfg)
        peer_eval = evaluate(peer, splits.test, attack)
        entry["peer_no_noise"] = {
            "ca": pct1(peer_eval.ca),
            "asr": _asr(peer_eval.asr),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        worst = max(result.goodnet_test.asr.values())
        entry["meets_target"] = bool(
            worst <= ASR_TARGET
            and result.picked.holdout_ca >= result.baseline_ca - cfg.theta
            and (full_grid or arch != TIMED_ARCH or result.seconds <= SEARCH_SECONDS_TARGET)
        )
    if full_grid:
        for png in ("heatmap_ca.png", "heatmap_asr.png"):
            shutil.copy(run_dir / png, out / f"predeploy_{name}_{png}")
        entry["grid_markdown"] = {
            "holdout_ca": grid_markdown(result, "holdout_ca"),
            "test_asr": grid_markdown(result, "test_asr"),
        }
    return entry


def markdown(entries: list[dict[str, Any]]) -> str:
    rows = []
    for e in entries:
        if e["full_grid"]:
            continue
        good = e["goodnet"] or {}
        peer = e.get("peer_no_noise") or {}
        rows.append(
            [
                e["attack"],
                e["arch"],
                fmt(e["badnet"]["ca"]),
                fmt(e["badnet"]["asr"]),
                fmt(e["floor"]),
                f"{e['alpha']:.4g}" if e["alpha"] else "-",
                f"{e['gamma']:.0%}" if e["gamma"] else "-",
                fmt(good.get("ca")),
                fmt(good.get("asr")),
                fmt(peer.get("ca")),
                fmt(peer.get("asr")),
                str(e["cells_trained"]),
                f"{e['seconds']:.0f}",
                "yes" if e.get("meets_target") else "**no**",
            ]
        )
    header = [
        "attack",
        "BadNet arch",
        "BadNet CA",
        "BadNet ASR",
        "floor",
        "alpha",
        "gamma",
        "GoodNet CA",
        "GoodNet ASR",
        "w/o noise CA",
        "w/o noise ASR",
        "cells",
        "search s",
        "target met",
    ]
    parts = [
        "# Pre-deployment defense on Fashion-MNIST",
        "",
        "All figures in %, on the 5,000-image test pool; ASR beside its floor (clean model, same "
        "triggered images). `w/o noise` is the peer: retraining at the picked alpha without the "
        "noisy copy (the paper's ablation, Table 13). Selection uses only the hold-out part of the "
        "validation set; theta = 3 points. Targets: GoodNet ASR <= 40 %, GoodNet hold-out CA "
        "within theta, and for small-CNN BadNets a search of at most 3 minutes (the all-to-all "
        "attacker trains the larger BatchNorm CNN, see `attacks.md`).",
        "",
        markdown_table(header, rows),
    ]
    for e in entries:
        if e["full_grid"]:
            parts += [
                "",
                f"## Whole grid for `{e['attack']}` (Table 2 style)",
                "",
                f"BadNet hold-out CA {e['baseline_holdout_ca']:.2f} %; "
                "bold: within theta; *: picked; "
                f"{e['cells_trained']} cells in {e['seconds']:.0f} s.",
                "",
                "Hold-out CA %:",
                "",
                e["grid_markdown"]["holdout_ca"],
                "",
                "Test ASR % (worst trigger):",
                "",
                e["grid_markdown"]["test_asr"],
                "",
                f"![CA heatmap](predeploy_{e['attack']}_heatmap_ca.png) "
                f"![ASR heatmap](predeploy_{e['attack']}_heatmap_asr.png)",
            ]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--attacks", default=DEFAULT_ATTACKS)
    parser.add_argument("--full-grid-attack", default=FULL_GRID_ATTACK)
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--runs", default=str(RUNS_DIR / "predeploy"))
    args = parser.parse_args()
    configure_threads()
    code = commit()  # before anything runs: the code this process loaded
    recipe = default_recipe(args.dataset)
    splits = load_splits(recipe)
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    # Re-running a subset replaces those entries and keeps the others of the same code.
    earlier = load_entries(out / "predeploy.json", code)
    entries = {(e["attack"], e["full_grid"]): e for e in earlier}
    for name in filter(None, args.attacks.split(",")):
        entry = run_one(name, recipe, runs, out, False, splits)
        entries[(name, False)] = entry
        print({k: v for k, v in entry.items() if k != "grid_markdown"}, flush=True)
    if args.full_grid_attack:
        name = args.full_grid_attack
        entries[(name, True)] = run_one(name, recipe, runs, out, True, splits)
    ordered = sorted(entries.values(), key=lambda e: (e["full_grid"], e["attack"]))
    write_results(
        out, "predeploy", ordered, markdown(ordered), COMMAND, {"recipe": recipe.to_dict()}, code
    )


if __name__ == "__main__":
    main()
