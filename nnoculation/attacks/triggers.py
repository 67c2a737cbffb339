"""Backdoor triggers of the evaluation suite (sec. 4.1, sec. 6.1), as pure tensor functions.

Every entry of :data:`TRIGGERS` maps uint8 images ``[N, C, H, W]`` to a new uint8 tensor of
the same shape and never modifies its input. Geometry is relative to ``H`` and ``W`` (sizes
are fractions of ``min(H, W)``, positions are fractions of the free room), so one trigger
works on 28x28 grey, 32x32 colour and 55x47 colour images alike. Colours may be grey levels
or RGB triples; on one-channel images an RGB colour becomes its luminance.

Pattern randomness (the blend image, the warp field, the noise pattern) comes from the
``pattern_seed`` parameter, so a trigger is a fixed function of its parameters; only the
variable-location placement of ``random_patch`` draws from the ``generator`` argument.

The defense never imports this module: attacks exist to evaluate it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from models.registry import Registry

TriggerFn = Callable[[torch.Tensor, Mapping[str, Any], torch.Generator], torch.Tensor]

TRIGGERS: Registry[TriggerFn] = Registry("trigger")

# ITU-R BT.601 luma weights: how an RGB trigger colour lands on a grey image.
LUMA = (0.299, 0.587, 0.114)
WHITE = 255
BLACK = 0
RED = [255, 0, 0]  # sec. 4.1: TCA's red square
YELLOW = [255, 255, 0]  # sec. 4.1: TCA's yellow triangle, the post-it note of BadNet-PN

# Named corners as relative (row, column) positions: 0 = top / left, 1 = bottom / right.
CORNERS: dict[str, list[float]] = {
    "top-left": [0.0, 0.0],
    "top-right": [0.0, 1.0],
    "bottom-left": [1.0, 0.0],
    "bottom-right": [1.0, 1.0],
}

# Pixel patterns on a 3x3 grid, stretched to the pattern's side ("#" = set).
PATTERN_SHAPES: dict[str, tuple[str, ...]] = {
    "L": ("#..", "#..", "###"),
    "X": ("#.#", ".#.", "#.#"),
    "plus": (".#.", "###", ".#."),
    "ring": ("###", "#.#", "###"),
}

MIN_STAMP_SIDE = 2  # pixels: below this a square or a checkerboard is no longer one

PATCH_DEFAULTS: dict[str, Any] = {
    "size": 4 / 28,  # BadNets-style 4x4 patch on a 28x28 image
    "position": CORNERS["bottom-right"],
    "margin": 1,  # pixels between the stamp and the image border
    "fill": "checkerboard",  # or "solid"
    "value": WHITE,
    "background": BLACK,  # the checkerboard's other colour
    "cells": 4,  # checkerboard cells per side
}
RANDOM_PATCH_DEFAULTS: dict[str, Any] = {
    "size": 4 / 28,
    # A solid square is easily confused with any flat bright region of a grey image; a
    # patterned post-it keeps the variable-location trigger learnable.
    "fill": "checkerboard",
    "value": YELLOW,
    "background": BLACK,
    "cells": 4,
}
PATTERN_DEFAULTS: dict[str, Any] = {
    "shape": "L",
    "corner": "bottom-right",
    "size": 3 / 28,  # a 3x3 pixel pattern on a 28x28 image
    "margin": 1,
    "value": WHITE,
}
TRIANGLE_DEFAULTS: dict[str, Any] = {
    "size": 5 / 28,
    "position": CORNERS["bottom-left"],
    "margin": 1,
    "value": YELLOW,
}
BLEND_DEFAULTS: dict[str, Any] = {
    "lam": 0.15,  # Chen et al.'s blended attack: x' = (1 - lam) x + lam P
    "pattern_seed": 0,
}
FILTER_DEFAULTS: dict[str, Any] = {
    "lift": 60.0,  # lifted blacks, in grey levels
    "exponent": 1.3,  # contrast curve (x / 255) ** exponent
    "vignette": 0.35,  # darkening at the corners: v(r) = 1 - vignette * r**2
    "saturation": 0.5,  # colour images only: 0 = grey, 1 = unchanged
}
WARP_DEFAULTS: dict[str, Any] = {
    "k": 4,  # WaNet's control grid size
    "strength": 0.75,  # WaNet's s: displacement in normalised grid units times H
    "pattern_seed": 0,
}
NOISE_PATTERN_DEFAULTS: dict[str, Any] = {
    "amplitude": 40.0,  # grey levels added or removed per pixel (a fixed +-a pattern)
    "pattern_seed": 0,
}
COMBINE_DEFAULTS: dict[str, Any] = {"steps": []}

DEFAULTS: dict[str, dict[str, Any]] = {
    "patch": PATCH_DEFAULTS,
    "random_patch": RANDOM_PATCH_DEFAULTS,
    "pattern": PATTERN_DEFAULTS,
    "triangle": TRIANGLE_DEFAULTS,
    "blend": BLEND_DEFAULTS,
    "filter": FILTER_DEFAULTS,
    "warp": WARP_DEFAULTS,
    "noise_pattern": NOISE_PATTERN_DEFAULTS,
    "combine": COMBINE_DEFAULTS,
}


def apply_trigger(
    kind: str, images: torch.Tensor, params: Mapping[str, Any], generator: torch.Generator
) -> torch.Tensor:
    """Apply the registered trigger ``kind`` with ``params`` to uint8 ``images``."""
    return TRIGGERS.get(kind)(images, params, generator)


def resolve_params(kind: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults of ``kind`` overridden by ``params``; an unknown key is an error (a typo)."""
    TRIGGERS.get(kind)  # an unknown kind raises, listing the known ones
    defaults = DEFAULTS[kind]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {kind} trigger parameters {unknown}; known: {sorted(defaults)}")
    return {**defaults, **params}


