"""``nnoculation bench``: an experiment matrix (attacks x defenses x seeds) from a TOML config,
resumable cell by cell, written as JSON, Markdown and a plot under ``docs/results/`` (issue
10; docs/bench.md). Evaluation only: nothing here runs in the service or the worker.

``config`` reads and checks the matrix, ``protocol`` fixes the splits and seeds, ``cells`` is
one measurement on disk and the resume rule, ``chain`` measures a cell, ``aggregate`` makes
Table 5's entries, ``output`` writes them, ``runner`` ties it together.
"""

from nnoculation.bench.config import BenchConfig, ConfigError, load_config, parse_config
from nnoculation.bench.runner import BenchRun, run_bench, run_from_file

__all__ = [
    "BenchConfig",
    "BenchRun",
    "ConfigError",
    "load_config",
    "parse_config",
    "run_bench",
    "run_from_file",
]
