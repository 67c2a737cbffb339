"""Process-wide runtime choices: CPU threads, device and seeding."""

from __future__ import annotations

import os
import random

import numpy as np
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


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) for reproducible runs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
