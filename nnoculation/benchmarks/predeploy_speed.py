"""Pre-deployment search speed: the old search (one cell at a time, exact) against the new one
(by default the CLI's: the same exact search with its cells trained side by side in one
single-thread worker process per CPU thread, :mod:`nnoculation.cell_pool`; ``--prune-margin``
adds pruning), and the whole grid's pick, for several BadNets. Writes
``docs/results/predeploy_speed.{json,md}``.

Entries (``--only NAME`` runs one): the zoo's small CNN, the zoo's BatchNorm CNN
(``cifar_cnn``), a LeNet-sized BatchNorm net of this benchmark's own trained on the *full*
Fashion-MNIST training split (so the defender's validation images were in its training set)
and imported as TorchScript, the same net imported as a ``.pt2`` program, and ResNet-18 on
28x28. Every BadNet is a patch BadNet; zoo BadNets come from the attack benchmark's cache.

For each: seconds, cells trained and the pick of the old and the new search in the same run,
the whole grid's pick (``same_pick``: both searches pick the whole grid's cell), the whole
grid's hold-out CA after every epoch of every cell, and from it the false-stop rate of several
pruning margins (:func:`nnoculation.predeploy.false_stops`), plus the picked GoodNet's test CA
and ASR. Results are written after every entry; an entry is reused on a later run only if it
was made by the same clean commit with the same settings.

The ``overlap`` entry (issue 12, point 2) takes the LeNet BadNet, trained on the *whole*
training split, and runs the defense both ways: with the validation set drawn from the training
split (images the BadNet was trained on) and from the test split (images it never saw). Each way
gets the default search, a stream until N = 200 are quarantined and one repair with the default
settings; the entry records the memorisation check, the GoodNet's CA / ASR, the gate's verdict
with the hold-out drop it judged, the repaired nets' drop on unseen images, and the ASR of what
is deployed after the repair (the repaired ensemble if the gate passed it, else the pre-repair
one). Every CA / ASR of that entry is measured on the test images the two ways have in common,
beside the floor: the target-label rate of a clean LeNet trained the same way on the same
triggered images.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.bundle import load_bundle
from models.importing import import_net
from models.nets import Net
from models.spec import InputSpec
from nnoculation.attacks import AttackSpec, get_attack
from nnoculation.badnets import current_badnet, input_spec_for, load_splits
from nnoculation.benchmarks.common import (
    RUNS_DIR,
    commit,
    fmt,
    load_entries,
    pct1,
    provenance,
    write_results,
)
from nnoculation.data.imageset import ImageSet
from nnoculation.data.sources import load_dataset
from nnoculation.data.splits import Splits, ValidationSource
from nnoculation.ensemble import Ensemble
from nnoculation.metrics import evaluate
from nnoculation.pipeline import DEPLOYMENT_DIR, predeploy_to_dir
from nnoculation.predeploy import (
    DEFAULT_ALPHA_MULTIPLES,
    DEFAULT_CELL_EPOCHS,
    DEFAULT_GAMMAS,
    PredeployConfig,
    PredeployResult,
    false_stops,
    run_predeploy,
)
from nnoculation.recipes import Recipe, default_recipe
from nnoculation.repair.engine import RepairConfig, repair
from nnoculation.reports import markdown_table
from nnoculation.runtime import configure_threads, default_device, seeded_rng
from nnoculation.stream import StreamConfig, simulate_stream
from nnoculation.training import TrainConfig, train

COMMAND = "python -m nnoculation.benchmarks.predeploy_speed"
STEM = "predeploy_speed"
ATTACK = "patch"
# On the small CNN's patch BadNet the cells of alpha 6x and 10x (none eligible but one) moved
# by up to 2.5 points of hold-out CA from one epoch to the next and sat 0.5-6 points below
# the bar; the pick was below the bar after epochs 1 and 3. A margin must stay well above that
# noise: 0.1 stopped nothing there, 0.02 stopped 7 of 12 cells (35 % of epochs) without a
# false stop, by luck rather than by design. The new search prunes only when asked (the CLI's
# default does not prune).
MARGINS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)  # false-stop rates measured on the whole grid
QUICK_ALPHA_MULTIPLES = (1.0, 3.0, 5.0)
QUICK_GAMMAS = (0.3, 0.6)
QUICK_EPOCHS = 2

# The benchmark's own LeNet-sized BadNet (batch norm), trained on the full training split.
LENET_RECIPE = TrainConfig(epochs=2, batch_size=64, lr=1e-3, optimizer="adam", seed=0)
EXPORT_BATCH_MAX = 4096


class LeNetBN(nn.Module):
    """LeNet-5 sized, with batch norm after each convolution and the first dense layer."""

    def __init__(self, channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, 5, padding=2),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.BatchNorm1d(120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@dataclass(frozen=True)
class Subject:
    """A BadNet to search for, with the attack that measures its ASR (evaluation only)."""

    badnet: Net
    attack: AttackSpec
    alpha0: float
    optimizer: str
    about: str


def _zoo(recipe: Recipe, arch: str, kwargs: dict[str, Any], epochs: int, about: str) -> Any:
    def make(splits: Splits, runs: Path) -> Subject:
        r = recipe.with_(arch=arch, arch_kwargs=kwargs, train=recipe.train.with_(epochs=epochs))
        # The small CNN with the default recipe is the attack benchmark's own patch BadNet.
        default = r == recipe
        folder = runs.parent / "attacks" / ATTACK if default else runs / "badnets" / arch
        bundle, attack, _floor = current_badnet(ATTACK, r, folder, splits)
        return Subject(bundle.net("badnet"), attack, r.train.lr, r.train.optimizer, about)

    return make


def _lenet_files(recipe: Recipe, splits: Splits, runs: Path) -> tuple[Path, Path, AttackSpec]:
    """The LeNet BadNet as TorchScript and .pt2, trained once (cached by its recipe)."""
    attack = get_attack(ATTACK, splits.attacker.num_classes, splits.attacker.shape)
    key = json.dumps(
        {"recipe": recipe.to_dict(), "train": LENET_RECIPE.to_dict(), "attack": attack.to_dict()},
        sort_keys=True,
    )
    folder = runs / "badnets" / f"lenet_bn-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    script, program = folder / "badnet.torchscript.pt", folder / "badnet.pt2"
    if script.exists() and program.exists():
        return script, program, attack
    folder.mkdir(parents=True, exist_ok=True)
    source = load_dataset(recipe.dataset)
    poisoned = attack.poison_training_set(source.train, seed=LENET_RECIPE.seed)  # all 60,000
    spec = input_spec_for(splits)
    with seeded_rng(LENET_RECIPE.seed):
        module = LeNetBN(spec.channels, splits.attacker.num_classes)
    train(Net(module, "export", spec, splits.attacker.num_classes), poisoned, LENET_RECIPE,
          desc="LeNet-BN BadNet")  # fmt: skip
    module.eval()
    torch.jit.save(torch.jit.script(module), str(script))
    batch = torch.export.Dim("batch", max=EXPORT_BATCH_MAX)
    example = (torch.zeros(8, *spec.shape),)
    exported = torch.export.export(module, example, dynamic_shapes=({0: batch},))
    torch.export.save(exported, str(program))
    (folder / "recipe.json").write_text(key + "\n")
    return script, program, attack


def _lenet_clean(recipe: Recipe, splits: Splits, runs: Path) -> Path:
    """A clean LeNet trained the BadNet's way on the clean training split: the floor's model."""
    script, _program, _attack = _lenet_files(recipe, splits, runs)
    path = script.parent / "clean.torchscript.pt"
    if path.exists():
        return path
    spec = input_spec_for(splits)
    with seeded_rng(LENET_RECIPE.seed):
        module = LeNetBN(spec.channels, splits.attacker.num_classes)
    source = load_dataset(recipe.dataset)
    train(Net(module, "export", spec, splits.attacker.num_classes), source.train, LENET_RECIPE,
          desc="LeNet-BN clean reference")  # fmt: skip
    module.eval()
    torch.jit.save(torch.jit.script(module), str(path))
    return path


def _lenet(which: str, recipe: Recipe) -> Any:
    def make(splits: Splits, runs: Path) -> Subject:
        script, program, attack = _lenet_files(recipe, splits, runs)
        path = script if which == "torchscript" else program
        spec: InputSpec = input_spec_for(splits)
        net = import_net(path, spec, splits.attacker.num_classes)
        about = f"LeNet-BN of the benchmark's own, full training split, imported as {which}"
        return Subject(net, attack, LENET_RECIPE.lr, LENET_RECIPE.optimizer, about)

    return make


def subjects(recipe: Recipe) -> dict[str, Callable[[Splits, Path], Subject]]:
    """Entry name -> how to make its BadNet."""
    return {
        "small_cnn": _zoo(
            recipe,
            "small_cnn",
            dict(recipe.arch_kwargs),
            recipe.train.epochs,
            "zoo small CNN (the attack benchmark's patch BadNet)",
        ),
        "bn_cnn": _zoo(
            recipe, "cifar_cnn", {"width": 16}, 2, "zoo BatchNorm CNN (cifar_cnn, width 16)"
        ),
        "lenet_bn_torchscript": _lenet("torchscript", recipe),
        "lenet_bn_pt2": _lenet("pt2", recipe),
        "resnet18": _zoo(recipe, "resnet18", {}, 1, "zoo ResNet-18 on 28x28 (1 training epoch)"),
    }


def _pick(result: PredeployResult) -> list[float] | None:
    return None if result.picked is None else [result.picked.alpha, result.picked.gamma]


def _summary(result: PredeployResult) -> dict[str, Any]:
    return {
        "mode": result.config.mode,
        "cells_at_once": result.extra.get("cells_at_once", 1),
        "workers": result.extra.get("workers", 1),
        "seconds": round(result.seconds, 1),
        "cells_trained": result.cells_trained,
        "cells_pruned": sum(c.pruned_after is not None for c in result.cells),
        "pick": _pick(result),
    }


def thread_layouts(one: PredeployResult, pooled: PredeployResult) -> dict[str, Any]:
    """How the whole grid differs when each cell trains on one thread in a worker instead of on
    every thread of one process: the picks, the cells whose eligibility flips, the largest
    hold-out CA difference (points)."""
    bar = one.baseline_ca - one.config.theta
    by_key = {(c.alpha, c.gamma): c for c in pooled.cells}
    flips = [
        [c.alpha, c.gamma]
        for c in one.cells
        if (c.holdout_ca >= bar) != (by_key[(c.alpha, c.gamma)].holdout_ca >= bar)
    ]
    diffs = [abs(c.holdout_ca - by_key[(c.alpha, c.gamma)].holdout_ca) for c in one.cells]
    return {
        "same_pick": _pick(one) == _pick(pooled),
        "eligibility_flips": flips,
        "max_holdout_ca_diff": pct1(max(diffs, default=0.0)),
    }


def run_entry(
    name: str, subject: Subject, splits: Splits, args: argparse.Namespace, code: str
) -> dict[str, Any]:
    """Old search, new search, the whole grid trained as the new search trains its cells and
    (when that differs) as the old one does, in that order, one after the other; ``code`` is
    the commit the running code was loaded from."""
    grid = {
        "alpha0": subject.alpha0,
        "optimizer": subject.optimizer,
        "alpha_multiples": tuple(args.alpha_multiples),
        "gammas": tuple(args.gammas),
        "epochs": args.epochs,
    }
    badnet = subject.badnet
    old = run_predeploy(badnet, splits.retrain, splits.holdout, PredeployConfig(**grid, exact=True))
    new_cfg = PredeployConfig(
        **grid,
        prune_margin=args.prune_margin,
        cells_at_once=args.cells_at_once,
        workers=args.workers,
    )
    new = run_predeploy(badnet, splits.retrain, splits.holdout, new_cfg)
    # Each search against the whole grid trained the same way: a cell's weights depend on the
    # threads it was trained on, and a cell near the bar may end on either side of it.
    full = run_predeploy(
        badnet,
        splits.retrain,
        splits.holdout,
        PredeployConfig(**grid, full_grid=True, track_epochs=True, workers=new_cfg.workers),
    )
    full_one = (
        full
        if new_cfg.workers == 1
        else run_predeploy(  # tracked too, so the two whole grids do the same work
            badnet,
            splits.retrain,
            splits.holdout,
            PredeployConfig(**grid, full_grid=True, track_epochs=True),
        )
    )
    entry: dict[str, Any] = {
        "name": name,
        "about": subject.about,
        "format": badnet.format,
        **provenance(code, str(badnet.device), date=False),
        "settings": _settings(args),
        "grid": {**grid, "alphas": list(new_cfg.alphas)},
        "baseline_holdout_ca": pct1(full.baseline_ca),
        "old": _summary(old),
        "new": _summary(new),
        "full_grid": _summary(full),
        "full_grid_one_process": _summary(full_one),
        "same_pick": _pick(old) == _pick(full_one) and _pick(new) == _pick(full),
        "thread_layouts": thread_layouts(full_one, full),
        "speedup": round(old.seconds / new.seconds, 2) if new.seconds > 0 else None,
        "false_stops": [
            false_stops(full.cells, full.baseline_ca, full.config.theta, m) for m in MARGINS
        ],
        "epoch_cas": {f"{c.alpha:.4g}/{c.gamma:g}": c.epoch_cas for c in full.cells},
    }
    t0 = time.perf_counter()
    badnet_eval = evaluate(badnet, splits.test, subject.attack)
    entry["badnet"] = {"ca": pct1(badnet_eval.ca), "asr": pct1(max(badnet_eval.asr.values()))}
    if new.goodnet is not None:
        good = evaluate(new.goodnet, splits.test, subject.attack)
        entry["goodnet"] = {"ca": pct1(good.ca), "asr": pct1(max(good.asr.values()))}
    entry["evaluation_seconds"] = round(time.perf_counter() - t0, 1)
    return entry


OVERLAP = "overlap"
OVERLAP_SOURCES: tuple[ValidationSource, ...] = ("train", "test")


def _figures(predictor: Any, test: ImageSet, attack: Any) -> dict[str, float]:
    ev = evaluate(predictor, test, attack)
    return {"ca": pct1(ev.ca), "asr": pct1(max(ev.asr.values()))}


def _common_test(recipe: Recipe) -> tuple[ImageSet, dict[ValidationSource, Splits]]:
    """Each source's splits, and the test-split images both test pools hold (seen by neither
    way's validation set nor stream)."""
    by_source = {src: load_splits(recipe.with_validation_source(src)) for src in OVERLAP_SOURCES}
    pools = []
    for split in by_source.values():
        where, idx = split.origin["test"]
        if where != "test":
            raise ValueError("the overlap case needs a data set with a test split of its own")
        pools.append(set(idx.tolist()))
    common = torch.tensor(sorted(set.intersection(*pools)))
    test_split = load_dataset(recipe.dataset).test
    assert test_split is not None  # checked by the "test" validation source above
    return test_split.subset(common), by_source


