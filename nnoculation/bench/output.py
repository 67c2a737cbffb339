"""What a finished bench run writes under ``docs/results/``: ``<name>.json`` (the entries and
how they were made), ``<name>.md`` (Table 5 as Markdown) and ``<name>.png`` (CA against ASR
per attack). :func:`check_document` is the schema every committed file of this command must
pass (``tests/test_bench.py`` runs it over ``docs/results/``), one code commit included.

With variants, the entries are per (attack, variant) and carry ``variant`` (and ``x`` when
the variants have one); the Markdown has one row per variant, grouped by attack; the plot is
CA and ASR against x per attack (Figure 4c) when the variants have an x, else CA against ASR
per (attack, variant).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nnoculation.bench.aggregate import FLOOR_MARGIN, MIN_SEEDS, STAGES, one_commit
from nnoculation.bench.cells import is_clean
from nnoculation.bench.config import BenchConfig
from nnoculation.benchmarks.common import fmt, write_results
from nnoculation.reports import markdown_table

SCHEMA = "nnoculation-bench/1"
COMMAND = "nnoculation bench"  # every file this command writes has a command starting so
DOC_KEYS = {"schema", "command", "commit", "generated", "machine", "config", "entries"}
ENTRY_KEYS = {"attack", "triggers", "commit", "torch", "device", "date", "seeds", "floor"}
ENTRY_KEYS |= {"defenses", "pareto", "target"}
VARIANT_KEYS = {"variant"}  # added to an entry of a config with variants, with "x" when given
DEFENSE_KEYS = {"per_seed", "median", "worst", "pareto"}
SEED_KEYS = {"seed", "ca", "asr", "floor", "seconds", "details"}
PLOT_DPI = 120


def _keys(where: str, data: Any, expected: set[str]) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
    if set(data) != expected:
        missing, extra = sorted(expected - set(data)), sorted(set(data) - expected)
        raise ValueError(f"{where}: keys differ from the schema (missing {missing}, extra {extra})")


def check_document(doc: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless ``doc`` has this command's schema and every entry names the
    file's one commit (:class:`~nnoculation.bench.aggregate.MixedCommitsError`)."""
    _keys("file", doc, DOC_KEYS)
    if doc["schema"] != SCHEMA or not str(doc["command"]).startswith(COMMAND):
        raise ValueError(f"file: not a {SCHEMA} file of `{COMMAND}`")
    if not doc["entries"]:
        raise ValueError("file: no entries")
    variants = "variant" in doc["entries"][0]
    with_x = variants and "x" in doc["entries"][0]
    rows = [(e.get("attack"), e.get("variant")) for e in doc["entries"]]
    if len(set(rows)) != len(rows):
        raise ValueError("file: an (attack, variant) repeats")
    for e in doc["entries"]:
        where = f"entry {e.get('attack')!r}"
        expected = set(ENTRY_KEYS)
        if variants:
            where += f", variant {e.get('variant')!r}"
            expected |= VARIANT_KEYS | ({"x"} if with_x else set())
        _keys(where, e, expected)
        for name, d in e["defenses"].items():
            _keys(f"{where}, {name}", d, DEFENSE_KEYS)
            for agg in ("median", "worst"):
                _keys(f"{where}, {name}, {agg}", d[agg], {"ca", "asr"})
            if [s["seed"] for s in d["per_seed"]] != e["seeds"]:
                raise ValueError(f"{where}, {name}: per_seed does not follow the seeds")
            for s in d["per_seed"]:
                _keys(f"{where}, {name}, seed {s.get('seed')}", s, SEED_KEYS)
    one_commit([doc["commit"], *(e["commit"] for e in doc["entries"])])


def document(
    cfg: BenchConfig, entries: list[dict[str, Any]], command: str
) -> tuple[dict[str, Any], str]:
    """The fields :func:`write_outputs` adds to the entries, and the Markdown."""
    commit = one_commit(e["commit"] for e in entries)
    extra = {"schema": SCHEMA, "commit": commit, "config": cfg.dump()}
    return extra, markdown(cfg, entries, commit)


def _pair(figures: dict[str, Any]) -> str:
    return f"{fmt(figures['ca'])} / {fmt(figures['asr'])}"


def _target_cell(target: dict[str, Any]) -> str:
    """``met by`` and, per stage, on how many seeds it met the target."""
    counts = [
        f"{stage} {sum(v['per_seed'].values())}/{len(v['per_seed'])}"
        for _, stage in STAGES
        if (v := target.get(stage)) is not None
    ]
    if not counts:
        return "-"
    met = target["met_by"] or "**not met**"
    return f"{met} ({', '.join(counts)} seeds)" + (" provisional" if target["provisional"] else "")


def _note(details: dict[str, Any]) -> str:
    """What a per-seed row needs besides its figures: no GoodNet, the quarantine, the gate."""
    if details.get("goodnet") is False:
        return "no GoodNet within theta"
    parts = []
    if "quarantine" in details:
        q = details["quarantine"]
        parts.append(f"quarantine {q['size']}, P/R {q['precision']:.0f}/{q['recall']:.0f} %")
    if "passed_gate" in details:
        parts.append(
            "gate passed" if details["passed_gate"] else f"gate failed: {details['reason']}"
        )
    if details.get("relapse") is not None:
        basis = details.get("relapse_basis")
        parts.append(f"relapse {details['relapse']:.1f} %" + (f" ({basis})" if basis else ""))
    return "; ".join(parts)


