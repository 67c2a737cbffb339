"""``nnoculation`` command line: parse, call the library, report. No logic lives here.

Exit codes: 0 success, 2 usage error (an option or setting out of range, misspelt or
missing), 3 no GoodNet within theta, 4 bad input (missing data, refused or corrupt model file,
unusable quarantine, unknown store version), 5 a repair failed the validation gate (nothing
published; with a store its nets are kept as a rejected candidate), or ``store activate`` /
``store rollback`` was asked for such a candidate without ``--override``, 6 another repair of
the deployment holds its lock. Every error is one line on stderr; ``NNOC_DEBUG=1`` shows the
traceback behind it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, NoReturn

from models.bundle import MANIFEST_NAME, Bundle, Manifest, load_bundle
from models.classifiers import ARCHITECTURES, ArchKwargsError, validate_arch_kwargs
from models.importing import import_net
from models.nets import Net
from models.registry import Registry
from models.spec import InputSpec
from models.store_base import (
    DEFAULT_STALE_TMP_SECONDS,
    OVERRIDE_KEY,
    BundleStore,
    RejectedCandidateError,
    check_override_reason,
    rejected_candidate,
)
from models.store_names import (
    DEPLOYMENT_PATTERN,
    RepairLockedError,
    StoreError,
    format_version,
    version_number,
)
from models.store_open import open_store
from nnoculation.attacks import ATTACKS, AttackSpec, attack_from_dict
from nnoculation.attacks.triggered_set import is_triggered_set_file, load_triggered_set
from nnoculation.badnets import DEFAULT_CACHE, load_splits, make_badnet
from nnoculation.bundle_io import write_bundle_dir_with
from nnoculation.data.imageset import ImageSet
from nnoculation.data.sources import DATASETS
from nnoculation.data.splits import VALIDATION_SOURCES
from nnoculation.ensemble import Ensemble
from nnoculation.metrics import TriggeredSetAttack
from nnoculation.pipeline import DEPLOYMENT_DIR, predeploy_to_dir, publish_deployment
from nnoculation.predeploy import (
    DEFAULT_ALPHA_MULTIPLES,
    DEFAULT_GAMMAS,
    DEFAULT_THETA,
    PredeployConfig,
)
from nnoculation.recipes import Recipe, default_recipe
from nnoculation.repair.engine import (
    RepairConfig,
    RepairConfigError,
    RepairOutcome,
    repair,
    repair_in_store,
    repair_summary,
    write_repaired_bundle,
)
from nnoculation.repair.purify import PurifyConfig
from nnoculation.repair.quarantine import load_quarantine
from nnoculation.repair.reverse import repair_profiles
from nnoculation.reports import pct
from nnoculation.runtime import ThreadsConfigError, configure_threads
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
EXIT_BUSY = 6


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: raises :class:`UsageError` instead of printing the usage
    block and exiting, so :func:`main` reports every usage error the same way (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    def text(x: float) -> str:
        return str(x) if isinstance(x, int) else f"{x:g}"

    left = "(-inf" if low is None else ("(" if low_open else "[") + text(low)
    right = "inf)" if high is None else text(high) + (")" if high_open else "]")
    return f"{left}, {right}"


def _number_type(
    kind: type,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> Callable[[str], Any]:
    """An argparse ``type``: a finite int / float within the bounds, else a one-line error."""
    noun = "integer" if kind is int else "number"
    if low == 0 and high is None:
        what, bounds = f"a {'positive' if low_open else 'non-negative'} {noun}", ""
    else:
        what = f"an {noun}" if kind is int else f"a {noun}"
        bounds = ""
        if low is not None or high is not None:
            bounds = " in " + _interval(low, high, low_open, high_open)

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}{bounds}, got {text!r}") from None
        ok = math.isfinite(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {what}{bounds}, got {text!r}")
        return value

    parse.__name__ = what
    return parse


def _number_list_type(item: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    """An argparse ``type``: comma-separated numbers, each checked by ``item``; not empty."""

    def parse(text: str) -> tuple[Any, ...]:
        values = tuple(item(v.strip()) for v in text.split(",") if v.strip())
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
        return values

    return parse


_positive_int = _number_type(int, 0, low_open=True)
_seed = _number_type(int, 0, 2**63 - 2)
_positive_float = _number_type(float, 0.0, low_open=True)
_theta = _number_type(float, 0.0, 1.0, low_open=True, high_open=True)
_share = _number_type(float, 0.0, 1.0)


def _share_or_off(text: str) -> float | None:
    """An argparse ``type``: a share in [0, 1], or ``off`` (None)."""
    return None if text.strip().lower() == "off" else _share(text)


_share_or_off.__name__ = "a number in [0, 1] or 'off'"
_floats = _number_list_type(_number_type(float))
_positive_floats = _number_list_type(_positive_float)
_shares = _number_list_type(_share)


def _json_object(text: str) -> dict[str, Any]:
    """An argparse ``type``: a JSON object (e.g. architecture kwargs)."""
    try:
        value = json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a JSON object like '{{\"width\": 16}}', got {text!r}"
        )
    return value


def _deployment_name(text: str) -> str:
    if not DEPLOYMENT_PATTERN.match(text):
        raise argparse.ArgumentTypeError(
            f"invalid deployment name {text!r}: use letters, digits, '_', '.', '-' and do not "
            "start with '.' or '-'"
        )
    return text


def _version_id(text: str) -> str:
    try:
        version_number(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        default="fashion-mnist",
        help=f"{', '.join(DATASETS.names())}, a .npz file or an image folder",
    )
    p.add_argument("--arch", choices=ARCHITECTURES.names(), help="default: the data set's recipe")
    p.add_argument(
        "--epochs", type=_positive_int, help="attacker's training epochs (default: recipe)"
    )
    p.add_argument("--seed", type=_seed, default=0, help="training and split seed")


def _recipe(args: argparse.Namespace) -> Recipe:
    recipe = default_recipe(args.dataset)
    changes: dict[str, Any] = {}
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
    if (path / "badnet" / MANIFEST_NAME).exists():
        path = path / "badnet"
    elif (path / DEPLOYMENT_DIR / MANIFEST_NAME).exists():
        path = path / DEPLOYMENT_DIR
    if (path / MANIFEST_NAME).exists():
        bundle = load_bundle(path)
        prov = bundle.manifest.provenance
        if "predeploy" in prov or "goodnet" in bundle.roles:
            raise ValueError(
                f"{args.badnet} is a deployment bundle (BadNet + GoodNet made by `nnoculation "
                "predeploy`), not a BadNet to defend; pass the folder made by `nnoculation "
                "attack` (or its badnet/ bundle) or a model file, or repair this deployment "
                "with `nnoculation repair --bundle`"
            )
        if "recipe" not in prov or "badnet" not in bundle.roles:
            raise ValueError(
                f"{path} is a bundle without a BadNet training recipe (not made by `nnoculation "
                "attack`); pass the model file itself with --arch / --alpha0 / --mean / --std"
            )
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


def _check_arch_kwargs(args: argparse.Namespace) -> None:
    """``--arch-kwargs`` must fit ``--arch`` (unknown keys and absurd values are usage errors)."""
    if args.arch_kwargs is None:
        return
    if not args.arch:
        raise UsageError("--arch-kwargs needs --arch (the zoo architecture they are for)")
    try:
        validate_arch_kwargs(args.arch, args.arch_kwargs)
    except ArchKwargsError as err:
        raise UsageError(f"--arch-kwargs: {err}") from None


def _store_target(args: argparse.Namespace) -> tuple[BundleStore, str] | None:
    """The store and deployment named by ``--store`` / ``--deployment`` (both or neither)."""
    if (args.store is None) != (args.deployment is None):
        raise UsageError("--store and --deployment go together")
    if args.store is None:
        return None
    return _store(args), args.deployment


def _search_speed(args: argparse.Namespace) -> dict[str, Any]:
    """``--exact``, ``--prune-margin``, ``--cells-at-once``, ``--workers`` as PredeployConfig
    fields. ``--workers auto``: one single-thread worker per CPU thread we may use (the
    measured gain on 2 cores, docs/results/cell_cost.md), one process when cells are batched."""
    if args.prune_margin is not None and (args.exact or args.full_grid):
        raise UsageError(
            "--prune-margin is a shortcut that is not provably exact: not with "
            + ("--exact" if args.exact else "--full-grid")
        )
    workers = args.workers
    if workers == AUTO:
        import torch  # the threads main() configured

        workers = 1 if args.cells_at_once > 1 else torch.get_num_threads()
    elif workers > 1 and args.cells_at_once > 1:
        raise UsageError("--workers and --cells-at-once: batched cells run in one process")
    return {
        "exact": args.exact,
        "prune_margin": args.prune_margin,
        "cells_at_once": args.cells_at_once,
        "workers": workers,
    }


AUTO = "auto"


def _workers(text: str) -> int | str:
    """``--workers``: ``auto`` or a positive number of processes."""
    return AUTO if text == AUTO else _positive_int(text)


def cmd_predeploy(args: argparse.Namespace) -> int:
    _check_arch_kwargs(args)
    speed = _search_speed(args)
    target = _store_target(args)
    badnet, recipe, floor, attack = _load_badnet(args)
    if args.validation_source is not None:
        recipe = recipe.with_validation_source(args.validation_source)
    evaluated: AttackSpec | TriggeredSetAttack | None = attack
    if args.attack_spec:
        evaluated = _attack_arg(args.attack_spec)
    elif not args.evaluate_attack:
        evaluated = None
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
        **speed,
    )
    splits = load_splits(recipe)
    if isinstance(evaluated, TriggeredSetAttack):
        _check_attack_fits(evaluated, splits.test)
        floor = None  # the BadNet bundle's floor is its catalog attack's, not this one's
    outcome = predeploy_to_dir(
        badnet,
        splits,
        cfg,
        Path(args.out),
        attack=evaluated,
        floor=floor,
        source={"badnet": str(args.badnet), "recipe": recipe.to_dict()},
        warn=lambda message: print(f"warning: {message}", file=sys.stderr, flush=True),
    )
    print((Path(args.out) / "report.md").read_text())
    if outcome.result.goodnet is None:
        return EXIT_NO_GOODNET
    if target is not None:
        store, deployment = target
        version = publish_deployment(outcome, store, deployment, activate=True)
        print(f"published to store {store.location} as {deployment} {version} (active)")
    return 0


def _bundle_dir(path: str) -> Path:
    """A bundle folder, or the output folder of ``nnoculation predeploy`` / ``repair``."""
    base = Path(path)
    if (base / DEPLOYMENT_DIR / MANIFEST_NAME).exists():
        base = base / DEPLOYMENT_DIR
    return base


def _deployment(path: str) -> Bundle:
    return load_bundle(_bundle_dir(path))


def _manifest_recipe(manifest: Manifest, dataset: str | None) -> Recipe:
    source = manifest.provenance.get("source", {})
    if "recipe" in source:
        return Recipe.from_dict(source["recipe"])
    return default_recipe(dataset or "fashion-mnist")


def _bundle_recipe(bundle: Bundle, dataset: str | None) -> Recipe:
    return _manifest_recipe(bundle.manifest, dataset)


def _attack_arg(path: str | None) -> AttackSpec | TriggeredSetAttack | None:
    """``--attack-spec``: a catalog attack's ``attack.json``, or a user's own attack as a
    triggered set ``.npz`` (docs/cli.md); a malformed file is bad input (exit code 4)."""
    if not path:
        return None
    if is_triggered_set_file(path):
        return load_triggered_set(path)
    text = Path(path).read_text()
    try:
        return attack_from_dict(json.loads(text))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        detail = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise ValueError(f"{path} is not an attack spec (attack.json): {detail}") from None


def _check_attack_fits(attack: AttackSpec | TriggeredSetAttack | None, data: ImageSet) -> None:
    """A triggered set must fit the data's image shape and classes; checked before any work."""
    if isinstance(attack, TriggeredSetAttack):
        attack.check_fits(tuple(data.images.shape[1:]), data.num_classes)


