"""Seconds per CycleGAN epoch of every profile (domain A = 500 images, sec. 4.2.2), measured
on a few real training iterations at 28x28 grey and 32x32 colour and scaled to one epoch.
Writes ``docs/results/cyclegan_speed.{json,md}``; on a machine with CUDA it reports the card."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch

from models.cyclegan import CYCLEGAN_PROFILES
from nnoculation.benchmarks.common import load_entries, machine, write_results
from nnoculation.repair.cyclegan import train_cyclegan
from nnoculation.repair.engine import DEFAULT_DOMAIN_A_SIZE
from nnoculation.reports import markdown_table
from nnoculation.runtime import configure_threads, default_device

SHAPES = {"28x28x1": (1, 28, 28), "32x32x3": (3, 32, 32)}
MEASURED_ITERATIONS = 8
COMMAND = "make results-cyclegan-speed"


def seconds_per_epoch(
    profile_name: str, shape: tuple[int, int, int], device: torch.device
) -> dict[str, Any]:
    profile = CYCLEGAN_PROFILES.get(profile_name)
    n = profile.batch_size * MEASURED_ITERATIONS
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
    per_iteration = (time.perf_counter() - start) / MEASURED_ITERATIONS
    iterations = math.ceil(DEFAULT_DOMAIN_A_SIZE / profile.batch_size)
    return {
        "profile": profile_name,
        "shape": "x".join(map(str, shape[1:])) + f"x{shape[0]}",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "seconds_per_iteration": round(per_iteration, 4),
        "seconds_per_epoch": round(per_iteration * iterations, 1),
        "epochs": profile.epochs,
        "seconds_total_estimate": round(per_iteration * iterations * profile.epochs, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", default="cpu-fast,cpu,paper")
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args()
    configure_threads()
    device = default_device()
    # Figures from other devices (a GPU run, say) stay beside this run's.
    out = Path(args.out)
    kept = {
        (e["profile"], e["shape"], e["device_name"]): e
        for e in load_entries(out / "cyclegan_speed.json")
    }
    for p in args.profiles.split(","):
        for shape in SHAPES.values():
            e = seconds_per_epoch(p, shape, device)
            kept[(e["profile"], e["shape"], e["device_name"])] = e
    entries = list(kept.values())
    rows = [
        [
            e["profile"],
            e["shape"],
            e["device_name"],
            f"{e['seconds_per_epoch']:.1f}",
            str(e["epochs"]),
            f"{e['seconds_total_estimate']:.0f}",
        ]
        for e in entries
    ]
    where = machine()["cuda"] or "CPU only (no GPU was lent to this session)"
    md = "\n".join(
        [
            "# CycleGAN seconds per epoch",
            "",
            f"Device: {where}. One epoch = {DEFAULT_DOMAIN_A_SIZE} images of domain A; "
            f"measured over {MEASURED_ITERATIONS} iterations after one warm-up iteration.",
            "",
            markdown_table(
                ["profile", "input", "device", "s / epoch", "epochs", "s total (est.)"], rows
            ),
        ]
    )
    write_results(out, "cyclegan_speed", entries, md, COMMAND)


if __name__ == "__main__":
    main()