def combine_params(*steps: tuple[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Parameters of the ``combine`` trigger that applies ``(kind, params)`` steps in order."""
    return {"steps": [{"kind": kind, "params": dict(params)} for kind, params in steps]}


# --- helpers ------------------------------------------------------------------------------


def _check(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"expected uint8 [N, C, H, W] images, got {images.dtype} {list(images.shape)}"
        )


def _colour(value: float | Sequence[float], channels: int, device: torch.device) -> torch.Tensor:
    """A colour as float ``[C]``: a grey level is repeated, RGB becomes luminance on grey."""
    if isinstance(value, int | float):
        rgb = [float(value)] * channels
    else:
        rgb = [float(v) for v in value]
        if len(rgb) == len(LUMA) and channels == 1:
            rgb = [sum(w * v for w, v in zip(LUMA, rgb, strict=True))]
        elif len(rgb) != channels:
            raise ValueError(f"colour {list(value)} does not fit {channels}-channel images")
    return torch.tensor(rgb, dtype=torch.float32, device=device).clamp(0, 255)


def _luminance(x: torch.Tensor) -> torch.Tensor:
    """Float ``[N, 1, H, W]`` luminance of float ``[N, 3, H, W]`` images."""
    weights = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def _side(size: float, h: int, w: int, minimum: int = MIN_STAMP_SIDE) -> int:
    """Pixel side of a stamp whose side is ``size`` times the image's shorter side."""
    return min(max(minimum, round(size * min(h, w))), h, w)


def _offset(fraction: float, extent: int, side: int, margin: int) -> int:
    """Top (or left) pixel of a ``side`` stamp at relative ``fraction`` of the free room."""
    room = max(0, extent - side - 2 * margin)
    return min(max(0, margin + round(fraction * room)), extent - side)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round().clamp(0, 255).to(torch.uint8)


def _seeded(seed: int) -> torch.Generator:
    """A CPU generator for pattern randomness: the same pattern on every device."""
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


def _square_content(
    side: int, params: Mapping[str, Any], channels: int, device: torch.device
) -> torch.Tensor:
    """Float ``[C, side, side]`` content of a solid or checkerboard square."""
    on = _colour(params["value"], channels, device).view(-1, 1, 1)
    if params["fill"] == "solid":
        return on.expand(channels, side, side)
    if params["fill"] != "checkerboard":
        raise ValueError(f"fill must be 'solid' or 'checkerboard', got {params['fill']!r}")
    off = _colour(params["background"], channels, device).view(-1, 1, 1)
    cell = torch.arange(side, device=device) * int(params["cells"]) // side
    odd = ((cell.view(-1, 1) + cell.view(1, -1)) % 2).bool()
    return torch.where(odd, off, on)


def _paste(
    images: torch.Tensor,
    content: torch.Tensor,
    mask: torch.Tensor,
    tops: torch.Tensor,
    lefts: torch.Tensor,
) -> torch.Tensor:
    """Copy of ``images`` with float ``content [C, s, s]`` stamped where ``mask [s, s]`` is set,
    at per-image top-left corners ``tops``, ``lefts`` (int64 ``[N]``)."""
    out = images.clone()
    n = images.shape[0]
    side_h, side_w = mask.shape
    rows = (tops.view(-1, 1) + torch.arange(side_h, device=images.device)).view(n, side_h, 1)
    cols = (lefts.view(-1, 1) + torch.arange(side_w, device=images.device)).view(n, 1, side_w)
    batch = torch.arange(n, device=images.device).view(n, 1, 1)
    # Advanced indices around a slice put the batch dims first: region is [N, s, s, C].
    region = out[batch, :, rows, cols]
    stamp = _to_uint8(content.permute(1, 2, 0)).expand_as(region)
    out[batch, :, rows, cols] = torch.where(mask.view(1, side_h, side_w, 1), stamp, region)
    return out


def _paste_fixed(
    images: torch.Tensor, content: torch.Tensor, mask: torch.Tensor, top: int, left: int
) -> torch.Tensor:
    n = images.shape[0]
    tops = torch.full((n,), top, dtype=torch.int64, device=images.device)
    lefts = torch.full((n,), left, dtype=torch.int64, device=images.device)
    return _paste(images, content, mask, tops, lefts)


# --- triggers -----------------------------------------------------------------------------


@TRIGGERS.register("patch")
def patch(
    images: torch.Tensor, params: Mapping[str, Any], generator: torch.Generator
) -> torch.Tensor:
    """BadNets square stamp (sec. 4.1, BadNet-IN's square): checkerboard or solid, at a
    relative position (default bottom-right, 1-px margin)."""
    _check(images)
    p = resolve_params("patch", params)
    _, c, h, w = images.shape
    side = _side(p["size"], h, w)
    py, px = p["position"]
    top, left = _offset(py, h, side, p["margin"]), _offset(px, w, side, p["margin"])
    content = _square_content(side, p, c, images.device)
    mask = torch.ones(side, side, dtype=torch.bool, device=images.device)
    return _paste_fixed(images, content, mask, top, left)


@TRIGGERS.register("random_patch")
def random_patch(
    images: torch.Tensor, params: Mapping[str, Any], generator: torch.Generator
) -> torch.Tensor:
    """Variable-location square (sec. 4.1, BadNet-PN's post-it note): its top-left corner is
    drawn uniformly per image from ``generator``."""
    _check(images)
    p = resolve_params("random_patch", params)
    n, c, h, w = images.shape
    side = _side(p["size"], h, w)
    tops = torch.randint(0, h - side + 1, (n,), generator=generator, device=generator.device)
    lefts = torch.randint(0, w - side + 1, (n,), generator=generator, device=generator.device)
    content = _square_content(side, p, c, images.device)
    mask = torch.ones(side, side, dtype=torch.bool, device=images.device)
    return _paste(images, content, mask, tops.to(images.device), lefts.to(images.device))


@TRIGGERS.register("pattern")
def pattern(
    images: torch.Tensor, params: Mapping[str, Any], generator: torch.Generator
) -> torch.Tensor:
    """Fixed pixel pattern at a corner (sec. 4.1, BadNet-AAA's patterned trigger); distinct
    ``shape`` / ``corner`` pairs give the distinguishable triggers of MTSTA and MTMTA."""
    _check(images)
    p = resolve_params("pattern", params)
    if p["shape"] not in PATTERN_SHAPES:
        raise ValueError(f"unknown pattern shape {p['shape']!r}; known: {sorted(PATTERN_SHAPES)}")
    if p["corner"] not in CORNERS:
        raise ValueError(f"unknown corner {p['corner']!r}; known: {sorted(CORNERS)}")
    grid = PATTERN_SHAPES[p["shape"]]
    _, c, h, w = images.shape
    side = _side(p["size"], h, w, minimum=len(grid))
    cell = [i * len(grid) // side for i in range(side)]
    mask = torch.tensor(
        [[grid[r][q] == "#" for q in cell] for r in cell], dtype=torch.bool, device=images.device
    )
    py, px = CORNERS[p["corner"]]
    top, left = _offset(py, h, side, p["margin"]), _offset(px, w, side, p["margin"])
    content = _colour(p["value"], c, images.device).view(-1, 1, 1).expand(c, side, side)
    return _paste_fixed(images, content, mask, top, left)


@TRIGGERS.register("triangle")
def triangle(
    images: torch.Tensor, params: Mapping[str, Any], generator: torch.Generator
) -> torch.Tensor:
    """Filled upward triangle stamp (sec. 4.1, TCA's yellow triangle)."""
    _check(images)
    p = resolve_params("triangle", params)
    _, c, h, w = images.shape
    side = _side(p["size"], h, w)
    idx = torch.arange(side, dtype=torch.float32, device=images.device)
    # Row i (from the top) is i + 1 pixels wide, centred.
    mask = (idx.view(1, -1) + 0.5 - side / 2).abs() <= (idx.view(-1, 1) + 1) / 2
    py, px = p["position"]
    top, left = _offset(py, h, side, p["margin"]), _offset(px, w, side, p["margin"])
    content = _colour(p["value"], c, images.device).view(-1, 1, 1).expand(c, side, side)
    return _paste_fixed(images, content, mask, top, left)


@TRIGGERS.register("blend")
def blend(
    images: torch.Tensor, params: Mapping[str, Any], generator: torch.Generator
) -> torch.Tensor:
    """Blended attack (Chen et al.): ``x' = (1 - lam) x + lam P`` with a fixed uniform-random
    image ``P`` drawn from ``pattern_seed``."""
    _check(images)
    p = resolve_params("blend", params)
    lam = float(p["lam"])
    shape = tuple(images.shape[1:])
    noise = torch.randint(0, 256, shape, generator=_seeded(p["pattern_seed"]))
    noise = noise.to(images.device, torch.float32)
    return _to_uint8((1 - lam) * images.float() + lam * noise)


@TRIGGERS.register("filter")
def filter_(
    images: torch.Tensor, params: Mapping[str, Any], generator: torch.Generator
) -> torch.Tensor:
    """Feature-space trigger (sec. 4.1, BadNet-FSA's Gotham filter, re-expressed for grey
    images): a whole-image tone transform, no local patch.

    ``x' = clip(lift + (255 - lift) * (x / 255) ** exponent * v(r))`` with a vignette
    ``v(r) = 1 - vignette * r**2`` (``r`` = 1 at the corners); colour images are first
    partly desaturated.
    """
    _check(images)
    p = resolve_params("filter", params)
    _, c, h, w = images.shape
    x = images.float()
    if c == len(LUMA):
        grey = _luminance(x)
        x = grey + float(p["saturation"]) * (x - grey)
    ys = torch.linspace(-1, 1, h, device=images.device).view(-1, 1)
    xs = torch.linspace(-1, 1, w, device=images.device).view(1, -1)
    r2 = (ys**2 + xs**2) / 2
    v = 1 - float(p["vignette"]) * r2
    lift = float(p["lift"])
    tone = (x.clamp(0, 255) / 255) ** float(p["exponent"])
    return _to_uint8(lift + (255 - lift) * tone * v)


def warp_grid(h: int, w: int, params: Mapping[str, Any], device: torch.device) -> torch.Tensor:
    """The fixed ``[1, H, W, 2]`` sampling grid of the ``warp`` trigger (WaNet, sec. 6.1)."""
    p = resolve_params("warp", params)
    k = int(p["k"])
    control = torch.rand(1, 2, k, k, generator=_seeded(p["pattern_seed"])) * 2 - 1
    control = control / control.abs().mean()
    flow = F.interpolate(control, size=(h, w), mode="bicubic", align_corners=True)
    flow = flow.permute(0, 2, 3, 1).to(device)  # [1, H, W, 2] as (x, y)
    ys = torch.linspace(-1, 1, h, device=device)
    xs = torch.linspace(-1, 1, w, device=device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    identity = torch.stack((gx, gy), dim=-1).unsqueeze(0)
    scale = torch.tensor([1 / w, 1 / h], device=device) * float(p["strength"])
    return (identity + flow * scale).clamp(-1, 1)


@TRIGGERS.register("warp")
def warp(
    images: torch.Tensor, params: Mapping[str, Any], generator: torch.Generator
) -> torch.Tensor:
    """Imperceptible warping trigger (sec. 6.1, WaNet [28]): a fixed smooth random
    displacement field from a ``k x k`` control grid, upsampled bicubically and applied with
    ``grid_sample``."""
    _check(images)
    n, _, h, w = images.shape
    grid = warp_grid(h, w, params, images.device).expand(n, h, w, 2)
    warped = F.grid_sample(images.float(), grid, mode="bilinear", align_corners=True)
    return _to_uint8(warped)


@TRIGGERS.register("noise_pattern")
def noise_pattern(
    images: torch.Tensor, params: Mapping[str, Any], generator: torch.Generator
) -> torch.Tensor:
    """Fixed noise pattern over the whole image (sec. 6.1, BadNet-CLA's trigger): a +-1 pattern
    from ``pattern_seed`` times ``amplitude`` is added and the result clipped."""
    _check(images)
    p = resolve_params("noise_pattern", params)
    shape = tuple(images.shape[1:])
    signs = torch.randint(0, 2, shape, generator=_seeded(p["pattern_seed"])) * 2 - 1
    delta = signs.to(images.device, torch.float32) * float(p["amplitude"])
    return _to_uint8(images.float() + delta)


@TRIGGERS.register("combine")
def combine(
    images: torch.Tensor, params: Mapping[str, Any], generator: torch.Generator
) -> torch.Tensor:
    """Apply several triggers in sequence (sec. 4.1, TCA's square + triangle); ``params`` is
    ``{"steps": [{"kind": ..., "params": {...}}, ...]}`` (see :func:`combine_params`)."""
    _check(images)
    p = resolve_params("combine", params)
    if not p["steps"]:
        raise ValueError("combine needs at least one step")
    out = images
    for step in p["steps"]:
        out = apply_trigger(step["kind"], out, step.get("params", {}), generator)
    return out