def cmd_stream(args: argparse.Namespace) -> int:
    bundle = _deployment(args.bundle)
    attack = _attack_arg(args.attack_spec)
    if attack is None:
        raise UsageError("stream needs --attack-spec: the attacker's side of the simulation")
    splits = load_splits(_bundle_recipe(bundle, args.dataset))
    _check_attack_fits(attack, splits.stream)
    triggers = tuple(args.triggers.split(",")) if args.triggers else None
    if isinstance(attack, TriggeredSetAttack) and triggers and set(triggers) != {attack.name}:
        raise UsageError(f"--triggers: the triggered set has one trigger, {attack.name!r}")
    cfg = StreamConfig(
        poison_ratio=args.poison_ratio,
        quarantine_size=args.n,
        triggers=triggers,
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


def _repair_config(args: argparse.Namespace) -> RepairConfig:
    try:
        return RepairConfig(
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
            max_relapse=args.max_relapse,
            max_pair_relapse=args.max_pair_relapse,
        )
    except ValueError as err:  # RepairConfigError, or PurifyConfig's check
        raise UsageError(str(err)) from None


def _run_repair(args: argparse.Namespace, bundle: Bundle, cfg: RepairConfig) -> RepairOutcome:
    """Repair ``bundle`` from ``--quarantine``; writes the report to ``--out`` when given."""
    quarantine = load_quarantine(args.quarantine, bundle.spec)
    attack = _attack_arg(args.attack_spec)
    test = load_splits(_bundle_recipe(bundle, None)).test if attack is not None else None
    if test is not None:
        _check_attack_fits(attack, test)
    outcome = repair(bundle, quarantine, cfg, test=test, attack=attack)
    _report_repair(args, outcome)
    return outcome


def _report_repair(args: argparse.Namespace, outcome: RepairOutcome) -> None:
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "repair_report.json").write_text(json.dumps(outcome.report(), indent=2) + "\n")
        (out / "repair_samples.png").write_bytes(outcome.samples_png)
    print(repair_summary(outcome))
    if not outcome.passed_gate:
        print(f"validation gate failed, nothing published: {outcome.reason}", file=sys.stderr)


