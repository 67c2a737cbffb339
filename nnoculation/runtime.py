"""Process-wide runtime choices: CPU threads and device; seeded RNG scopes that leave the
process's global RNG state as they found it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

THREADS_ENV = "NNOC_THREADS"


class ThreadsConfigError(ValueError):
    """``$NNOC_THREADS`` (or a thread count passed in) is not a positive integer."""


def configure_threads(threads: int | None = None) -> int:
    """Use ``threads`` intra-op threads (default: ``$NNOC_THREADS`` or every core we may use).

    Raises :class:`ThreadsConfigError` for a count below 1 or an ``$NNOC_THREADS`` that is not
    a positive integer, instead of guessing what was meant.
    """
    if threads is None:
        env = os.environ.get(THREADS_ENV, "").strip()
        if env:
            try:
                threads = int(env)
            except ValueError:
                raise ThreadsConfigError(
                    f"{THREADS_ENV} must be a positive integer (CPU threads), got {env!r}"
                ) from None
            source = THREADS_ENV
        else:
            threads = len(os.sched_getaffinity(0))
            source = "the CPU affinity"
    else:
        source = "threads"
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ThreadsConfigError(f"{source} must be a positive integer, got {threads!r}")
    torch.set_num_threads(threads)
    return threads


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Run the block with torch's global CPU RNG (and ``device``'s, if it is a CUDA device)
    seeded with ``seed``, and restore the caller's RNG states afterwards.

    Code that draws from the global RNG (weight initialisation, dropout) stays deterministic
    for a given seed without reseeding the RNG of the process it runs in: a library call must
    not change what the caller's next random draw gives.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    cuda = []
    if dev.type == "cuda":
        cuda = [dev.index if dev.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield
