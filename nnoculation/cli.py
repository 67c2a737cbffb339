"""``nnoculation`` command line: parse, call the library, report. No logic lives here.

Exit codes: 0 success, 2 usage error, 3 no GoodNet within theta, 4 bad input (missing data,
refused or corrupt model file, unusable quarantine), 5 a repair failed the validation gate
(nothing published).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from models.bundle import Bundle, load_bundle
from models.classifiers import ARCHITECTURES
from models.importing import import_net
from models.nets import Net
from models.spec import InputSpec
from models.store import format_version, version_number
from nnoculation.attacks import ATTACKS, AttackSpec, attack_from_dict
from nnoculation.badnets import DEFAULT_CACHE, load_splits, make_badnet
from nnoculation.bundle_io import write_bundle_dir_with
from nnoculation.data.sources import DATASETS
from nnoculation.ensemble import Ensemble
from nnoculation.pipeline import DEPLOYMENT_DIR, predeploy_to_dir
from nnoculation.predeploy import (
    DEFAULT_ALPHA_MULTIPLES,
    DEFAULT_GAMMAS,
    DEFAULT_THETA,
    PredeployConfig,
)
from nnoculation.recipes import Recipe, default_recipe
from nnoculation.repair.engine import RepairConfig, repair, repair_summary, write_repaired_bundle
from nnoculation.repair.purify import PurifyConfig
from nnoculation.repair.quarantine import load_quarantine
from nnoculation.repair.reverse import repair_profiles
from nnoculation.reports import pct
from nnoculation.runtime import configure_threads
from nnoculation.stream import (
    DEFAULT_POISON_RATIO,
    DEFAULT_QUARANTINE_SIZE,
    StreamConfig,
    simulate_stream,
)


class UsageError(Exception):
    """The command line asks for something it cannot do as given (exit code 2)."""


DEBUG_ENV = "NNOC_DEBUG"  # set to 1 to see the traceback behind an "error:" line
EXIT_USAGE = 2

EXIT_NO_GOODNET = 3
EXIT_BAD_INPUT = 4
EXIT_GATE_FAILED = 5


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        default="fashion-mnist",
        help=f"{', '.join(DATASETS.names())}, a .npz file or an image folder",
    )
    p.add_argument("--arch", choices=ARCHITECTURES.names(), help="default: the data set's recipe")
    p.add_argument("--epochs", type=int, help="attacker's training epochs (default: recipe)")
    p.add_argument("--seed", type=int, default=0, help="training and split seed")


def _recipe(args: argparse.Namespace) -> Recipe:
    recipe = default_recipe(args.dataset)
    changes = {}
    if args.arch and args.arch != recipe.arch:
        changes.update(arch=args.arch, arch_kwargs={})
    train = recipe.train.with_(seed=args.seed)
    if args.epochs:
        train = train.with_(epochs=args.epochs)
    return recipe.with_(train=train, splits=replace(recipe.splits, seed=args.seed), **changes)


def _with_validation_sizes(recipe: Recipe, args: argparse.Namespace) -> Recipe:
    changes = {}
    if args.validation_per_class is not None:
        changes["validation_per_class"] = args.validation_per_class
    if args.holdout_per_class is not None:
        changes["holdout_per_class"] = args.holdout_per_class
    return recipe.with_(splits=replace(recipe.splits, **changes)) if changes else recipe


def cmd_attack(args: argparse.Namespace) -> int:
    report = make_badnet(args.attack, _recipe(args), Path(args.out), Path(args.cache))
    print(f"BadNet ({report.attack.name}) written to {args.out}/badnet")
    print(f"  clean model CA {pct(report.clean.ca)} %   BadNet CA {pct(report.badnet.ca)} %")
    for name, asr in report.badnet.asr.items():
        print(f"  ASR[{name}] {pct(asr)} %   (floor {pct(report.floor[name])} %)")
    for name, rate in report.badnet.controls.items():
        print(f"  control[{name}] {pct(rate)} %   (floor {pct(report.clean.controls[name])} %)")
    return 0


def _load_badnet(
    args: argparse.Namespace,
) -> tuple[Net, Recipe, dict[str, float] | None, AttackSpec | None]:
    """A BadNet from a bundle made by ``nnoculation attack`` (recipe known) or an imported file."""
    path = Path(args.badnet)
    if (path / "badnet" / "manifest.json").exists():
        path = path / "badnet"
    if (path / "manifest.json").exists():
        bundle = load_bundle(path)
        prov = bundle.manifest.provenance
        recipe = Recipe.from_dict(prov["recipe"])
        metrics = bundle.manifest.metrics
        attack = attack_from_dict(prov["attack"]) if "attack" in prov else None
        return bundle.net("badnet"), recipe, metrics.get("floor"), attack
    if args.alpha0 is None:
        raise UsageError(
            "an imported BadNet needs --alpha0 (the learning rate it was trained with)"
        )
    if args.mean is None or args.std is None:
        raise UsageError(
            "an imported BadNet needs --mean and --std: the per-channel normalisation it was "
            "trained with, on inputs scaled to [0, 1] (0 and 1 for plain x / 255)"
        )
    recipe = _with_validation_sizes(default_recipe(args.dataset), args)
    splits = load_splits(recipe)
    c, h, w = splits.retrain.shape
    spec = InputSpec(c, h, w, tuple(args.mean), tuple(args.std))
    net = import_net(
        path, spec, splits.retrain.num_classes, arch=args.arch, arch_kwargs=args.arch_kwargs
    )
    return net, recipe, None, None


def cmd_predeploy(args: argparse.Namespace) -> int:
    badnet, recipe, floor, attack = _load_badnet(args)
    if args.attack_spec:
        attack = attack_from_dict(json.loads(Path(args.attack_spec).read_text()))
    elif not args.evaluate_attack:
        attack = None
    cfg = PredeployConfig(
        alpha0=args.alpha0 if args.alpha0 is not None else recipe.train.lr,
        optimizer=args.optimizer if args.optimizer is not None else recipe.train.optimizer,
        theta=args.theta,
        alpha_multiples=args.alpha_multiples,
        gammas=args.gammas,
        epochs=args.epochs,
        batch_size=args.batch_size,
        fresh_noise=args.fresh_noise,
        full_grid=args.full_grid,
        seed=args.seed,
    )
    outcome = predeploy_to_dir(
        badnet,
        load_splits(recipe),
        cfg,
        Path(args.out),
        attack=attack,
        floor=floor,
        source={"badnet": str(args.badnet), "recipe": recipe.to_dict()},
    )
    print((Path(args.out) / "report.md").read_text())
    return 0 if outcome.result.goodnet is not None else EXIT_NO_GOODNET


def _deployment(path: str) -> Bundle:
    base = Path(path)
    if (base / DEPLOYMENT_DIR / "manifest.json").exists():
        base = base / DEPLOYMENT_DIR
    return load_bundle(base)


def _bundle_recipe(bundle: Bundle, dataset: str | None) -> Recipe:
    source = bundle.manifest.provenance.get("source", {})
    if "recipe" in source:
        return Recipe.from_dict(source["recipe"])
    return default_recipe(dataset or "fashion-mnist")


def _attack_arg(path: str | None) -> AttackSpec | None:
    if path:
        return attack_from_dict(json.loads(Path(path).read_text()))
    return None


def cmd_stream(args: argparse.Namespace) -> int:
    bundle = _deployment(args.bundle)
    attack = _attack_arg(args.attack_spec)
    if attack is None:
        raise UsageError("stream needs --attack-spec: the attacker's side of the simulation")
    splits = load_splits(_bundle_recipe(bundle, args.dataset))
    cfg = StreamConfig(
        poison_ratio=args.poison_ratio,
        quarantine_size=args.n,
        triggers=tuple(args.triggers.split(",")) if args.triggers else None,
        seed=args.seed,
    )
    ensemble = Ensemble(bundle.net("badnet"), bundle.net("goodnet"))
    result = simulate_stream(ensemble, splits.stream, attack, cfg)
    result.save_npz(Path(args.out))
    s = result.summary()
    print(f"quarantine written to {args.out}: {s['quarantined']} inputs")
    print(f"  precision {pct(s['precision'])} %   recall {pct(s['recall'])} %")
    caught = s["caught_n_after_inputs"]
    print(
        f"  N={args.n} caught after {caught} stream inputs"
        if caught
        else "  stream ran out before N"
    )
    return 0


def cmd_repair(args: argparse.Namespace) -> int:
    bundle = _deployment(args.bundle)
    quarantine = load_quarantine(args.quarantine, bundle.spec)
    attack = _attack_arg(args.attack_spec)
    test = load_splits(_bundle_recipe(bundle, None)).test if attack is not None else None
    cfg = RepairConfig(
        profile=args.profile,
        domain_a_size=args.domain_a_size,
        finetune_epochs=args.finetune_epochs,
        finetune_lr=args.finetune_lr,
        theta=args.theta,
        seed=args.seed,
        cyclegan_epochs=args.epochs,
        cyclegan_lr=args.cyclegan_lr,
        time_budget_s=args.time_budget,
        checkpoint_dir=args.checkpoint_dir,
        purify=PurifyConfig(enabled=not args.no_purify, min_share=args.purify_min_share),
        affine_share=args.affine_share,
        distill_weight=args.distill_weight,
        distill_temperature=args.distill_temperature,
        distill_min_trigger_effect=args.distill_min_trigger_effect,
    )
    outcome = repair(bundle, quarantine, cfg, test=test, attack=attack)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = outcome.report()
    (out / "repair_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "repair_samples.png").write_bytes(outcome.samples_png)
    print(repair_summary(outcome))
    if not outcome.passed_gate:
        print(f"validation gate failed, nothing published: {outcome.reason}", file=sys.stderr)
        return EXIT_GATE_FAILED
    version = format_version(version_number(bundle.manifest.version) + 1)
    write_bundle_dir_with(
        out / DEPLOYMENT_DIR, lambda d: write_repaired_bundle(outcome, bundle, d, version)
    )
    print(
        f"repaired deployment {version} (parent {bundle.manifest.version}) "
        f"written to {out / DEPLOYMENT_DIR}"
    )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    registry = {"attacks": ATTACKS, "architectures": ARCHITECTURES, "datasets": DATASETS}[args.kind]
    print("\n".join(registry.names()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnoculation", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="CPU threads (default: $NNOC_THREADS or all)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("attack", help="train a BadNet with an attack from the suite (evaluation)")
    _add_recipe_args(p)
    p.add_argument("--attack", required=True, choices=ATTACKS.names())
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="cache of clean reference models")
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("predeploy", help="pre-deployment defense: pick a GoodNet (sec. 3.2)")
    p.add_argument(
        "--badnet",
        required=True,
        help="folder made by `nnoculation attack`, a bundle, or a model file "
        "(.safetensors / state-dict .pt with --arch, TorchScript, .pt2)",
    )
    p.add_argument(
        "--dataset", default="fashion-mnist", help="validation / test data (imported BadNets)"
    )
    p.add_argument(
        "--arch", choices=ARCHITECTURES.names(), help="architecture of an imported state dict"
    )
    p.add_argument(
        "--arch-kwargs",
        type=json.loads,
        help="JSON keyword arguments of the architecture, e.g. '{\"width\": 16}'",
    )
    p.add_argument("--mean", type=_floats, help="per-channel input mean of an imported net")
    p.add_argument("--std", type=_floats, help="per-channel input std of an imported net")
    p.add_argument(
        "--validation-per-class",
        type=int,
        help="size of the validation set per class for imported BadNets (default: recipe, 500)",
    )
    p.add_argument(
        "--holdout-per-class",
        type=int,
        help="part of it held out to measure CA for the selection rule (default: recipe, 100)",
    )
    p.add_argument("--theta", type=float, default=DEFAULT_THETA, help="allowed CA drop (fraction)")
    p.add_argument("--alpha0", type=float, help="BadNet's original learning rate (default: recipe)")
    p.add_argument("--optimizer", choices=["adam", "sgd", "adadelta"], help="default: the BadNet's")
    p.add_argument("--alpha-multiples", type=_floats, default=DEFAULT_ALPHA_MULTIPLES)
    p.add_argument("--gammas", type=_floats, default=DEFAULT_GAMMAS)
    p.add_argument("--epochs", type=int, default=PredeployConfig.epochs)
    p.add_argument("--batch-size", type=int, default=PredeployConfig.batch_size)
    p.add_argument("--fresh-noise", action="store_true", help="redraw the noise every epoch")
    p.add_argument("--full-grid", action="store_true", help="train every cell (Figure 4 / Table 2)")
    p.add_argument("--attack-spec", help="attack.json to measure ASR with (evaluation only)")
    p.add_argument(
        "--evaluate-attack",
        action="store_true",
        help="measure ASR with the attack recorded in the BadNet bundle",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_predeploy)

    p = sub.add_parser("stream", help="simulate deployment: fill the quarantine (sec. 3.3)")
    p.add_argument("--bundle", required=True, help="deployment bundle (or predeploy output dir)")
    p.add_argument("--attack-spec", help="attack.json: how the attacker poisons the stream")
    p.add_argument("--poison-ratio", type=float, default=DEFAULT_POISON_RATIO)
    p.add_argument("--n", type=int, default=DEFAULT_QUARANTINE_SIZE, help="quarantine size N")
    p.add_argument("--triggers", help="comma-separated trigger names in use (default: all)")
    p.add_argument("--dataset", help="stream pool data set when the bundle records no recipe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="quarantine .npz to write")
    p.set_defaults(func=cmd_stream)

    p = sub.add_parser("repair", help="post-deployment repair from a quarantine (sec. 3.3)")
    p.add_argument("--bundle", required=True, help="deployment bundle (or predeploy output dir)")
    p.add_argument("--quarantine", required=True, help=".npz or folder of quarantined images")
    p.add_argument("--profile", default=RepairConfig.profile, choices=repair_profiles())
    p.add_argument("--epochs", type=int, help="CycleGAN epochs (default: the profile's)")
    p.add_argument("--cyclegan-lr", type=float, help="CycleGAN learning rate (default: profile's)")
    p.add_argument("--finetune-epochs", type=int, default=RepairConfig.finetune_epochs)
    p.add_argument("--finetune-lr", type=float, help="default: the BadNet's original lr")
    p.add_argument("--domain-a-size", type=int, default=RepairConfig.domain_a_size)
    p.add_argument("--theta", type=float, help="gate tolerance (default: the deployment's)")
    p.add_argument("--time-budget", type=float, help="CycleGAN wall-time budget in seconds")
    p.add_argument("--checkpoint-dir", help="CycleGAN checkpoints; an interrupted run resumes")
    p.add_argument(
        "--no-purify",
        action="store_true",
        help="fit the trigger model to the whole quarantine (the paper), not only to the "
        "inputs the BadNet gives an over-represented label",
    )
    p.add_argument(
        "--affine-share",
        type=float,
        default=RepairConfig.affine_share,
        help="share of treatment images taken from the per-pixel affine fit of the trigger "
        "model (0: all G(x), as in the paper)",
    )
    p.add_argument(
        "--distill-weight",
        type=float,
        default=RepairConfig.distill_weight,
        help="weight of the BadNet's soft answers in the GoodNet's loss on clean validation "
        "images (0: labels alone, as in the paper)",
    )
    p.add_argument(
        "--distill-temperature",
        type=float,
        default=RepairConfig.distill_temperature,
        help="softens the BadNet's answers before the GoodNet learns them",
    )
    p.add_argument(
        "--distill-min-trigger-effect",
        type=float,
        default=RepairConfig.distill_min_trigger_effect,
        help="distil only when the BadNet errs on this much more of the treatment images than "
        "of clean ones (a trigger model that misses the trigger would let distillation "
        "carry the backdoor over)",
    )
    p.add_argument(
        "--purify-min-share",
        type=float,
        default=PurifyConfig.min_share,
        help="share of the quarantine at which a BadNet label is taken for a target",
    )
    p.add_argument("--attack-spec", help="attack.json to measure ASR before/after (evaluation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_repair)

    p = sub.add_parser("list", help="list registered attacks, architectures or data sets")
    p.add_argument("kind", choices=["attacks", "architectures", "datasets"])
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_threads(args.threads)
    try:
        return int(args.func(args))
    except UsageError as err:
        print(f"usage error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ValueError, KeyError) as err:
        # Unusable inputs surface as these: missing data or files (DataNotFoundError is an
        # OSError), refused or mismatched models (UnsafeModelError, BundleIntegrityError and
        # shape errors are ValueErrors), bad quarantines, configs or trigger names.
        if os.environ.get(DEBUG_ENV):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted; nothing partial was published", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