def cmd_repair(args: argparse.Namespace) -> int:
    target = _store_target(args)
    if target is None:
        if not args.bundle or not args.out:
            raise UsageError("repair needs --bundle and --out, or --store and --deployment")
        if args.no_activate:
            raise UsageError("--no-activate is for --store: a folder output is never active")
    elif args.bundle:
        raise UsageError(
            "--bundle and --store exclude each other: --store repairs the active version"
        )
    cfg = _repair_config(args)
    if target is not None:
        return _repair_in_store(args, cfg, *target)
    bundle = _deployment(args.bundle)
    outcome = _run_repair(args, bundle, cfg)
    if not outcome.passed_gate:
        return EXIT_GATE_FAILED
    # A folder holds one standalone bundle and there is no store to allocate ids, so the id is
    # a local label: the parent's number plus one. It cannot collide with a sibling because the
    # folder has none; `nnoculation store import` gives the bundle a fresh id from the store
    # (keeping this one in provenance), and `repair --store` never uses this rule.
    version = format_version(version_number(bundle.manifest.version) + 1)
    out = Path(args.out)
    write_bundle_dir_with(
        out / DEPLOYMENT_DIR, lambda d: write_repaired_bundle(outcome, bundle, d, version)
    )
    print(
        f"repaired deployment {version} (parent {bundle.manifest.version}) "
        f"written to {out / DEPLOYMENT_DIR}"
    )
    return 0


