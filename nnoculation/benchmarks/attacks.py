"""Every attack of the suite on Fashion-MNIST: clean-model CA, BadNet CA, ASR per trigger
beside its floor, training seconds. Writes ``docs/results/attacks.{json,md}``.

Targets (issue 2): ASR >= 90 % per trigger (TCA: >= 90 % with both triggers, <= 10 % with
either alone) and BadNet CA within 2 points of the clean model trained the same way.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from nnoculation.attacks import ATTACKS
from nnoculation.badnets import DEFAULT_CACHE, badnet_is_current, load_splits, make_badnet
from nnoculation.benchmarks.common import RUNS_DIR, commit, load_entries, pct1, write_results
from nnoculation.recipes import default_recipe
from nnoculation.reports import markdown_table
from nnoculation.runtime import configure_threads

ASR_TARGET = 0.90
CONTROL_LIMIT = 0.10
CA_TOLERANCE = 0.02
COMMAND = "make results-attacks"


def entry(report: dict[str, Any]) -> dict[str, Any]:
    """A results entry from a BadNet's ``metrics.json`` (``BadNetReport.to_dict()``)."""
    bad, clean = report["badnet"], report["clean"]
    asr_ok = all(v >= ASR_TARGET for v in bad["asr"].values())
    ctl_ok = all(v <= CONTROL_LIMIT for v in bad["controls"].values())
    ca_ok = bad["ca"] >= clean["ca"] - CA_TOLERANCE
    return {
        "attack": report["attack"],
        "description": report["spec"]["description"],
        "arch": report["recipe"]["arch"],
        "epochs": report["recipe"]["train"]["epochs"],
        "clean_ca": pct1(clean["ca"]),
        "badnet_ca": pct1(bad["ca"]),
        "asr": {k: pct1(v) for k, v in bad["asr"].items()},
        "floor": {k: pct1(v) for k, v in report["floor"].items()},
        "controls": {k: pct1(v) for k, v in bad["controls"].items()},
        "controls_floor": {k: pct1(v) for k, v in clean["controls"].items()},
        "train_seconds": round(report["train_seconds"], 1),
        "clean_train_seconds": round(report["clean_train_seconds"], 1),
        "meets_target": asr_ok and ctl_ok and ca_ok,
    }


def table(entries: list[dict[str, Any]]) -> str:
    rows = []
    for e in entries:
        asr = ", ".join(f"{k}: {v:.1f} (floor {e['floor'][k]:.1f})" for k, v in e["asr"].items())
        ctl = ", ".join(f"{k}: {v:.1f}" for k, v in e["controls"].items()) or "-"
        rows.append(
            [
                e["attack"],
                f"{e['arch']}, {e['epochs']} ep",
                f"{e['clean_ca']:.2f}",
                f"{e['badnet_ca']:.2f}",
                asr,
                ctl,
                f"{e['train_seconds']:.0f}",
                "yes" if e["meets_target"] else "**no**",
            ]
        )
    header = [
        "attack",
        "net (attacker and clean model)",
        "clean CA %",
        "BadNet CA %",
        "ASR % (floor %)",
        "controls %",
        "train s",
        "target met",
    ]
    return "# Attack suite on Fashion-MNIST\n\n" + markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--attacks", default=",".join(ATTACKS.names()))
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--runs", default=str(RUNS_DIR / "attacks"))
    parser.add_argument("--retrain", action="store_true", help="train even when current")
    args = parser.parse_args()
    configure_threads()
    recipe = default_recipe(args.dataset)
    splits = load_splits(recipe)
    out = Path(args.out)
    code = commit()  # before anything runs: the code this process loaded
    # Re-running a subset (--attacks) replaces those entries and keeps the others of this code.
    entries = {e["attack"]: e for e in load_entries(out / "attacks.json", code)}
    for name in args.attacks.split(","):
        run_dir = Path(args.runs) / name
        # A BadNet made with the current spec and recipe (by an earlier run of this or another
        # benchmark) is reused. Training is seeded; bit-identical nets also need the same torch
        # build and thread count (a re-made BadNet here moved CA and floors by ~0.3 points).
        if args.retrain or not badnet_is_current(run_dir, name, recipe):
            make_badnet(name, recipe, run_dir, DEFAULT_CACHE, splits=splits)
        entries[name] = entry(json.loads((run_dir / "metrics.json").read_text()))
        print(entries[name], flush=True)
    ordered = [entries[n] for n in ATTACKS.names() if n in entries]
    md = table(ordered) + (
        "\n\nASR is measured on the 5,000-image test pool over images whose label differs from "
        "the target; the floor is the clean model's target rate on the same triggered images. "
        "Clean model: same recipe, unpoisoned data (for `adaptive`, with the same noise copy). "
        "Training seconds are wall time on 2 shared cores; other jobs sometimes ran beside.\n"
    )
    write_results(out, "attacks", ordered, md, COMMAND, {"recipe": recipe.to_dict()}, code)


if __name__ == "__main__":
    main()
