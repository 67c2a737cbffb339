"""What a finished bench run writes under ``docs/results/``: ``<name>.json`` (the entries and
how they were made), ``<name>.md`` (Table 5 as Markdown) and ``<name>.png`` (CA against ASR
per attack). :func:`check_document` is the schema every committed file of this command must
pass (``tests/test_bench.py`` runs it over ``docs/results/``), one code commit included.
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
    for e in doc["entries"]:
        where = f"entry {e.get('attack')!r}"
        _keys(where, e, ENTRY_KEYS)
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
    extra = {"schema": SCHEMA, "commit": commit, "config": cfg.model_dump()}
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
    return "; ".join(parts)


def markdown(cfg: BenchConfig, entries: list[dict[str, Any]], commit: str) -> str:
    rows = []
    for e in entries:
        row = [e["attack"], fmt(e["floor"]["median"])]
        for name in cfg.defenses:
            d = e["defenses"][name]
            text = f"{_pair(d['median'])} ({_pair(d['worst'])})"
            row.append(f"**{text}**" if d["pareto"] else text)
        rows.append([*row, _target_cell(e["target"])])
    seeds = ", ".join(str(s) for s in cfg.seeds)
    per_seed = [
        [
            e["attack"],
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
            markdown_table(["attack", "floor %", *cfg.defenses, "target met by"], rows),
            "",
            "## Per seed",
            "",
            markdown_table(
                ["attack", "defense", "seed", "CA %", "ASR %", "floor %", "defense s", "notes"],
                per_seed,
            ),
            "",
            f"![CA against ASR]({cfg.name}.png)",
        ]
    )


def _worst_asr(figures: dict[str, Any]) -> float:
    asr = figures["asr"]
    return max(asr) if isinstance(asr, list) else float(asr)


def plot(cfg: BenchConfig, entries: list[dict[str, Any]], path: Path) -> Path:
    """Median CA against median worst-trigger ASR per defense, one panel per attack; the bars
    reach the worst seed's figures, stars mark the Pareto front, the dashed line the target."""
    from matplotlib.figure import Figure  # no pyplot: no global state in the process

    cols = min(len(entries), 4)
    rows = -(-len(entries) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.6 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    colours = {name: f"C{i % 10}" for i, name in enumerate(cfg.defenses)}
    for ax, e in zip(axes, entries, strict=False):
        for name in cfg.defenses:
            d = e["defenses"][name]
            x, y = _worst_asr(d["median"]), d["median"]["ca"]
            ax.errorbar(
                [x],
                [y],
                xerr=[[0], [_worst_asr(d["worst"]) - x]],
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
        ax.set_title(e["attack"])
        ax.set_xlabel("ASR % (worst trigger)")
        ax.set_ylabel("CA %")
    for ax in axes[len(entries) :]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 2 * cols))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=PLOT_DPI)
    return path


def write_outputs(
    cfg: BenchConfig, entries: list[dict[str, Any]], command: str, out_dir: Path
) -> Path:
    """Check, then write ``<name>.json``, ``<name>.md`` and ``<name>.png`` into ``out_dir``."""
    extra, md = document(cfg, entries, command)
    probe = {"command": command, "generated": "", "machine": {}, "entries": entries, **extra}
    check_document(probe)  # nothing is written for a file that would break the schema
    plot(cfg, entries, out_dir / f"{cfg.name}.png")
    write_results(out_dir, cfg.name, entries, md, command, extra)
    return out_dir / f"{cfg.name}.json"