def _repair_in_store(
    args: argparse.Namespace, cfg: RepairConfig, store: BundleStore, deployment: str
) -> int:
    """Repair the active version under the deployment's repair lock and publish the result as
    a new version (id from the store, parent the repaired version), active unless
    ``--no-activate``."""
    attack = _attack_arg(args.attack_spec)
    test = None
    if attack is not None:  # evaluation only: the test pool of the recipe the versions share
        active = store.active(deployment)
        if active is not None:
            test = load_splits(_manifest_recipe(store.manifest(deployment, active), None)).test
            _check_attack_fits(attack, test)
    done = repair_in_store(
        store,
        deployment,
        lambda bundle: load_quarantine(args.quarantine, bundle.spec),
        cfg,
        activate=not args.no_activate,
        test=test,
        attack=attack,
    )
    _report_repair(args, done.outcome)
    if done.version is None:
        if done.candidate is not None:
            print(
                f"its nets are kept as rejected candidate {deployment} {done.candidate} (never "
                "active; `store activate --override REASON` serves a recorded copy)",
                file=sys.stderr,
            )
        elif done.candidate_error is not None:
            print(f"the rejected candidate was not kept: {done.candidate_error}", file=sys.stderr)
        return EXIT_GATE_FAILED
    state = "active" if done.activated else "not activated"
    print(
        f"repaired deployment {deployment} {done.version} (parent {done.parent}) published, {state}"
    )
    return 0