def run_overlap(recipe: Recipe, runs: Path, code: str) -> dict[str, Any]:
    """The overlap entry: the LeNet BadNet defended with validation data from each split."""
    common, by_source = _common_test(recipe)
    script, _program, attack = _lenet_files(recipe, by_source["train"], runs)
    spec = input_spec_for(by_source["train"])
    classes = by_source["train"].attacker.num_classes
    badnet = import_net(script, spec, classes)
    clean = import_net(_lenet_clean(recipe, by_source["train"], runs), spec, classes)
    floor = pct1(max(evaluate(clean, common, attack).asr.values()))
    ways = {}
    for src, splits in by_source.items():
        folder = runs / OVERLAP / src
        cfg = PredeployConfig(alpha0=LENET_RECIPE.lr, optimizer=LENET_RECIPE.optimizer)
        outcome = predeploy_to_dir(badnet, splits, cfg, folder, attack=attack)
        check = outcome.report["validation"]
        way: dict[str, Any] = {
            "validation_source": src,
            "sizes": check["sizes"],
            "memorised": check["memorised"],
            "validation_ca": pct1(check["validation_ca"]),
            "unseen_ca": pct1(check["unseen_ca"]),
            "gap_points": round(100 * check["gap"], 1),
            "z": round(check["z"], 1),
            "search": _summary(outcome.result),
            "baseline_holdout_ca": pct1(outcome.result.baseline_ca),
        }
        if outcome.result.goodnet is None:
            way["goodnet"] = None
            ways[src] = way
            continue
        bundle = load_bundle(folder / DEPLOYMENT_DIR)
        bad, good = bundle.net("badnet"), bundle.net("goodnet")
        deployed = Ensemble(bad, good)
        stream = simulate_stream(deployed, splits.stream, attack, StreamConfig())
        fixed = repair(bundle, stream.images, RepairConfig(), progress=False)
        candidate = Ensemble(fixed.badnet, fixed.goodnet)
        after = candidate if fixed.passed_gate else deployed
        hold = fixed.holdout
        way.update(
            {
                "badnet": _figures(bad, common, attack),
                "goodnet": _figures(good, common, attack),
                "ensemble_before_repair": _figures(deployed, common, attack),
                "quarantine": {
                    "size": int(stream.images.shape[0]),
                    "poisoned": int(stream.poisoned.sum()),
                },
                "gate": {
                    "passed": fixed.passed_gate,
                    "reason": fixed.reason,
                    "theta": fixed.theta,
                    "holdout_baseline": pct1(hold["baseline"]),
                    "holdout_drop_points": {
                        role: round(100 * (hold["baseline"] - hold[f"{role}_after"]), 1)
                        for role in ("badnet", "goodnet")
                    },
                },
                "repaired_candidate": {
                    "badnet": _figures(fixed.badnet, common, attack),
                    "goodnet": _figures(fixed.goodnet, common, attack),
                    "ensemble": _figures(candidate, common, attack),
                },
                "deployed_after_repair": {
                    "which": "repaired" if fixed.passed_gate else "pre-repair (gate refused)",
                    **_figures(after, common, attack),
                },
                "repair_seconds": {k: round(v, 1) for k, v in fixed.seconds.items()},
            }
        )
        way["unseen_drop_points"] = {
            role: round(way["badnet"]["ca"] - way["repaired_candidate"][role]["ca"], 1)
            for role in ("badnet", "goodnet")
        }
        ways[src] = way
    return {
        "name": OVERLAP,
        "kind": OVERLAP,
        "about": "LeNet-BN BadNet trained on the whole training split (TorchScript), defended "
        "with validation data from the training split and from the test split",
        **provenance(code, "cpu", date=False),
        "settings": {"overlap": True, "threads": torch.get_num_threads()},
        "attack": attack.name,
        "common_test_images": len(common),
        "floor": floor,
        "ways": ways,
    }


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """What makes an entry comparable: reused only when these and the commit match."""
    return {
        "alpha_multiples": list(args.alpha_multiples),
        "gammas": list(args.gammas),
        "epochs": args.epochs,
        "prune_margin": args.prune_margin,
        "cells_at_once": args.cells_at_once,
        "workers": args.workers,
        "threads": torch.get_num_threads(),
    }


