"""The batched detailer: each detection -> square crop -> working size -> denoise -> blend back.

For detections in order: square crop on the 8 px grid (geometry.square_crop), Lanczos to the
working size, the scaffold's noise for that box resampled to the working latent size, one
conditioning row per crop, a batch denoiser, Lanczos back to the crop size, and a smoothstep
blend through a feathered mask (blend.blend touches only pixels with a > 0).

Batches hold only crops whose boxes do not overlap (and at most `batch_size` of them): a crop
that overlaps one already in the batch closes it, so it is cut from the canvas that batch
updated, exactly as one-by-one processing in order would. Batched == one by one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from lsd_runtime.blend import blend, mask_from_detection, resize_lanczos
from lsd_runtime.geometry import BoxOutsideCanvas, boxes_overlap, square_crop
from lsd_runtime.sampler import DenoiseItem, time_ids
from lsd_runtime.scaffold import derived_generator

Denoiser = Callable[[list[DenoiseItem]], list[np.ndarray]]


@dataclass
class DetailSettings:
    working_size: int = 1024  # crops are Lanczos-resized to this square (multiple of 8)
    pad: float = 0.25  # the crop grows by pad x the box's longer side on every side
    min_crop: int = 64  # crops are raised to at least this side (px)
    skip_below: int = 8  # detections whose box is smaller than this (px, longer side) are skipped
    feather: float = 32.0  # mask feather in canvas px
    grow: float = 0.0  # grow the detection shape by this many px before feathering
    batch_size: int = 4

    def check(self) -> None:
        if self.working_size % 8 or self.working_size < 8:
            raise ValueError(f"detail.working_size={self.working_size}: must be a positive multiple of 8")
        if int(self.batch_size) < 1:
            raise ValueError(f"detail.batch_size={self.batch_size}: must be >= 1")


@dataclass
class Crop:
    index: int  # detection index
    box: tuple[int, int, int, int]  # square pixel crop on the canvas
    detection: object
    mask: np.ndarray  # [h, w] crop-frame paste mask in [0, 1]
    seed: int
    row: object = None
    seconds: float = 0.0
    batch: int = -1


def plan_crops(detections: Sequence, canvas_wh: tuple[int, int], settings: DetailSettings, seed: int):
    """(crops, skipped): square crops of the usable detections, and why the others were skipped."""
    crops, skipped = [], []
    cw, ch = canvas_wh
    for i, det in enumerate(detections):
        x0, y0, x1, y1 = det.box_px(canvas_wh)
        ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, cw), min(y1, ch)
        if ix1 <= ix0 or iy1 <= iy0:
            skipped.append({"index": i, "box": list(det.box), "label": det.label, "reason": "box outside the canvas"})
            continue
        if max(ix1 - ix0, iy1 - iy0) < settings.skip_below:
            skipped.append({"index": i, "box": list(det.box), "label": det.label,
                            "reason": f"box {max(ix1 - ix0, iy1 - iy0):.1f}px is below the minimum {settings.skip_below}px"})
            continue
        try:
            box = square_crop(det.box, canvas_wh, pad=settings.pad, min_size=settings.min_crop, normalized=True)
        except BoxOutsideCanvas as exc:
            skipped.append({"index": i, "box": list(det.box), "label": det.label, "reason": str(exc)})
            continue
        mask = mask_from_detection(box, canvas_wh, box=det.box, mask=det.mask, feather_px=settings.feather,
                                   grow_px=settings.grow)
        item_seed = int(derived_generator("detail", seed, i, box).initial_seed())
        crops.append(Crop(i, box, det, mask, item_seed))
    return crops, skipped


def batches(crops: list[Crop], batch_size: int) -> list[list[Crop]]:
    """Consecutive groups of pairwise non-overlapping crops, at most `batch_size` each, in order."""
    out: list[list[Crop]] = []
    cur: list[Crop] = []
    for c in crops:
        if len(cur) >= batch_size or any(boxes_overlap(c.box, o.box) for o in cur):
            out.append(cur)
            cur = []
        cur.append(c)
    if cur:
        out.append(cur)
    return out


def detail(canvas: np.ndarray, detections: Sequence, scaffold, conditioner, denoise: Denoiser,
           settings: DetailSettings, seed: int | None = None) -> tuple[np.ndarray, list[Crop], list[dict]]:
    """Refine every detection on `canvas` (uint8 HxWx3); returns (canvas, crops, skipped)."""
    settings.check()
    canvas = np.asarray(canvas)
    h, w = canvas.shape[:2]
    if tuple(scaffold.pixel_size) != (w, h):
        raise ValueError(f"scaffold covers {scaffold.pixel_size[0]}x{scaffold.pixel_size[1]} px, canvas is {w}x{h}")
    seed = scaffold.seed if seed is None else int(seed)
    crops, skipped = plan_crops(detections, (w, h), settings, seed)
    if crops:
        canvas = canvas.copy()  # once: each crop is then pasted in place (the caller's array is never written)
    ws = int(settings.working_size)
    lat = ws // 8
    for b, group in enumerate(batches(crops, int(settings.batch_size))):
        start = time.perf_counter()
        views = []
        for c in group:
            x0, y0, x1, y1 = c.box
            views.append(resize_lanczos(Image.fromarray(canvas[y0:y1, x0:x1]), (ws, ws)))
        # a source that routes by label (the ComfyUI detailer's faces -> faces vault) sees the detections too
        rows = (conditioner.rows_for(views, [c.detection for c in group]) if hasattr(conditioner, "rows_for")
                else conditioner.rows(views))
        items = []
        for c, view, row in zip(group, views, rows):
            c.row, c.batch = row, b
            items.append(DenoiseItem(
                image=np.asarray(view, dtype=np.float32), noise=scaffold.slice(c.box, (lat, lat)), row=row,
                seed=c.seed, time_ids=time_ids((ws, ws))[0]))
        outputs = denoise(items)
        for c, out in zip(group, outputs):
            x0, y0, x1, y1 = c.box
            patch = resize_lanczos(np.asarray(out, dtype=np.float32), (x1 - x0, y1 - y0))
            blend(canvas, np.clip(patch, 0, 255), c.mask, c.box, inplace=True)
        per = (time.perf_counter() - start) / max(1, len(group))
        for c in group:
            c.seconds = per
    return canvas, crops, skipped


def crop_json(c: Crop) -> dict:
    x0, y0, x1, y1 = c.box
    d = c.detection
    out = {"index": c.index, "label": getattr(d, "label", ""), "score": round(float(getattr(d, "score", 1.0)), 6),
           "detection_box": [round(float(v), 6) for v in d.box], "crop_box": [x0, y0, x1, y1], "crop_size": x1 - x0,
           "batch": c.batch, "seed": c.seed, "seconds": round(c.seconds, 4)}
    if c.row is not None:
        out["conditioning"] = c.row.to_json()
    return out


def identity_denoiser(items: list[DenoiseItem]) -> list[np.ndarray]:
    """A denoiser that returns its input (tests: isolates geometry, blending and noise plumbing)."""
    return [np.asarray(it.image, dtype=np.float32).copy() for it in items]

