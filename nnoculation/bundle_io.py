"""Write a standalone bundle directory atomically (temp dir, fsync, rename).

Versioned deployments go through :class:`models.store.ModelStore`; this is for the single
bundles the CLI writes into an output folder (a BadNet, a deployment, a repaired deployment).
An interrupted write leaves the previous bundle, or nothing, never half a bundle.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from models.bundle import Manifest, write_bundle
from models.durable import fsync_tree
from models.nets import Net

FIRST_VERSION = "v0001"


def write_bundle_dir_with(target: Path, build: Callable[[Path], Manifest]) -> Manifest:
    """Let ``build`` write a bundle into a temp dir beside ``target``, then swap it in."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        manifest = build(tmp)
        fsync_tree(tmp)
        old = None
        if target.exists():
            old = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return manifest
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_bundle_dir(
    target: Path,
    *,
    name: str,
    nets: dict[str, Net],
    class_names: tuple[str, ...] | list[str],
    metrics: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    extra_files: dict[str, bytes] | None = None,
    version: str = FIRST_VERSION,
    parent: str | None = None,
) -> Manifest:
    """Write a bundle to ``target`` atomically, replacing any bundle already there."""
    if not nets:
        raise ValueError("a bundle needs at least one net")
    spec = next(iter(nets.values())).spec
    return write_bundle_dir_with(
        target,
        lambda tmp: write_bundle(
            tmp,
            name=name,
            version=version,
            parent=parent,
            spec=spec,
            class_names=list(class_names),
            nets=nets,
            tensors=tensors,
            metrics=metrics or {},
            provenance=provenance or {},
            extra_files=extra_files,
        ),
    )
