"""What every benchmark shares: the machine description and writing results."""

from __future__ import annotations

import json
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

RUNS_DIR = Path("runs/bench")


def cpu_model() -> str:
    """The CPU's model name (``AMD EPYC ...``, ``Intel(R) Xeon(R) ...``) where Linux tells it,
    else the architecture: timings from two machines of one architecture can differ 2x, so a
    timing names the model it was taken on."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def provenance(code: str, device: str, date: bool = True) -> dict[str, Any]:
    """What every entry of a result file names: the code commit, torch, the device, the CPU
    and its threads (and, with ``date``, when it was made)."""
    out: dict[str, Any] = {
        "commit": code,
        "torch": torch.__version__,
        "device": device,
        "cpu": machine()["cpu"],
        "threads": torch.get_num_threads(),
    }
    if date:
        out["date"] = datetime.now(UTC).isoformat(timespec="seconds")
    return out


def commit() -> str:
    """The code commit being measured (``-dirty`` when tracked code differs from it)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
        # Result files written by an earlier benchmark of the same run are not code changes.
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
             ":(exclude)docs/results"],
            capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load_entries(path: Path) -> list[dict[str, Any]]:
    """Entries of an earlier results file (empty when there is none)."""
    if not path.exists():
        return []
    return list(json.loads(path.read_text()).get("entries", []))


def write_results(
    out_dir: Path,
    stem: str,
    entries: list[dict[str, Any]],
    markdown: str,
    command: str,
    extra: dict[str, Any] | None = None,
) -> None:
    """``<stem>.json`` (entries + how they were made) and ``<stem>.md`` (table + command)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine(),
        "entries": entries,
        **(extra or {}),
    }
    (out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(
        markdown.rstrip() + f"\n\nMade by `{command}` on {doc['machine']['cpu']} "
        f"({doc['machine']['threads']} threads, torch {doc['machine']['torch']}), "
        f"{doc['generated']}.\n"
    )


def fmt(value: float | list[float] | None) -> str:
    """A figure (or a list of per-trigger figures) for a Markdown table."""
    if value is None:
        return "-"
    if isinstance(value, list):
        return "/".join(f"{x:.1f}" for x in value)
    return f"{value:.1f}"


def pct1(value: float) -> float:
    """A fraction as a percentage rounded to 2 decimals (for JSON figures people read)."""
    return round(100 * value, 2)