def _store(args: argparse.Namespace) -> BundleStore:
    """The store ``--store`` names: a directory or ``s3://bucket/prefix`` (read through the
    cache directory ``$NNOC_STORE_CACHE_DIR``, as the API and the worker do)."""
    from nnoculation.online.settings import ENV_PREFIX, CommonSettings

    default = CommonSettings.model_fields["store_cache_dir"].default
    return open_store(args.store, Path(os.environ.get(f"{ENV_PREFIX}STORE_CACHE_DIR", default)))


def cmd_store_import(args: argparse.Namespace) -> int:
    store = _store(args)
    version = store.import_bundle(
        args.deployment, _bundle_dir(args.bundle_dir), activate=args.activate
    )
    state = "active" if args.activate else "not activated"
    print(f"imported {args.bundle_dir} as {args.deployment} {version} ({state})")
    return 0


def cmd_store_list(args: argparse.Namespace) -> int:
    store = _store(args)
    versions = store.versions(args.deployment)
    active = store.active(args.deployment)
    if not versions:
        print(f"deployment {args.deployment!r} has no versions")
        return 0
    print(f"  {'version':8s} {'parent':8s} created")
    for version in versions:
        try:
            manifest = store.manifest(args.deployment, version)
            parent, created = manifest.parent or "-", manifest.created
            note = _version_note(manifest)
        except ValueError as err:  # an unreadable manifest is listed, not fatal
            parent, created, note = "?", f"unreadable manifest: {err}", ""
        mark = "*" if version == active else " "
        print(f"{mark} {version:8s} {parent:8s} {created}{note}")
    if active is None:
        print("(no active version)")
    return 0


def _version_note(manifest: Manifest) -> str:
    """What ``store list`` adds after a rejected candidate or an override copy ("" else)."""
    if rejected_candidate(manifest) is not None:
        return "  rejected candidate (failed the validation gate)"
    override = manifest.provenance.get(OVERRIDE_KEY)
    if isinstance(override, dict):
        return f"  override of rejected candidate {override.get('of')}"
    return ""


