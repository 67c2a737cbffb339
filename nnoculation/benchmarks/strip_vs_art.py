"""STRIP as Gao et al. define it (:mod:`nnoculation.defenses.strip`) against the Adversarial
Robustness Toolbox's ``STRIPMixin``, on one patch BadNet and the same clean and triggered
inputs. Writes ``docs/results/strip_vs_art.{json,md}``.

The two differ by design and neither is tuned to the other:

- ours: overlay = pixel sum saturated at 255 (STRIP's reference ``cv2.addWeighted(x, 1, x_j,
  1, 0)``); score = mean over the ``n`` superimposed images of the Shannon entropy of each
  one's softmax; threshold = the empirical ``frr`` quantile of the hold-out clean scores;
  overlays from the retrain split, distinct per input.
- ART 1.20: overlay = the average of the two images; score = for each class, the entropy of
  that class's probabilities *across* the ``n`` superimpositions (normalised over them),
  summed over classes and divided by ``n``; threshold = the ``false_acceptance_rate``
  quantile of a normal distribution fitted to the clean scores (``scipy.stats.norm.fit``);
  overlays drawn with replacement from the same clean set the threshold is fitted on (here
  the hold-out split), from numpy's global RNG (seeded here and restored afterwards).

Both use ``n`` = 100 and a 5 % rate. The BadNet is the attack benchmark's cached patch BadNet
(``runs/bench/attacks/patch``) when it is current, else (``--tiny`` or no cache) a small one
trained here for a few epochs. ART is a test-only dependency (``pip install
adversarial-robustness-toolbox``).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.nets import Net
from nnoculation.attacks import AttackSpec, get_attack
from nnoculation.badnets import (
    badnet_is_current,
    current_badnet,
    input_spec_for,
    load_splits,
    new_net,
)
from nnoculation.benchmarks.common import RUNS_DIR, commit, pct1, provenance, write_results
from nnoculation.data.splits import Splits
from nnoculation.defenses.base import DefenseInputs
from nnoculation.defenses.strip import DEFAULT_FRR, DEFAULT_SUPERIMPOSITIONS, Strip
from nnoculation.metrics import EVAL_SEED, triggered_sets
from nnoculation.recipes import default_recipe
from nnoculation.reports import markdown_table
from nnoculation.runtime import configure_threads
from nnoculation.training import train

COMMAND = "python -m nnoculation.benchmarks.strip_vs_art"
STEM = "strip_vs_art"
ATTACK = "patch"
# Clean test images (and their triggered copies, label != target) and hold-out images the
# thresholds are set on: with n = 100 every input costs 100 forward passes in each detector.
# At these sizes the two detectors' fits and scores took 45 s on 2 CPU cores with the cached
# BadNet (docs/results/strip_vs_art.json: fit 16.0 s + 11.9 s, 30 ms + 15 ms per input).
DEFAULT_INPUTS = 200
DEFAULT_THRESHOLD_IMAGES = 500
TINY_ATTACKER_IMAGES = 6000
TINY_EPOCHS = 2
TINY_WIDTH = 8
EXAMPLES = 10  # disagreements listed one by one


@dataclass(frozen=True)
class ArtResult:
    """ART's STRIP on one set of inputs: its threshold, the clean scores it was fitted on,
    the inputs' scores and ART's own decision for each (abstained = refused)."""

    threshold: float
    fit_scores: np.ndarray
    scores: np.ndarray
    refused: np.ndarray
    fit_seconds: float
    score_seconds: float
    version: str


def art_strip(
    net: Net, clean: torch.Tensor, inputs: torch.Tensor, n: int, rate: float, seed: int
) -> ArtResult:
    """Run ART's ``STRIPMixin`` with ``net`` as its ``predict_fn``: ``mitigate`` on ``clean``
    (uint8), then ``predict`` on ``inputs`` (uint8). The scores are recomputed with ART's
    formula from the very predictions ART asked for (its ``predict_fn`` calls, one per image),
    and ART's own abstentions are returned beside them."""
    import art
    from art.estimators.poison_mitigation.strip import STRIPMixin
    from scipy.stats import entropy

    calls: list[np.ndarray] = []

    def predict_fn(x: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(np.asarray(x, dtype=np.float32))
        probs = F.softmax(net.scores(batch), dim=1).numpy()
        calls.append(probs)
        return probs

    def score(probs: np.ndarray) -> float:  # ART 1.20's normalized_entropy, verbatim
        return float(np.sum(entropy(probs, base=2, axis=0)) / float(n))

    strip = STRIPMixin(predict_fn=predict_fn, num_samples=n, false_acceptance_rate=rate)
    strip.nb_classes = net.num_classes
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        start = time.perf_counter()
        strip.mitigate(clean.numpy().astype(np.float32))
        fit_seconds = time.perf_counter() - start
        fit_scores = np.array([score(p) for p in calls])
        calls.clear()
        start = time.perf_counter()
        out = strip.predict(inputs.numpy().astype(np.float32))
        score_seconds = time.perf_counter() - start
    finally:
        np.random.set_state(state)
    scores = np.array([score(p) for p in calls[1:]])  # calls[0]: the raw batch prediction
    threshold = float(strip.entropy_threshold)  # type: ignore[arg-type]
    refused = np.all(out == 0, axis=1)
    if not np.array_equal(refused, scores <= threshold):
        raise RuntimeError("recomputed ART scores do not reproduce ART's own decisions")
    return ArtResult(
        threshold, fit_scores, scores, refused, fit_seconds, score_seconds, art.__version__
    )


def _ranks(x: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(x.numel(), dtype=x.dtype)
    return ranks


def correlations(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Pearson and Spearman (rank, ties broken by position) correlation of two score lists."""
    a, b = a.double(), b.double()
    pearson = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    spearman = float(torch.corrcoef(torch.stack([_ranks(a), _ranks(b)]))[0, 1])
    return {"pearson": round(pearson, 4), "spearman": round(spearman, 4)}


def tiny_badnet(splits: Splits, attack: AttackSpec, seed: int) -> Net:
    """A small patch BadNet trained here on part of the attacker's split (when no cached
    BadNet is current, or with ``--tiny``), normalised as every BadNet of the project."""
    recipe = default_recipe("fashion-mnist")
    recipe = recipe.with_(arch_kwargs={**recipe.arch_kwargs, "width": TINY_WIDTH})
    attacker = splits.attacker
    g = torch.Generator().manual_seed(seed)
    part = attacker.subset(torch.randperm(len(attacker), generator=g)[:TINY_ATTACKER_IMAGES])
    net = new_net(recipe, input_spec_for(splits), part.num_classes)
    cfg = recipe.train.with_(epochs=TINY_EPOCHS, seed=seed)
    train(net, attack.poison_training_set(part, seed=seed), cfg, desc="tiny BadNet")
    return net


def disagreements(
    ours: torch.Tensor, art_refused: torch.Tensor, kinds: list[str]
) -> dict[str, int]:
    """Counts of inputs one refuses and the other accepts, per kind (clean / triggered)."""
    out = {}
    for kind in ("clean", "triggered"):
        mask = torch.tensor([k == kind for k in kinds])
        out[f"{kind}_refused_by_ours_only"] = int((ours & ~art_refused & mask).sum())
        out[f"{kind}_refused_by_art_only"] = int((~ours & art_refused & mask).sum())
        out[f"{kind}_both_refused"] = int((ours & art_refused & mask).sum())
        out[f"{kind}_both_accepted"] = int((~ours & ~art_refused & mask).sum())
    return out


def _rates(
    refused: torch.Tensor, kinds: list[str], predictions: torch.Tensor, wanted: torch.Tensor
) -> dict[str, float]:
    """FRR on clean inputs, FAR on triggered ones, and the CA / ASR translation: a refused
    clean input is an error, a refused triggered input a failed attack."""
    clean = torch.tensor([k == "clean" for k in kinds])
    hit = (predictions == wanted) & ~refused
    return {
        "frr_clean": pct1(float(refused[clean].float().mean())),
        "far_triggered": pct1(float((~refused[~clean]).float().mean())),
        "ca": pct1(float(hit[clean].float().mean())),
        "asr": pct1(float(hit[~clean].float().mean())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--runs", default=str(RUNS_DIR))
    parser.add_argument("--inputs", type=int, default=DEFAULT_INPUTS, help="clean test images")
    parser.add_argument(
        "--threshold-images",
        type=int,
        default=DEFAULT_THRESHOLD_IMAGES,
        help="hold-out clean images both thresholds are set on (a seeded subset)",
    )
    parser.add_argument("--n", type=int, default=DEFAULT_SUPERIMPOSITIONS)
    parser.add_argument("--rate", type=float, default=DEFAULT_FRR, help="FRR (ours) / ART's FAR")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="train a small BadNet here")
    args = parser.parse_args()
    if min(args.inputs, args.threshold_images, args.n) < 1 or not 0 < args.rate < 1:
        parser.error("--inputs, --threshold-images and --n must be >= 1 and --rate in (0, 1)")
    code = commit()  # before anything runs: the code this process loaded
    configure_threads()
    recipe = default_recipe("fashion-mnist")
    splits = load_splits(recipe)
    folder = Path(args.runs) / "attacks" / ATTACK
    if not args.tiny and badnet_is_current(folder, ATTACK, recipe):
        bundle, attack, _floor = current_badnet(ATTACK, recipe, folder, splits)
        badnet, about = bundle.net("badnet"), f"the attack benchmark's patch BadNet ({folder})"
    else:
        attack = get_attack(ATTACK, splits.attacker.num_classes, splits.attacker.shape)
        badnet = tiny_badnet(splits, attack, args.seed)
        about = f"a small patch BadNet trained here ({TINY_EPOCHS} epochs, width {TINY_WIDTH})"
    g = torch.Generator().manual_seed(args.seed)
    test = splits.test.subset(torch.randperm(len(splits.test), generator=g)[: args.inputs])
    pick = torch.randperm(len(splits.holdout), generator=g)[: args.threshold_images]
    holdout = splits.holdout.subset(pick)
    (trig,) = triggered_sets(attack, test, EVAL_SEED)
    images = torch.cat([test.images, trig.images])
    kinds = ["clean"] * len(test) + ["triggered"] * len(trig.images)
    wanted = torch.cat([test.labels, trig.targets])
    predictions = badnet.predict(images)
    common = provenance(code, str(badnet.device))

    defense = Strip(n=args.n, frr=args.rate)
    inputs = DefenseInputs(badnet, splits.retrain, holdout, seed=args.seed)
    start = time.perf_counter()
    detector, details = defense.fit(inputs)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    ours_scores = detector.entropy(images)
    ours_seconds = time.perf_counter() - start
    ours_refused = ours_scores < detector.threshold

    art = art_strip(badnet, holdout.images, images, args.n, args.rate, args.seed)
    art_scores = torch.from_numpy(art.scores).float()
    art_refused = torch.from_numpy(art.refused)
    art_fit_frr = float((art.fit_scores <= art.threshold).mean())

    clean = torch.tensor([k == "clean" for k in kinds])
    entries = [
        {
            "implementation": "ours",
            **common,
            "definition": "mean over superimpositions of the entropy of each softmax (bits)",
            "blend": "sum saturated at 255 (STRIP reference addWeighted 1, 1)",
            "threshold_rule": f"empirical {args.rate:g} quantile of hold-out clean scores",
            "threshold": round(detector.threshold, 5),
            "n": args.n,
            "frr_on_threshold_data": pct1(details["frr_on_threshold_data"]),
            **_rates(ours_refused, kinds, predictions, wanted),
            "fit_seconds": round(fit_seconds, 2),
            "ms_per_input": round(1000 * ours_seconds / len(images), 3),
        },
        {
            "implementation": f"art {art.version}",
            **common,
            "definition": "per class, entropy across superimpositions; summed, divided by n",
            "blend": "average of the two images",
            "threshold_rule": f"{args.rate:g} quantile of a normal fitted to clean scores",
            "threshold": round(art.threshold, 5),
            "n": args.n,
            "frr_on_threshold_data": pct1(art_fit_frr),
            **_rates(art_refused, kinds, predictions, wanted),
            "fit_seconds": round(art.fit_seconds, 2),
            "ms_per_input": round(1000 * art.score_seconds / len(images), 3),
        },
    ]
    differ = torch.nonzero(ours_refused != art_refused).flatten().tolist()
    comparison = {
        "all": correlations(ours_scores, art_scores),
        "clean": correlations(ours_scores[clean], art_scores[clean]),
        "triggered": correlations(ours_scores[~clean], art_scores[~clean]),
        "decisions_agree": pct1(float((ours_refused == art_refused).float().mean())),
        "counts": disagreements(ours_refused, art_refused, kinds),
        "examples": [
            {
                "kind": kinds[i],
                "index": i if kinds[i] == "clean" else i - len(test),
                "ours": round(float(ours_scores[i]), 4),
                "art": round(float(art_scores[i]), 4),
                "refused_by": "ours" if bool(ours_refused[i]) else "art",
            }
            for i in differ[:EXAMPLES]
        ],
    }
    badnet_figures = {
        "about": about,
        "ca": pct1(float((predictions == wanted)[clean].float().mean())),
        "asr": pct1(float((predictions == wanted)[~clean].float().mean())),
        "clean_inputs": len(test),
        "triggered_inputs": len(trig.images),
        "threshold_images": len(holdout),
        "overlay_pool_ours": len(splits.retrain),
    }
    extra = {"badnet": badnet_figures, "comparison": comparison, "art_version": art.version}
    md = markdown(entries, badnet_figures, comparison)
    write_results(Path(args.out), STEM, entries, md, COMMAND, extra, code)
    print(json.dumps({"entries": entries, **extra}, indent=1), flush=True)


def markdown(
    entries: list[dict[str, Any]], badnet: dict[str, Any], comparison: dict[str, Any]
) -> str:
    """The results as a table plus the agreement figures."""
    header = [
        "STRIP",
        "threshold",
        "FRR % (threshold data)",
        "FRR % (clean)",
        "FAR % (triggered)",
        "CA %",
        "ASR %",
        "fit s",
        "ms / input",
    ]
    rows = [
        [
            e["implementation"],
            f"{e['threshold']:.4f}",
            f"{e['frr_on_threshold_data']:.1f}",
            f"{e['frr_clean']:.1f}",
            f"{e['far_triggered']:.1f}",
            f"{e['ca']:.1f}",
            f"{e['asr']:.1f}",
            f"{e['fit_seconds']:.1f}",
            f"{e['ms_per_input']:.2f}",
        ]
        for e in entries
    ]
    c = comparison["counts"]
    lines = [
        "# STRIP: ours (Gao et al.'s definition) vs the Adversarial Robustness Toolbox",
        "",
        f"BadNet: {badnet['about']}; without a defense CA {badnet['ca']:.1f} %, ASR "
        f"{badnet['asr']:.1f} % on {badnet['clean_inputs']} clean test images and their "
        f"{badnet['triggered_inputs']} triggered copies (true label != target). Both detectors "
        f"use n = {entries[0]['n']} superimpositions and the same rate; thresholds are set on "
        f"the {badnet['threshold_images']} hold-out clean images. CA and ASR count a refused "
        "input as an error / a failed attack.",
        "",
        markdown_table(header, rows),
        "",
        "| entries | definition | overlay | threshold rule |",
        "|---|---|---|---|",
        *[
            f"| {e['implementation']} | {e['definition']} | {e['blend']} | {e['threshold_rule']} |"
            for e in entries
        ],
        "",
        f"Correlation of the two scores: all inputs {comparison['all']['pearson']:.3f} "
        f"(Spearman {comparison['all']['spearman']:.3f}); clean only "
        f"{comparison['clean']['pearson']:.3f} ({comparison['clean']['spearman']:.3f}); "
        f"triggered only {comparison['triggered']['pearson']:.3f} "
        f"({comparison['triggered']['spearman']:.3f}). The decisions agree on "
        f"{comparison['decisions_agree']:.1f} % of the inputs.",
        "",
        f"Where they disagree: clean inputs refused by ours only {c['clean_refused_by_ours_only']}"
        f", by ART only {c['clean_refused_by_art_only']}; triggered inputs refused by ours only "
        f"{c['triggered_refused_by_ours_only']}, by ART only {c['triggered_refused_by_art_only']}"
        f" (both refused {c['triggered_both_refused']}, both accepted "
        f"{c['triggered_both_accepted']}).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
