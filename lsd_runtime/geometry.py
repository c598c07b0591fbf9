"""Crop geometry for the detailer: square crops on the 8 px grid, padding, latent boxes.

Boxes are `(x0, y0, x1, y1)` with x1/y1 exclusive. A box is normalised (fractions of the
canvas) or in pixels; `square_crop` tells them apart by `normalized=` or, left to itself,
by whether every coordinate lies in [0, 1] and one of them is a float (so the whole-canvas
box (0.0, 0.0, 1.0, 1.0) is normalised, while (0, 0, 1, 1) is one pixel). Callers that
know which they hold should say so.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Box = tuple[int, int, int, int]


class BoxOutsideCanvas(ValueError):
    """A detection box that does not touch the canvas at all."""


def is_normalized(box: Sequence[float]) -> bool:
    """True when every coordinate lies in [0, 1] and at least one is a float or fractional."""
    vals = [float(v) for v in box]
    if not all(0.0 <= v <= 1.0 for v in vals):
        return False
    return any(isinstance(v, (float, np.floating)) for v in box) or any(v != int(v) for v in vals)


def to_pixels(box: Sequence[float], canvas_wh: tuple[int, int], *, normalized: bool | None = None) -> tuple[float, float, float, float]:
    """The box in pixel units (floats, unclipped)."""
    if len(box) != 4:
        raise ValueError(f"a box is (x0, y0, x1, y1), got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"box {box!r} has a non-finite coordinate")
    if normalized is None:
        normalized = is_normalized(box)
    if normalized:
        w, h = canvas_wh
        x0, x1, y0, y1 = x0 * w, x1 * w, y0 * h, y1 * h
    return x0, y0, x1, y1


def square_crop(
    box: Sequence[float],
    canvas_wh: tuple[int, int],
    *,
    pad: float = 0.25,
    min_size: int = 64,
    multiple: int = 8,
    normalized: bool | None = None,
) -> Box:
    """The square pixel crop around `box` for the detailer.

    The box (its part inside the canvas) is grown by `pad` x its longer side on every side,
    made square around its centre, raised to `min_size`, and rounded up to `multiple`.
    Corners land on the `multiple` grid. Near a border the square is shifted inside, never
    shrunk; it shrinks only when the canvas itself is smaller (to the largest multiple that
    fits). A box wholly outside the canvas raises `BoxOutsideCanvas`.
    """
    cw, ch = int(canvas_wh[0]), int(canvas_wh[1])
    if multiple <= 0:
        raise ValueError(f"multiple must be positive, got {multiple}")
    if cw < multiple or ch < multiple:
        raise ValueError(f"canvas {cw}x{ch} is smaller than one {multiple} px cell")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    x0, y0, x1, y1 = to_pixels(box, (cw, ch), normalized=normalized)
    if x1 < x0 or y1 < y0:
        raise ValueError(f"box {tuple(box)} has x1 < x0 or y1 < y0")
    if x1 <= 0 or y1 <= 0 or x0 >= cw or y0 >= ch:
        raise BoxOutsideCanvas(f"box {tuple(box)} lies outside the {cw}x{ch} canvas")
    x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(cw)), min(y1, float(ch))

    longest = max(x1 - x0, y1 - y0)
    side = max(longest * (1.0 + 2.0 * pad), float(min_size))
    side = int(math.ceil(side / multiple - 1e-9)) * multiple
    fit = (min(cw, ch) // multiple) * multiple
    side = min(side, fit)

    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    return _square(cx, cy, side, cw, ch, multiple)


def _square(cx: float, cy: float, side: int, cw: int, ch: int, multiple: int) -> Box:
    sx0 = _place(cx, side, cw, multiple)
    sy0 = _place(cy, side, ch, multiple)
    return (sx0, sy0, sx0 + side, sy0 + side)


def _place(centre: float, side: int, extent: int, multiple: int) -> int:
    """Start of a `side` span centred on `centre`, on the grid, shifted inside [0, extent]."""
    start = int(round((centre - side / 2.0) / multiple)) * multiple
    last = ((extent - side) // multiple) * multiple
    return min(max(start, 0), last)


def pad_to_multiple(image, multiple: int = 8):
    """Edge-replicate `image` on the right/bottom up to a multiple; returns (padded, (W, H)).

    Accepts a PIL image, an `[H, W]`/`[H, W, C]` numpy array or a `[..., H, W]` torch tensor,
    and returns the same kind.
    """
    kind, arr = _as_hw(image)
    h, w = _hw(kind, arr)
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return image, (w, h)
    if kind == "torch":
        import torch.nn.functional as F

        lead = arr.shape[:-2]
        flat = arr.reshape(1, -1, h, w)
        work = flat if flat.is_floating_point() else flat.float()  # replicate pad wants floats
        padded = F.pad(work, (0, pw, 0, ph), mode="replicate").to(arr.dtype)
        return padded.reshape(*lead, h + ph, w + pw), (w, h)
    widths = [(0, ph), (0, pw)] + [(0, 0)] * (arr.ndim - 2)
    padded = np.pad(arr, widths, mode="edge")
    return _back(kind, padded, image), (w, h)


def unpad(image, original_size: tuple[int, int]):
    """Crop a padded image back to `original_size=(W, H)`."""
    w, h = int(original_size[0]), int(original_size[1])
    kind, arr = _as_hw(image)
    if kind == "torch":
        return arr[..., :h, :w]
    return _back(kind, np.ascontiguousarray(arr[:h, :w]), image)


def latent_box(box_px: Sequence[int], scale: int = 8) -> Box:
    """Pixel box -> latent cells it touches (floor of the start, ceil of the end)."""
    x0, y0, x1, y1 = box_px
    return (int(x0) // scale, int(y0) // scale, -(-int(x1) // scale), -(-int(y1) // scale))


def boxes_overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    """True when the two boxes share a region of positive area."""
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes (0 when disjoint)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# --------------------------------------------------------------------------- image kinds


def _as_hw(image):
    try:
        from PIL import Image

        if isinstance(image, Image.Image):
            return "pil", np.asarray(image)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(image, np.ndarray):
        return "numpy", image
    try:
        import torch

        if isinstance(image, torch.Tensor):
            return "torch", image
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"expected a PIL image, numpy array or torch tensor, got {type(image).__name__}")


def _hw(kind, arr):
    if kind == "torch":
        return int(arr.shape[-2]), int(arr.shape[-1])
    return int(arr.shape[0]), int(arr.shape[1])


def _back(kind, arr, like):
    if kind == "pil":
        from PIL import Image

        return Image.fromarray(arr)
    return arr