def _x_label(cfg: BenchConfig) -> str:
    return cfg.x_label or "x"


def _lead(cfg: BenchConfig, e: dict[str, Any]) -> list[Any]:
    """The columns that name an entry's row: the attack, and its variant (and x)."""
    if not cfg.variants:
        return [e["attack"]]
    return [e["attack"], e["variant"], *([f"{e['x']:g}"] if "x" in e else [])]


def _lead_header(cfg: BenchConfig) -> list[str]:
    if not cfg.variants:
        return ["attack"]
    return ["attack", "variant", *([_x_label(cfg)] if cfg.variants[0].x is not None else [])]


def _overrides(cfg: BenchConfig) -> list[list[str]]:
    """Each variant's overrides of the top level, as the config gives them."""
    rows = []
    for v in cfg.variants:
        data = v.model_dump(exclude_defaults=True, exclude={"name", "x"})
        text = "; ".join(
            f"{section}: {', '.join(f'{k} = {val}' for k, val in values.items())}"
            if isinstance(values, dict)
            else f"{section} = {values}"
            for section, values in data.items()
        )
        rows.append([v.name, *([f"{v.x:g}"] if v.x is not None else []), text or "(none)"])
    return rows


def markdown(cfg: BenchConfig, entries: list[dict[str, Any]], commit: str) -> str:
    rows = []
    for e in entries:
        row = [*_lead(cfg, e), fmt(e["floor"]["median"])]
        for name in cfg.defenses:
            d = e["defenses"][name]
            text = f"{_pair(d['median'])} ({_pair(d['worst'])})"
            row.append(f"**{text}**" if d["pareto"] else text)
        rows.append([*row, _target_cell(e["target"])])
    seeds = ", ".join(str(s) for s in cfg.seeds)
    per_seed = [
        [
            *_lead(cfg, e),
            name,
            s["seed"],
            *(fmt(s[k]) for k in ("ca", "asr", "floor")),
            f"{s['seconds']:.0f}",
            _note(s["details"]),
        ]
        for e in entries
        for name in cfg.defenses
        for s in e["defenses"][name]["per_seed"]
    ]
    dirty = "" if is_clean(commit) else " **Uncommitted code: not a result to commit.**"
    variants: list[str] = []
    if cfg.variants:
        variants = [
            "",
            "## Variants",
            "",
            "One row per variant of each attack: the top level's settings with the variant's "
            "overrides below. Variants that change nothing the attacker controls share the "
            "BadNet, the clean reference model and the floor of each seed (docs/bench.md).",
            "",
            markdown_table([*_lead_header(cfg)[1:], "overrides"], _overrides(cfg)),
        ]
    return "\n".join(
        [
            f"# Bench `{cfg.name}`: {cfg.dataset}, {cfg.split} split, seeds {seeds}",
            "",
            "Each defense: CA % / ASR % as the median over the seeds, then in brackets the "
            "worst seed's (lowest CA, highest ASR per trigger; ASR per trigger joined by '/'). "
            "Bold: on the attack's Pareto front (median CA up, median worst-trigger ASR down; "
            "the BadNet itself and oracle defenses left out). Floor: the clean reference "
            "model's target rate on the same triggered images (median over the seeds). "
            f"Target: ASR <= floor + {FLOOR_MARGIN:g} points for every trigger on every seed; "
            "'met by' names the first stage that meets it, pre-deployment alone, then the "
            "repair, with the seeds on which each stage met it (provisional: fewer than "
            f"{MIN_SEEDS} seeds). Protocol and seeds: "
            f"docs/bench.md. Code commit `{commit}`.{dirty}",
            "",
            markdown_table([*_lead_header(cfg), "floor %", *cfg.defenses, "target met by"], rows),
            *variants,
            "",
            "## Per seed",
            "",
            markdown_table(
                [
                    *_lead_header(cfg),
                    "defense",
                    "seed",
                    "CA %",
                    "ASR %",
                    "floor %",
                    "defense s",
                    "notes",
                ],
                per_seed,
            ),
            "",
            f"![{_plot_title(cfg)}]({cfg.name}.png)",
        ]
    )


def worst_asr(figures: dict[str, Any]) -> float:
    """A cell's ASR on its worst trigger (one figure, or one per trigger)."""
    asr = figures["asr"]
    return max(asr) if isinstance(asr, list) else float(asr)


def _plot_title(cfg: BenchConfig) -> str:
    if cfg.variants and cfg.variants[0].x is not None:
        return f"CA and ASR against {_x_label(cfg)}"
    return "CA against ASR"


