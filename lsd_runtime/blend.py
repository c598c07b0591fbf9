"""Masks, Lanczos resizes and the smoothstep paste-back of a refined crop.

Images are numpy arrays `[H, W]` or `[H, W, C]`, uint8 or float (float in any range; the
caller's convention is kept). `blend` touches only pixels whose alpha is above zero, so
everything outside the mask is left bit for bit as it was.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image


def smoothstep(m):
    """a = m*m*(3 - 2m) on m clipped to [0, 1]: zero slope at both ends, no visible edge."""
    m = np.clip(np.asarray(m, dtype=np.float32), 0.0, 1.0)
    return m * m * (3.0 - 2.0 * m)


def _ramp(n: int, feather: float, lo_edge: bool = True, hi_edge: bool = True) -> np.ndarray:
    """1-D ramp: 0 on the outermost cell of each feathered end, 1 from `feather` cells in."""
    out = np.ones(n, dtype=np.float32)
    if feather <= 0 or n == 0:
        return out
    i = np.arange(n, dtype=np.float32)
    if lo_edge:
        out = np.minimum(out, i / feather)
    if hi_edge:
        out = np.minimum(out, (n - 1 - i) / feather)
    return np.clip(out, 0.0, 1.0)


def feather_mask(h: int, w: int, feather_px: float, *, edges: Sequence[bool] = (True, True, True, True)) -> np.ndarray:
    """`[h, w]` float32 mask: 1 inside, linear ramp to exactly 0 on the border pixels.

    `edges=(left, top, right, bottom)` chooses which sides are feathered (a side lying on the
    canvas border need not be). `feather_px <= 0` gives all ones.
    """
    left, top, right, bottom = edges
    fx = _ramp(int(w), float(feather_px), left, right)
    fy = _ramp(int(h), float(feather_px), top, bottom)
    return np.minimum(fy[:, None], fx[None, :])


def _crop_region_of(mask: np.ndarray, crop_box_px, canvas_wh, out_hw) -> np.ndarray:
    """Sample the part of a whole-image mask (any resolution) lying under the crop."""
    cw, ch = canvas_wh
    mh, mw = mask.shape[:2]
    x0, y0, x1, y1 = crop_box_px
    sx, sy = mw / cw, mh / ch
    region = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
    img = Image.fromarray(np.ascontiguousarray(mask, dtype=np.float32))
    out = img.resize((out_hw[1], out_hw[0]), Image.BILINEAR, box=region)
    return np.asarray(out, dtype=np.float32)


def mask_from_detection(
    crop_box_px: Sequence[int],
    canvas_wh: tuple[int, int],
    *,
    detection=None,
    box: Sequence[float] | None = None,
    mask: np.ndarray | None = None,
    feather_px: float = 32.0,
    grow_px: float = 0.0,
    out_hw: tuple[int, int] | None = None,
) -> np.ndarray:
    """The paste mask `[h, w]` of one detection in the crop frame (float32 in [0, 1]).

    `box` is the detection box normalised to the canvas; `mask` a whole-canvas soft or binary
    mask at any resolution (it wins over `box` when both are given). The shape is grown by
    `grow_px`, then ramps from 1 to 0 over `feather_px` outside it, and is finally multiplied
    by the crop's own feather so the crop border is always 0 (no edge can show), except on
    crop sides that lie on the canvas border.
    `detection` (anything with `.box` and `.mask`, e.g. `lsd_runtime.detect.Detection`)
    supplies both. `out_hw` defaults to the crop's pixel size.
    """
    from scipy.ndimage import distance_transform_edt

    if detection is not None:
        box = detection.box if box is None else box
        mask = getattr(detection, "mask", None) if mask is None else mask
    x0, y0, x1, y1 = (int(v) for v in crop_box_px)
    h, w = out_hw if out_hw is not None else (y1 - y0, x1 - x0)
    scale = w / max(1, x1 - x0)  # crop pixels -> output pixels
    if mask is not None:
        inside = _crop_region_of(np.asarray(mask, dtype=np.float32), (x0, y0, x1, y1), canvas_wh, (h, w)) >= 0.5
    elif box is not None:
        cw, ch = canvas_wh
        bx0, by0, bx1, by1 = box[0] * cw, box[1] * ch, box[2] * cw, box[3] * ch
        cols = (np.arange(w) + 0.5) / scale + x0
        rows = (np.arange(h) + 0.5) / scale + y0
        inside = ((rows >= by0) & (rows < by1))[:, None] & ((cols >= bx0) & (cols < bx1))[None, :]
    else:
        inside = np.ones((h, w), dtype=bool)
    if inside.all():
        soft = np.ones((h, w), dtype=np.float32)
    elif not inside.any():
        soft = np.zeros((h, w), dtype=np.float32)
    else:
        dist = distance_transform_edt(~inside).astype(np.float32) - grow_px * scale
        ramp = max(feather_px * scale, 1e-6)
        soft = np.clip(1.0 - dist / ramp, 0.0, 1.0)
    cw, ch = canvas_wh
    edges = (x0 > 0, y0 > 0, x1 < cw, y1 < ch)  # a crop side on the canvas border has nothing to seam with
    return soft * feather_mask(h, w, feather_px * scale, edges=edges)


def blend(canvas: np.ndarray, patch: np.ndarray, mask: np.ndarray, box: Sequence[int], *,
          inplace: bool = False) -> np.ndarray:
    """Paste `patch` into `canvas[box]` through `a = smoothstep(mask)`; returns a new canvas, or
    `canvas` itself written in place with `inplace=True` (a 4K canvas is 50 MB: copying it per crop
    cost more than the crop's own blend).

    `box=(x0, y0, x1, y1)` in canvas pixels, `patch` and `mask` of the box's size. Only pixels
    with a > 0 are written: the rest stay exactly as they were. uint8 canvases are blended in
    float32 and rounded; float canvases keep their dtype.
    """
    canvas = np.asarray(canvas)
    patch = np.asarray(patch)
    x0, y0, x1, y1 = (int(v) for v in box)
    if x0 < 0 or y0 < 0 or x1 > canvas.shape[1] or y1 > canvas.shape[0] or x1 <= x0 or y1 <= y0:
        raise ValueError(f"blend box {tuple(box)} is not inside the {canvas.shape[1]}x{canvas.shape[0]} canvas")
    region = canvas[y0:y1, x0:x1]
    if patch.shape != region.shape:
        raise ValueError(f"patch shape {patch.shape} does not match the box region {region.shape}")
    if mask.shape != region.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match the box region {region.shape[:2]}")
    a = smoothstep(mask)
    if region.ndim == 3:
        a = a[:, :, None]
    mixed = region.astype(np.float32) * (1.0 - a) + patch.astype(np.float32) * a
    if np.issubdtype(canvas.dtype, np.integer):
        info = np.iinfo(canvas.dtype)
        mixed = np.clip(np.rint(mixed), info.min, info.max)
    mixed = mixed.astype(canvas.dtype)
    if inplace and not canvas.flags.writeable:
        raise ValueError("blend(inplace=True) needs a writeable canvas")
    out = canvas if inplace else canvas.copy()
    out[y0:y1, x0:x1] = np.where(np.broadcast_to(a > 0, region.shape), mixed, region)
    return out


def resize_lanczos(img, size: tuple[int, int]):
    """Lanczos resize to `size=(W, H)` (PIL's filter); PIL in -> PIL out, numpy in -> numpy out.

    uint8 arrays go through PIL directly; float arrays are resized channel by channel in
    PIL's 32-bit float mode (no clipping, no quantisation).
    """
    w, h = int(size[0]), int(size[1])
    if isinstance(img, Image.Image):
        return img if img.size == (w, h) else img.resize((w, h), Image.LANCZOS)
    arr = np.asarray(img)
    if arr.shape[1] == w and arr.shape[0] == h:
        return arr.copy()
    if arr.dtype == np.uint8:
        return np.asarray(Image.fromarray(arr).resize((w, h), Image.LANCZOS))
    if arr.ndim == 2:
        return _resize_float(arr, w, h).astype(arr.dtype)
    chans = [_resize_float(arr[:, :, c], w, h) for c in range(arr.shape[2])]
    return np.stack(chans, axis=2).astype(arr.dtype)


def _resize_float(plane: np.ndarray, w: int, h: int) -> np.ndarray:
    img = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32))
    return np.asarray(img.resize((w, h), Image.LANCZOS), dtype=np.float32)
