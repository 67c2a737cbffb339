"""Process-wide runtime choices: CPU threads and device."""

from __future__ import annotations

import os

import torch

THREADS_ENV = "NNOC_THREADS"


def configure_threads(threads: int | None = None) -> int:
    """Use ``threads`` intra-op threads (default: ``$NNOC_THREADS`` or every core we may use)."""
    if threads is None:
        env = os.environ.get(THREADS_ENV)
        threads = int(env) if env else len(os.sched_getaffinity(0))
    threads = max(1, threads)
    torch.set_num_threads(threads)
    return threads


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