def reusable(entry: dict[str, Any], args: argparse.Namespace, code: str) -> bool:
    """An earlier entry counts only if the same clean commit made it with the same settings."""
    settings = (
        {"overlap": True, "threads": torch.get_num_threads()}
        if entry.get("kind") == OVERLAP
        else _settings(args)
    )
    return (
        not code.endswith("-dirty")
        and code != "unknown"
        and entry.get("commit") == code
        and entry.get("settings") == settings
    )


def _pick_text(pick: list[float] | None) -> str:
    return "-" if pick is None else f"{pick[0]:.4g} / {pick[1]:.0%}"


def overlap_markdown(entry: dict[str, Any]) -> list[str]:
    """The overlap entry's section: one row per validation source."""
    rows = []
    for src, w in entry["ways"].items():
        if w.get("goodnet") is None:
            rows.append([src, "yes" if w["memorised"] else "no", f"{w['gap_points']:+.1f}",
                         _pick_text(w["search"]["pick"])] + ["-"] * 7)  # fmt: skip
            continue
        gate = w["gate"]
        drops = gate["holdout_drop_points"]
        unseen = w["unseen_drop_points"]
        rows.append(
            [
                src,
                "yes" if w["memorised"] else "no",
                f"{w['gap_points']:+.1f} (z {w['z']:.1f})",
                _pick_text(w["search"]["pick"]),
                f"{fmt(w['goodnet']['ca'])} / {fmt(w['goodnet']['asr'])}",
                f"{fmt(w['ensemble_before_repair']['ca'])} / "
                f"{fmt(w['ensemble_before_repair']['asr'])}",
                "passed" if gate["passed"] else "**refused**",
                f"{drops['badnet']:.1f} / {drops['goodnet']:.1f}",
                f"{unseen['badnet']:.1f} / {unseen['goodnet']:.1f}",
                f"{fmt(w['repaired_candidate']['ensemble']['ca'])} / "
                f"{fmt(w['repaired_candidate']['ensemble']['asr'])}",
                f"{fmt(w['deployed_after_repair']['ca'])} / "
                f"{fmt(w['deployed_after_repair']['asr'])} ({w['deployed_after_repair']['which']})",
            ]
        )
    header = ["validation from", "memorised?", "gap (points)", "pick", "GoodNet CA / ASR %",
              "ensemble CA / ASR % before repair", "gate", "hold-out drop bad / good",
              "unseen drop bad / good", "repaired ensemble CA / ASR %",
              "deployed after repair CA / ASR %"]  # fmt: skip
    thetas = {round(100 * w["gate"]["theta"], 1) for w in entry["ways"].values() if "gate" in w}
    theta = " / ".join(f"{t:g}" for t in sorted(thetas)) or "-"
    return [
        "## Validation data the BadNet was trained on, or not (the overlap case)",
        "",
        f"{entry['about']}. Attack `{entry['attack']}`; every CA / ASR on the "
        f"{entry['common_test_images']} test images both ways leave unseen; floor (a clean "
        f"LeNet trained the same way, same triggered images): {fmt(entry['floor'])} %. "
        "`gap`: the BadNet's CA on its validation images minus its CA on the unseen pools "
        "(the memorisation check). The gate judges the repaired nets' drop on the hold-out "
        f"images (points below the BadNet's hold-out CA; refused above theta = {theta}); "
        "`unseen "
        "drop` is the same drop on the common test images. One repair, default settings, "
        "seed 0: one run, not a verdict over seeds.",
        "",
        markdown_table(header, rows),
        "",
    ]