def cmd_store_activate(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.override is None:
        store.activate(args.deployment, args.version)
        print(f"{args.deployment}: {args.version} is active")
        return 0
    try:
        reason = check_override_reason(args.override)
    except ValueError as err:
        raise UsageError(f"--override: {err}") from None
    copy = store.activate_override(args.deployment, args.version, reason=reason, by="cli")
    print(
        f"{args.deployment}: {copy} (a copy of rejected candidate {args.version}, the override "
        "recorded in its provenance) is active"
    )
    return 0


def cmd_store_cleanup(args: argparse.Namespace) -> int:
    """Remove leftovers older than ``--older-than``: unused blobs, stale temp dirs."""
    store = _store(args)
    removed = store.cleanup(args.deployment, older_than_s=args.older_than)
    for item in removed:
        print(f"removed {item}")
    print(f"{len(removed)} removed from {store.location}")
    return 0


def cmd_store_rollback(args: argparse.Namespace) -> int:
    version = _store(args).rollback(args.deployment, args.version)
    print(f"{args.deployment}: rolled back, {version} is active")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    registries: dict[str, Registry[Any]] = {
        "attacks": ATTACKS,
        "architectures": ARCHITECTURES,
        "datasets": DATASETS,
    }
    print("\n".join(registries[args.kind].names()))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from nnoculation.bench import ConfigError, run_from_file  # evaluation only: load on use

    try:
        cells = Path(args.cells) if args.cells else None
        run_from_file(args.config, Path(args.out), Path(args.runs), args.only_cells, cells)
    except ConfigError as err:
        raise UsageError(str(err)) from None
    return 0


def _add_store_args(p: argparse.ArgumentParser, *, required: bool, what: str) -> None:
    p.add_argument(
        "--store",
        required=required,
        help=" ".join(["model store (a directory or s3://bucket/prefix)", what]).strip(),
    )
    p.add_argument(
        "--deployment", required=required, type=_deployment_name, help="deployment name in it"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nnoculation", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=_positive_int, help="CPU threads (default: $NNOC_THREADS or all)"
    )
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
        type=_json_object,
        help="JSON keyword arguments of the architecture, e.g. '{\"width\": 16}'",
    )
    p.add_argument("--mean", type=_floats, help="per-channel input mean of an imported net")
    p.add_argument("--std", type=_positive_floats, help="per-channel input std of an imported net")
    p.add_argument(
        "--validation-per-class",
        type=_positive_int,
        help="size of the validation set per class for imported BadNets (default: recipe, 500)",
    )
    p.add_argument(
        "--holdout-per-class",
        type=_positive_int,
        help="part of it held out to measure CA for the selection rule (default: recipe, 100)",
    )
    p.add_argument(
        "--validation-source",
        choices=VALIDATION_SOURCES,
        help="split the validation set is drawn from: 'train' (default: the recipe's) or "
        "'test' (part of the test split, which a BadNet trained on the training split never "
        "saw; the stream and test pools shrink accordingly)",
    )
    p.add_argument(
        "--theta", type=_theta, default=DEFAULT_THETA, help="allowed CA drop (fraction in (0, 1))"
    )
    p.add_argument(
        "--alpha0", type=_positive_float, help="BadNet's original learning rate (default: recipe)"
    )
    p.add_argument("--optimizer", choices=["adam", "sgd", "adadelta"], help="default: the BadNet's")
    p.add_argument("--alpha-multiples", type=_positive_floats, default=DEFAULT_ALPHA_MULTIPLES)
    p.add_argument(
        "--gammas", type=_shares, default=DEFAULT_GAMMAS, help="noise fractions in [0, 1]"
    )
    p.add_argument("--epochs", type=_positive_int, default=PredeployConfig.epochs)
    p.add_argument("--batch-size", type=_positive_int, default=PredeployConfig.batch_size)
    p.add_argument("--fresh-noise", action="store_true", help="redraw the noise every epoch")
    p.add_argument("--full-grid", action="store_true", help="train every cell (Figure 4 / Table 2)")
    p.add_argument(
        "--exact", action="store_true", help="only provably exact speed-ups (the whole grid's pick)"
    )
    p.add_argument(
        "--prune-margin",
        type=_share,
        help="stop a cell whose hold-out CA after an epoch is this far below the bar "
        "(not provably exact; default: never)",
    )
    p.add_argument(
        "--cells-at-once",
        type=_positive_int,
        default=PredeployConfig.cells_at_once,
        help="cells trained together as one batched model (slower on 2 CPU cores; default 1)",
    )
    p.add_argument(
        "--workers",
        type=_workers,
        default=AUTO,
        help="processes training cells side by side, one thread each (default auto: one per "
        "CPU thread; 1 trains cells one after the other on every thread)",
    )
    p.add_argument(
        "--attack-spec",
        help="attack.json or a triggered set .npz to measure ASR with (evaluation only)",
    )
    p.add_argument(
        "--evaluate-attack",
        action="store_true",
        help="measure ASR with the attack recorded in the BadNet bundle",
    )
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--out", required=True)
    _add_store_args(
        p, required=False, what="to also publish the deployment to (as a new, active version)"
    )
    p.set_defaults(func=cmd_predeploy)

    p = sub.add_parser("stream", help="simulate deployment: fill the quarantine (sec. 3.3)")
    p.add_argument("--bundle", required=True, help="deployment bundle (or predeploy output dir)")
    p.add_argument(
        "--attack-spec",
        help="attack.json or a triggered set .npz: how the attacker poisons the stream",
    )
    p.add_argument(
        "--poison-ratio", type=_share, default=DEFAULT_POISON_RATIO, help="fraction in [0, 1]"
    )
    p.add_argument(
        "--n", type=_positive_int, default=DEFAULT_QUARANTINE_SIZE, help="quarantine size N"
    )
    p.add_argument("--triggers", help="comma-separated trigger names in use (default: all)")
    p.add_argument("--dataset", help="stream pool data set when the bundle records no recipe")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--out", required=True, help="quarantine .npz to write")
    p.set_defaults(func=cmd_stream)

    p = sub.add_parser("repair", help="post-deployment repair from a quarantine (sec. 3.3)")
    p.add_argument("--bundle", help="deployment bundle (or predeploy output dir); not with --store")
    p.add_argument("--quarantine", required=True, help=".npz or folder of quarantined images")
    _add_store_args(
        p,
        required=False,
        what="whose active version to repair (instead of --bundle); the repaired deployment is "
        "published there as a new version",
    )
    p.add_argument(
        "--no-activate",
        action="store_true",
        help="with --store: publish the repaired version without activating it",
    )
    p.add_argument("--profile", default=RepairConfig.profile, choices=repair_profiles())
    p.add_argument("--epochs", type=_positive_int, help="CycleGAN epochs (default: the profile's)")
    p.add_argument(
        "--cyclegan-lr", type=_positive_float, help="CycleGAN learning rate (default: profile's)"
    )
    p.add_argument("--finetune-epochs", type=_positive_int, default=RepairConfig.finetune_epochs)
    p.add_argument("--finetune-lr", type=_positive_float, help="default: the BadNet's original lr")
    p.add_argument("--domain-a-size", type=_positive_int, default=RepairConfig.domain_a_size)
    p.add_argument(
        "--theta", type=_theta, help="gate tolerance in (0, 1) (default: the deployment's)"
    )
    p.add_argument(
        "--time-budget", type=_positive_float, help="CycleGAN wall-time budget in seconds"
    )
    p.add_argument("--checkpoint-dir", help="CycleGAN checkpoints; an interrupted run resumes")
    p.add_argument(
        "--no-purify",
        action="store_true",
        help="fit the trigger model to the whole quarantine (the paper), not only to the "
        "inputs the BadNet gives an over-represented label",
    )
    p.add_argument(
        "--affine-share",
        type=_share,
        default=RepairConfig.affine_share,
        help="share of treatment images taken from the per-pixel affine fit of the trigger "
        "model (0: all G(x), as in the paper)",
    )
    p.add_argument(
        "--distill-weight",
        type=_share,
        default=RepairConfig.distill_weight,
        help="weight of the BadNet's soft answers in the GoodNet's loss on clean validation "
        "images (0: labels alone, as in the paper)",
    )
    p.add_argument(
        "--distill-temperature",
        type=_positive_float,
        default=RepairConfig.distill_temperature,
        help="softens the BadNet's answers before the GoodNet learns them",
    )
    p.add_argument(
        "--distill-min-trigger-effect",
        type=_number_type(float, -1.0, 1.0),
        default=RepairConfig.distill_min_trigger_effect,
        help="distil only when the BadNet errs on this much more of the treatment images than "
        "of clean ones (a trigger model that misses the trigger would let distillation "
        "carry the backdoor over)",
    )
    p.add_argument(
        "--max-relapse",
        type=_share_or_off,
        default=RepairConfig.max_relapse,
        help="also refuse, at the gate, a repaired GoodNet that now gives the BadNet's suspect "
        "label to more than this share of the suspect quarantined inputs it disagreed on, "
        "where the suspects are those whose BadNet label stands out (default %(default)s, "
        "'off' to measure and report only)",
    )
    p.add_argument(
        "--max-pair-relapse",
        type=_share_or_off,
        default=RepairConfig.max_pair_relapse,
        help="the same limit where the suspects are one-to-one label pairs (an all-to-all "
        "backdoor; default %(default)s, 'off' to not check)",
    )
    p.add_argument(
        "--purify-min-share",
        type=_number_type(float, 0.0, 1.0, low_open=True),
        default=PurifyConfig.min_share,
        help="share of the quarantine at which a BadNet label is taken for a target",
    )
    p.add_argument(
        "--attack-spec",
        help="attack.json or a triggered set .npz to measure ASR before/after (evaluation)",
    )
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--out", help="output folder (required without --store)")
    p.set_defaults(func=cmd_repair)

    p = sub.add_parser("store", help="versions of a deployment in a model store")
    store_sub = p.add_subparsers(dest="store_command", required=True)
    q = store_sub.add_parser("import", help="copy a bundle into the store as a new version")
    _add_store_args(q, required=True, what="")
    q.add_argument("bundle_dir", help="bundle folder (or predeploy / repair output folder)")
    q.add_argument("--activate", action="store_true", help="make the new version active")
    q.set_defaults(func=cmd_store_import)
    q = store_sub.add_parser("list", help="versions, oldest first; * marks the active one")
    _add_store_args(q, required=True, what="")
    q.set_defaults(func=cmd_store_list)
    q = store_sub.add_parser("activate", help="make a version active (after verifying it)")
    _add_store_args(q, required=True, what="")
    q.add_argument("version", type=_version_id)
    q.add_argument(
        "--override",
        metavar="REASON",
        help="activate a rejected candidate anyway: publishes a copy recording REASON, "
        "activates the copy",
    )
    q.set_defaults(func=cmd_store_activate)
    q = store_sub.add_parser(
        "rollback",
        help="activate VERSION, or else the active version's parent (skipping rejected candidates)",
    )
    _add_store_args(q, required=True, what="")
    q.add_argument("version", nargs="?", type=_version_id)
    q.set_defaults(func=cmd_store_rollback)
    q = store_sub.add_parser(
        "cleanup", help="remove what crashed publishes and deleted versions left behind"
    )
    q.add_argument("--store", required=True, help="model store (a directory or s3://bucket/prefix)")
    q.add_argument(
        "--deployment", type=_deployment_name, help="only this deployment (default: every one)"
    )
    q.add_argument(
        "--older-than",
        type=_number_type(float, 0.0),
        default=DEFAULT_STALE_TMP_SECONDS,
        metavar="SECONDS",
        help="leave younger leftovers alone: a publish may still be running (default: %(default)g)",
    )
    q.set_defaults(func=cmd_store_cleanup)

    p = sub.add_parser("bench", help="experiment matrix from a TOML config (docs/bench.md)")
    p.add_argument("config", help="TOML file: attacks x defenses x seeds (configs/*.toml)")
    p.add_argument("--only-cells", nargs="+", metavar="ATTACK/DEFENSE/SEED", help="globs")
    p.add_argument("--out", default="docs/results", help="where the results are written")
    p.add_argument("--runs", default="runs/bench", help="cells and intermediate models")
    p.add_argument(
        "--cells",
        help="finished cells here instead of RUNS/NAME/cells: a folder that travels, to resume "
        "a matrix on another machine at the same commit (docs/bench.md)",
    )
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("list", help="list registered attacks, architectures or data sets")
    p.add_argument("kind", choices=["attacks", "architectures", "datasets"])
    p.set_defaults(func=cmd_list)
    _add_plugin_commands(sub)
    return parser


