"""A user's own attack as a file: the *triggered set* ``.npz``.

A BadNet whose trigger is not in the catalog is measured from images that carry it. The file
holds (``np.savez``, no pickled objects):

- ``images``: uint8 ``[N, H, W, C]`` (channels last, as in the quarantine ``.npz`` that
  ``nnoculation stream`` writes), the triggered inputs;
- ``labels``: integer ``[N]``, their true labels;
- ``target``: the label the trigger sends them to, one integer (all-to-one) or integer ``[N]``
  (one per image, e.g. an all-to-all attack);
- ``name`` (optional): the trigger's name in reports (default: the file name without
  ``.npz``).

Its ASR is measured as for a catalog attack, over the images whose true label differs from
their target (:class:`nnoculation.metrics.TriggeredSetAttack`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nnoculation.metrics import TriggeredSetAttack

REQUIRED_KEYS = ("images", "labels", "target")
OPTIONAL_KEYS = ("name",)
QUARANTINE_KEYS = ("badnet_labels", "goodnet_labels", "eval_poisoned")


class TriggeredSetError(ValueError):
    """A file that is not a usable triggered set (missing or malformed arrays)."""


def is_triggered_set_file(path: Path | str) -> bool:
    """Whether ``path`` names a triggered set (a ``.npz``) rather than an ``attack.json``."""
    return Path(path).suffix.lower() == ".npz"


def _integers(array: np.ndarray, key: str, path: Path) -> torch.Tensor:
    if array.dtype.kind not in "iu":
        raise TriggeredSetError(f"{path}: {key!r} must hold integers, got {array.dtype}")
    if array.size and int(array.min()) < 0:
        raise TriggeredSetError(f"{path}: {key!r} must be non-negative class indices")
    return torch.from_numpy(array.astype(np.int64))


def load_triggered_set(path: Path | str) -> TriggeredSetAttack:
    """Read and check a triggered set ``.npz`` (:class:`TriggeredSetError` when malformed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such triggered set: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError) as err:
        raise TriggeredSetError(f"{path}: not a readable .npz ({err})") from None
    missing = [k for k in REQUIRED_KEYS if k not in arrays]
    if missing:
        hint = ""
        if any(k in arrays for k in QUARANTINE_KEYS):
            hint = (
                " (this looks like a quarantine written by `nnoculation stream`: pass it to "
                "`repair --quarantine`)"
            )
        raise TriggeredSetError(
            f"{path}: not a triggered set: missing {missing} (has {sorted(arrays)}; needs "
            f"images uint8 [N, H, W, C], labels [N], target){hint}"
        )
    unknown = sorted(set(arrays) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise TriggeredSetError(
            f"{path}: unknown arrays {unknown} (a triggered set holds {list(REQUIRED_KEYS)} and "
            f"optionally {list(OPTIONAL_KEYS)})"
        )
    images = arrays["images"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] == 0:
        raise TriggeredSetError(
            f"{path}: images must be a non-empty uint8 array [N, H, W, C], got {images.dtype} "
            f"{list(images.shape)}"
        )
    n = images.shape[0]
    labels = arrays["labels"]
    if labels.shape != (n,):
        raise TriggeredSetError(
            f"{path}: labels must be [N] = [{n}] (one per image), got {list(labels.shape)}"
        )
    target = arrays["target"]
    if target.shape not in ((), (n,)):
        raise TriggeredSetError(
            f"{path}: target must be one integer or [N] = [{n}] (one per image), got "
            f"{list(target.shape)}"
        )
    targets = _integers(np.broadcast_to(target, (n,)).copy(), "target", path)
    name = path.name.removesuffix(".npz")
    if "name" in arrays:
        value = arrays["name"]
        if value.shape != () or value.dtype.kind != "U" or not str(value).strip():
            raise TriggeredSetError(f"{path}: name must be one non-empty string")
        name = str(value).strip()
    try:
        return TriggeredSetAttack(
            name=name,
            images=torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
            labels=_integers(labels, "labels", path),
            targets=targets,
            source=str(path),
        )
    except TriggeredSetError:
        raise
    except ValueError as err:
        raise TriggeredSetError(str(err)) from None


def save_triggered_set(
    path: Path | str,
    images: torch.Tensor,
    labels: torch.Tensor,
    target: int | torch.Tensor,
    name: str | None = None,
) -> Path:
    """Write uint8 ``images`` ``[N, C, H, W]``, their true ``labels`` and the ``target`` (one
    label or one per image) as a triggered set ``.npz`` (channels last in the file)."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError("images must be uint8 [N, C, H, W]")
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"a triggered set is a .npz file, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        "images": images.permute(0, 2, 3, 1).contiguous().numpy(),
        "labels": labels.to(torch.int64).numpy(),
        "target": np.asarray(
            target.to(torch.int64).numpy() if isinstance(target, torch.Tensor) else int(target)
        ),
    }
    if name is not None:
        arrays["name"] = np.asarray(name)
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]  # numpy stubs: allow_pickle
    return path


__all__ = [
    "TriggeredSetError",
    "is_triggered_set_file",
    "load_triggered_set",
    "save_triggered_set",
]