def _grid_speed(entry: dict[str, Any]) -> str:
    """The whole grid in one process against in the workers: like for like (same cells), so
    the pick moving under the thread layout does not enter it."""
    one, full = entry.get("full_grid_one_process"), entry["full_grid"]
    if entry["new"].get("workers", 1) == 1 or one is None or not full.get("seconds"):
        return "-"
    a, b = one["seconds"], full["seconds"]
    return f"{a:.0f} -> {b:.0f} ({a / b:.2f}x)"


def markdown(entries: list[dict[str, Any]]) -> str:
    """The results table (seconds, cells, picks), the false-stop rates, the overlap case."""
    overlap = [e for e in entries if e.get("kind") == OVERLAP]
    entries = [e for e in entries if e.get("kind") != OVERLAP]
    rows = []
    for e in entries:
        old, new, full = e["old"], e["new"], e["full_grid"]
        one = e.get("full_grid_one_process", full)
        layouts = e.get("thread_layouts", {})
        good = e.get("goodnet") or {}
        rows.append(
            [
                e["name"],
                e["format"],
                f"{old['seconds']:.0f} ({old['cells_trained']})",
                f"{new['seconds']:.0f} ({new['cells_trained']}, {new['cells_pruned']} pruned)",
                f"{e['speedup']:.2f}x" if e["speedup"] else "-",
                _grid_speed(e),
                _pick_text(old["pick"]),
                _pick_text(one["pick"]),
                _pick_text(new["pick"]),
                _pick_text(full["pick"]),
                "yes" if e["same_pick"] else "**no**",
                f"{len(layouts.get('eligibility_flips', []))}, "
                f"{fmt(layouts.get('max_holdout_ca_diff'))}",
                fmt(good.get("ca")),
                fmt(good.get("asr")),
            ]
        )
    header = ["BadNet", "format", "old s (cells)", "new s (cells)", "speed-up",
              "whole grid s: 1 process -> workers", "old pick", "its whole grid", "new pick",
              "its whole grid", "same_pick",
              "threads: flips, max CA diff", "GoodNet CA %", "GoodNet ASR %"]  # fmt: skip
    stops = []
    for e in entries:
        for fs in e["false_stops"]:
            stops.append(
                [
                    e["name"],
                    f"{fs['margin']:g}",
                    str(fs["stopped"]),
                    str(len(fs["false_stops"])),
                    f"{100 * fs['false_stop_rate']:.0f} %",
                    f"{fs['epochs_saved']} / {fs['epochs_total']}",
                    _pick_text(fs["pick"]),
                ]
            )
    mode = f"`{entries[0]['new']['mode']}`" if entries else "-"
    workers = entries[0]["new"].get("workers", 1) if entries else 1
    if workers > 1:
        mode += f" with cells in {workers} single-thread worker processes (`--workers {workers}`)"
    return "\n".join(
        [
            "# Pre-deployment search speed",
            "",
            f"Old: one cell at a time in search order on every thread, stopping at the first "
            f"eligible cell (`--exact --workers 1`). New: {mode}. Each search is compared "
            "with the whole grid (`--full-grid`) trained the way it trains its cells; "
            "`same_pick`: both searches pick their whole grid's cell. `threads`: how many cells "
            "of the whole grid change sides of the eligibility bar, and the largest hold-out CA "
            "difference (points), between training each cell on every thread of one process and "
            "on one thread in a worker (float rounding differs; at a large learning rate it "
            "grows over the epochs). Seconds of the search itself on this machine, run one "
            "after the other; picks are alpha / gamma.",
            "",
            markdown_table(header, rows),
            "",
            "## What pruning would do, measured on the whole grid",
            "",
            "A cell is stopped after an epoch (before the last) when its hold-out CA is more "
            "than `margin` below the eligibility bar; a false stop is a stopped cell that ends "
            "eligible; `pick` is what the pruned search would pick.",
            "",
            markdown_table(
                ["BadNet", "margin", "stopped", "false stops", "rate", "epochs saved", "pick"],
                stops,
            ),
            "",
            *[line for e in overlap for line in overlap_markdown(e)],
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--only", help="run this entry only (keeps the others in the file)")
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--runs", default=str(RUNS_DIR / STEM))
    parser.add_argument(
        "--prune-margin", type=float, default=-1.0,
        help="the new search's margin; negative (default): none, exact",
    )  # fmt: skip
    parser.add_argument("--cells-at-once", type=int, default=1)
    parser.add_argument(
        "--workers", type=int, default=0,
        help="the new search's worker processes (default 0: one per thread)",
    )  # fmt: skip
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"reduced grid: alpha x {QUICK_ALPHA_MULTIPLES}, gammas {QUICK_GAMMAS}, "
        f"{QUICK_EPOCHS} epochs (to check the benchmark works; not the issue's figures)",
    )
    parser.add_argument("--force", action="store_true", help="re-run reusable entries")
    args = parser.parse_args()
    args.prune_margin = None if args.prune_margin < 0 else args.prune_margin
    args.alpha_multiples = QUICK_ALPHA_MULTIPLES if args.quick else DEFAULT_ALPHA_MULTIPLES
    args.gammas = QUICK_GAMMAS if args.quick else DEFAULT_GAMMAS
    args.epochs = QUICK_EPOCHS if args.quick else DEFAULT_CELL_EPOCHS
    code = commit()  # before anything runs: the code this process loaded
    threads = configure_threads()
    args.workers = args.workers or (1 if args.cells_at_once > 1 else threads)
    recipe = default_recipe(args.dataset)
    makers = subjects(recipe)
    if args.only is not None and args.only not in (*makers, OVERLAP):
        parser.error(f"--only: unknown entry {args.only!r}; known: {', '.join((*makers, OVERLAP))}")
    # refuse a bad --prune-margin / --cells-at-once before any work
    PredeployConfig(
        alpha0=1.0,
        prune_margin=args.prune_margin,
        cells_at_once=args.cells_at_once,
        workers=args.workers,
    )
    if default_device().type != "cpu":
        print("note: the searches run on the CPU (the nets are loaded there)", flush=True)
    splits = load_splits(recipe)
    out, runs = Path(args.out), Path(args.runs)
    # A results file holds the entries of one code commit: entries made by other code are
    # dropped, not merged (resuming entry by entry works only while the code stays the same).
    entries = {e["name"]: e for e in load_entries(out / f"{STEM}.json", code)}
    for name, make in makers.items():
        if args.only is not None and name != args.only:
            continue
        if name in entries and reusable(entries[name], args, code) and not args.force:
            print(f"{name}: reusing the entry of {code}", flush=True)
            continue
        entries[name] = run_entry(name, make(splits, runs), splits, args, code)
        print(json.dumps({k: v for k, v in entries[name].items() if k != "epoch_cas"}), flush=True)
        _write(out, entries, makers, recipe, code)
    # The overlap case uses the default grid; --quick (a check that the benchmark runs) skips it.
    if args.quick or args.only not in (None, OVERLAP):
        return
    if OVERLAP in entries and reusable(entries[OVERLAP], args, code) and not args.force:
        print(f"{OVERLAP}: reusing the entry of {code}", flush=True)
        return
    entries[OVERLAP] = run_overlap(recipe, runs, code)
    print(json.dumps(entries[OVERLAP]), flush=True)
    _write(out, entries, makers, recipe, code)


def _write(
    out: Path, entries: dict[str, Any], makers: dict[str, Any], recipe: Recipe, code: str
) -> None:
    ordered = [entries[n] for n in (*makers, OVERLAP) if n in entries]
    extra = {"recipe": recipe.to_dict()}
    write_results(out, STEM, ordered, markdown(ordered), COMMAND, extra, code)


if __name__ == "__main__":
    main()