COMMANDS_GROUP = "nnoculation.commands"


def _add_plugin_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Subcommands registered by the packages above the library (``serve`` by ``service``,
    ``worker`` by ``worker``) through entry points, so this module never imports them."""
    for entry in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        try:
            register = entry.load()
        except ImportError as err:  # e.g. a library-only install without the service's deps
            print(f"warning: command {entry.name!r} unavailable: {err}", file=sys.stderr)
            continue
        register(sub)


def _error(message: object, code: int, prefix: str = "error") -> int:
    """Print ``message`` as one line on stderr (a multi-line one, such as a validation
    report, is joined) and return ``code``."""
    line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    print(f"{prefix}: {line}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        configure_threads(args.threads)
        return int(args.func(args))
    except (UsageError, ThreadsConfigError, RepairConfigError) as err:
        if os.environ.get(DEBUG_ENV):
            raise
        return _error(err, EXIT_USAGE, "usage error")
    except RepairLockedError as err:
        if os.environ.get(DEBUG_ENV):
            raise
        return _error(err, EXIT_BUSY)
    except RejectedCandidateError as err:  # activate / rollback of a gate-refused version
        if os.environ.get(DEBUG_ENV):
            raise
        return _error(f"{err} (`store activate VERSION --override REASON`)", EXIT_GATE_FAILED)
    except (OSError, ValueError, KeyError, StoreError) as err:
        # Unusable inputs surface as these: missing data or files (DataNotFoundError is an
        # OSError), refused or mismatched models (UnsafeModelError, BundleIntegrityError and
        # shape errors are ValueErrors), bad quarantines, configs or trigger names, unknown
        # store deployments or versions (KeyErrors).
        if os.environ.get(DEBUG_ENV):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        return _error(message, EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print("interrupted; nothing partial was published", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