def plot(cfg: BenchConfig, entries: list[dict[str, Any]], path: Path) -> Path:
    """Median CA against median worst-trigger ASR per defense, one panel per attack (per attack
    and variant in a config with variants); the bars reach the worst seed's figures, stars
    mark the Pareto front, the dashed line the target. Variants with an x: :func:`plot_x`."""
    if cfg.variants and cfg.variants[0].x is not None:
        return plot_x(cfg, entries, path)
    from matplotlib.figure import Figure  # no pyplot: no global state in the process

    cols = min(len(entries), 4)
    rows = -(-len(entries) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.6 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    colours = {name: f"C{i % 10}" for i, name in enumerate(cfg.defenses)}
    for ax, e in zip(axes, entries, strict=False):
        for name in cfg.defenses:
            d = e["defenses"][name]
            x, y = worst_asr(d["median"]), d["median"]["ca"]
            ax.errorbar(
                [x],
                [y],
                xerr=[[0], [worst_asr(d["worst"]) - x]],
                yerr=[[y - d["worst"]["ca"]], [0]],
                fmt="*" if d["pareto"] else "o",
                markersize=12 if d["pareto"] else 6,
                color=colours[name],
                label=name,
                capsize=2,
            )
        floor = e["floor"]["median"]
        ax.axvline(max(floor) if isinstance(floor, list) else floor, color="grey", lw=0.8)
        target = (max(floor) if isinstance(floor, list) else floor) + FLOOR_MARGIN
        ax.axvline(target, color="grey", ls="--", lw=0.8)
        ax.set_title(e["attack"] + (f" / {e['variant']}" if "variant" in e else ""))
        ax.set_xlabel("ASR % (worst trigger)")
        ax.set_ylabel("CA %")
    for ax in axes[len(entries) :]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 2 * cols))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=PLOT_DPI)
    return path


def plot_x(cfg: BenchConfig, entries: list[dict[str, Any]], path: Path) -> Path:
    """Figure 4c's form: per attack, the median CA (top) and the median worst-trigger ASR
    (bottom) of each defense against the variants' x, the bars reaching the worst seed's
    figure (lowest CA, highest ASR); on the ASR panel the median floor (grey) and the target,
    floor + 2 points (dashed). A log x axis when every x is positive and they span 20x."""
    from matplotlib.figure import Figure  # no pyplot: no global state in the process

    cols = len(cfg.attacks)
    fig = Figure(figsize=(4.6 * cols, 6.4 + 0.6), layout="constrained")
    axes = fig.subplots(2, cols, squeeze=False, sharex="col")
    colours = {name: f"C{i % 10}" for i, name in enumerate(cfg.defenses)}
    xs_all = [float(e["x"]) for e in entries]
    log = min(xs_all) > 0 and max(xs_all) >= 20 * min(xs_all)
    for col, attack in enumerate(cfg.attacks):
        mine = sorted((e for e in entries if e["attack"] == attack), key=lambda e: e["x"])
        xs = [float(e["x"]) for e in mine]
        ca_ax, asr_ax = axes[0][col], axes[1][col]
        for name in cfg.defenses:
            med = [e["defenses"][name]["median"] for e in mine]
            worst = [e["defenses"][name]["worst"] for e in mine]
            ca = [m["ca"] for m in med]
            asr = [worst_asr(m) for m in med]
            style = {"color": colours[name], "marker": "o", "capsize": 2, "label": name}
            ca_low = [c - w["ca"] for c, w in zip(ca, worst, strict=True)]
            asr_high = [worst_asr(w) - a for a, w in zip(asr, worst, strict=True)]
            ca_ax.errorbar(xs, ca, yerr=[ca_low, [0.0] * len(ca)], **style)
            asr_ax.errorbar(xs, asr, yerr=[[0.0] * len(asr), asr_high], **style)
        floors = [_worst_floor(e["floor"]["median"]) for e in mine]
        asr_ax.plot(xs, floors, color="grey", lw=0.8)
        asr_ax.plot(xs, [f + FLOOR_MARGIN for f in floors], color="grey", ls="--", lw=0.8)
        ca_ax.set_title(attack)
        ca_ax.set_ylabel("CA %")
        asr_ax.set_ylabel("ASR % (worst trigger)")
        asr_ax.set_xlabel(_x_label(cfg))
        if log:
            asr_ax.set_xscale("log")
        asr_ax.set_xticks(xs, [f"{x:g}" for x in xs])
        asr_ax.set_xticks([], minor=True)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=PLOT_DPI)
    return path


def _worst_floor(floor: float | list[float]) -> float:
    return max(floor) if isinstance(floor, list) else float(floor)


def write_outputs(
    cfg: BenchConfig, entries: list[dict[str, Any]], command: str, out_dir: Path
) -> Path:
    """Check, then write ``<name>.json``, ``<name>.md`` and ``<name>.png`` into ``out_dir``."""
    extra, md = document(cfg, entries, command)
    probe = {"command": command, "generated": "", "machine": {}, "entries": entries, **extra}
    check_document(probe)  # nothing is written for a file that would break the schema
    plot(cfg, entries, out_dir / f"{cfg.name}.png")
    write_results(out_dir, cfg.name, entries, md, command, extra, extra["commit"])
    return out_dir / f"{cfg.name}.json"
