"""Seconds per CycleGAN epoch of every profile (domain A = 500 images, sec. 4.2.2), measured
on real training iterations at 28x28 grey, 32x32 colour and the YouTube-Face 55x47 colour
input, scaled to one epoch. On a CPU a few iterations are timed; on CUDA a whole epoch.
Writes ``docs/results/cyclegan_speed.{json,md}``; figures of other devices already in the
file are kept, so a GPU run lands beside the CPU one."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch

from models.cyclegan import CYCLEGAN_PROFILES
from nnoculation.benchmarks.common import commit, load_entries, machine, write_results
from nnoculation.repair.cyclegan import train_cyclegan
from nnoculation.repair.engine import DEFAULT_DOMAIN_A_SIZE
from nnoculation.reports import markdown_table
from nnoculation.runtime import configure_threads, default_device

SHAPES = {"28x28x1": (1, 28, 28), "32x32x3": (3, 32, 32), "55x47x3": (3, 55, 47)}
CPU_ITERATIONS = 8
COMMAND = "make results-cyclegan-speed"


def seconds_per_epoch(
    profile_name: str, shape: tuple[int, int, int], device: torch.device, iterations: int | None
) -> dict[str, Any]:
    """Time ``iterations`` training iterations (default: 8 on a CPU, one epoch on CUDA)."""
    profile = CYCLEGAN_PROFILES.get(profile_name)
    epoch_iterations = math.ceil(DEFAULT_DOMAIN_A_SIZE / profile.batch_size)
    if iterations is None:
        iterations = epoch_iterations if device.type == "cuda" else CPU_ITERATIONS
    n = profile.batch_size * iterations
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    train_cyclegan(
        a[: profile.batch_size],
        b[: profile.batch_size],
        profile,
        epochs=1,
        device=device,
        progress=False,
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    train_cyclegan(a, b, profile, epochs=1, device=device, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    per_iteration = (time.perf_counter() - start) / iterations
    return {
        "profile": profile_name,
        "shape": "x".join(map(str, shape[1:])) + f"x{shape[0]}",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__,
        "measured_iterations": iterations,
        "seconds_per_iteration": round(per_iteration, 4),
        "seconds_per_epoch": round(per_iteration * epoch_iterations, 2),
        "epochs": profile.epochs,
        "seconds_total_estimate": round(per_iteration * epoch_iterations * profile.epochs, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", default="cpu-fast,cpu,paper")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="among " + ", ".join(SHAPES))
    parser.add_argument(
        "--iterations", type=int, default=None, help="default: 8 on a CPU, one epoch on CUDA"
    )
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args()
    configure_threads()
    device = default_device()
    # Figures from other devices (a GPU run of the same code, say) stay beside this run's.
    code = commit()
    out = Path(args.out)
    kept = {
        (e["profile"], e["shape"], e["device_name"]): e
        for e in load_entries(out / "cyclegan_speed.json", code)
    }
    for p in args.profiles.split(","):
        for shape_name in args.shapes.split(","):
            e = seconds_per_epoch(p, SHAPES[shape_name], device, args.iterations)
            kept[(e["profile"], e["shape"], e["device_name"])] = e
    entries = sorted(kept.values(), key=lambda e: (e["device_name"], e["profile"], e["shape"]))
    rows = [
        [
            e["profile"],
            e["shape"],
            e["device_name"],
            str(e["measured_iterations"]),
            f"{e['seconds_per_epoch']:.1f}",
            str(e["epochs"]),
            f"{e['seconds_total_estimate']:.0f}",
        ]
        for e in entries
    ]
    devices = sorted({e["device_name"] for e in entries})
    here = machine()
    md = "\n".join(
        [
            "# CycleGAN seconds per epoch",
            "",
            f"Devices: {', '.join(devices)}. One epoch = {DEFAULT_DOMAIN_A_SIZE} images of "
            "domain A; each figure is timed over the iterations given after one warm-up "
            "iteration (fp32, no AMP), then scaled to one epoch and to the profile's epochs.",
            "",
            markdown_table(
                [
                    "profile",
                    "input",
                    "device",
                    "iterations timed",
                    "s / epoch",
                    "epochs",
                    "s total (est.)",
                ],
                rows,
            ),
            "",
            f"This file was last written on {here['cuda'] or 'a CPU'}; entries of other "
            "devices were kept from earlier runs (each entry names its device and torch).",
        ]
    )
    write_results(out, "cyclegan_speed", entries, md, COMMAND, code=code)


if __name__ == "__main__":
    main()
