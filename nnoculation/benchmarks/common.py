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


def is_clean(code: str) -> bool:
    """Whether ``code`` names committed code (not ``-dirty``, not ``unknown``)."""
    return len(code) == 40 and all(c in "0123456789abcdef" for c in code)


def load_entries(path: Path, code: str) -> list[dict[str, Any]]:
    """The entries of an earlier results file that the same clean commit ``code`` made (empty
    when there is none). A run resumes or extends a file only with its own code's entries;
    entries of other code are measured again, never merged (each file names one commit)."""
    if not path.exists() or not is_clean(code):
        return []
    earlier = list(json.loads(path.read_text()).get("entries", []))
    return [e for e in earlier if e.get("commit") == code]


def write_results(
    out_dir: Path,
    stem: str,
    entries: list[dict[str, Any]],
    markdown: str,
    command: str,
    extra: dict[str, Any] | None = None,
    code: str | None = None,
) -> None:
    """``<stem>.json`` (entries + how they were made) and ``<stem>.md`` (table + command).

    The file names the one code commit that made it (``code``, else the working tree's): an
    entry without a ``commit`` gets it, and entries naming another commit are refused."""
    code = code or commit()
    stamped = [e if "commit" in e else {"commit": code, **e} for e in entries]
    others = sorted({str(e["commit"]) for e in stamped} - {code})
    if others:
        raise ValueError(f"{stem}: entries of other code ({', '.join(others)}) beside {code}")
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "commit": code,
        "machine": machine(),
        "entries": stamped,
        **(extra or {}),
    }
    (out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(
        markdown.rstrip() + f"\n\nMade by `{command}` at {code[:12]} on {doc['machine']['cpu']} "
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
