"""The toy world's oracle: image -> scene attributes, from the rendering rules of `world`.

Works on renders of either style and on generated images of any size (>= 32 px):
  background  the median of the image's border pixels, nearest background colour;
  shape mask  pixels far from that background (a 3x3 opening drops speckles), each row's span
              filled so the mark never leaves a hole (all shapes are convex);
  size        the mask's bounding-box extent against the midpoint of small and large;
  position    the mask's centroid x against the midpoints of left, middle and right;
  shape       the ideal shape (square, inscribed circle, apex-up triangle) fitted to the mask's
              bounding box that overlaps the mask best;
  color       a vote of the mask's pixels (mark excluded) for their nearest fill or outline colour;
  mark        the mean of a disc at the mask's centroid (where the mark is drawn), nearest of white,
              black and the measured fill colour ("none": no mark legible there).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from luna.models.toy import world

BG_DISTANCE = 40.0  # a pixel this far (RGB) from the background belongs to the shape
SIZE_SPLIT = 0.38  # bounding-box extent / image side: small below, large above
POSITION_SPLITS = (0.41, 0.59)  # centroid x / image side: left | middle | right


@dataclass(frozen=True)
class Reading:
    """What the oracle read from one image; an attribute is None when nothing could be read."""

    shape: str | None
    color: str | None
    background: str | None
    size: str | None
    position: str | None
    mark: str | None  # "white" | "black" | "none" (no mark legible) | None

    def as_dict(self) -> dict[str, str | None]:
        return {k: getattr(self, k) for k in world.ATTRIBUTES}


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    d = np.linalg.norm(np.asarray([palette[n] for n in names], np.float32) - rgb[None], axis=1)
    return names[int(np.argmin(d))]


def _erode(mask: np.ndarray, k: int) -> np.ndarray:
    return world._erode(mask, k) if k > 0 else mask


def _dilate(mask: np.ndarray, k: int) -> np.ndarray:
    return world._erode(mask, k, dilate=True) if k > 0 else mask


def _neighbours(mask: np.ndarray) -> np.ndarray:
    """Number of set pixels in each pixel's 3x3 neighbourhood (itself included)."""
    p = np.pad(mask.astype(np.int16), 1)
    h, w = mask.shape
    return sum(p[dy: dy + h, dx: dx + w] for dy in range(3) for dx in range(3))


def _shape(box: np.ndarray) -> str:
    """The shape whose ideal mask, fitted to the bounding box, overlaps `box` best (IoU)."""
    h, w = box.shape
    y, x = np.mgrid[0:h, 0:w] + 0.5
    u, v = x / w - 0.5, y / h  # u in -0.5..0.5, v in 0..1 (top to bottom)
    ideal = {
        "square": np.ones_like(box),
        "circle": (2 * u) ** 2 + (2 * v - 1) ** 2 <= 1.0,
        "triangle": np.abs(u) <= 0.5 * v,
    }
    iou = {k: (box & m).sum() / max(1, (box | m).sum()) for k, m in ideal.items()}
    return max(iou, key=iou.get)


_FILLS = np.asarray(list(world.COLORS.values()), np.float32)
_CANDIDATES = np.concatenate([_FILLS, _FILLS * world.OUTLINE_DARKEN])  # fills, then outlines


def _fill_color(img: np.ndarray, region: np.ndarray) -> tuple[str, np.ndarray]:
    """(colour name, its median RGB): each region pixel votes for its nearest fill or outline
    colour; the fill colour with most votes wins (outline and edge pixels vote for no fill)."""
    px = img[region] if region.any() else img.reshape(-1, 3)
    nearest = np.argmin(np.linalg.norm(px[:, None] - _CANDIDATES[None], axis=2), axis=1)
    votes = np.bincount(nearest[nearest < len(_FILLS)], minlength=len(_FILLS))
    if votes.sum() == 0:  # only outline-coloured pixels: read the colour they darken
        votes = np.bincount(nearest - len(_FILLS), minlength=len(_FILLS))
    k = int(np.argmax(votes))
    chosen = px[nearest % len(_FILLS) == k]
    return list(world.COLORS)[k], np.median(chosen, axis=0)


def _to_array(image) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"oracle: expected an RGB image [H,W,3], got shape {a.shape}")
    a = a[..., :3]
    if a.dtype != np.uint8:  # float images in 0..1 (pipeline output_type="np")
        a = np.clip(np.rint(np.asarray(a, np.float32) * 255.0), 0, 255)
    return a.astype(np.float32)


def read(image) -> Reading:
    """The attributes of one image (uint8 or 0..1 float, [H,W,3])."""
    img = _to_array(image)
    h, w, _ = img.shape
    border = max(1, min(h, w) // 32)
    frame = np.concatenate([img[:border].reshape(-1, 3), img[-border:].reshape(-1, 3),
                            img[:, :border].reshape(-1, 3), img[:, -border:].reshape(-1, 3)])
    bg_rgb = np.median(frame, axis=0)
    background = _nearest(bg_rgb, world.BACKGROUNDS)
    mask = np.linalg.norm(img - bg_rgb[None, None], axis=2) > BG_DISTANCE
    mask &= _neighbours(mask) >= 3  # drop isolated speckles, keep thin tips
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return Reading(None, None, background, None, None, None)
    filled = np.zeros_like(mask)
    for y in rows:
        xs = np.flatnonzero(mask[y])
        filled[y, xs[0]: xs[-1] + 1] = True
    cols = np.flatnonzero(filled.any(axis=0))
    bw, bh = cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1
    side = float(min(h, w))
    extent = max(bw, bh) / side
    size = "small" if extent < SIZE_SPLIT else "large"
    shape = _shape(filled[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1])
    ys, xs = np.nonzero(filled)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    fx = cx / w
    position = "left" if fx < POSITION_SPLITS[0] else "middle" if fx < POSITION_SPLITS[1] else "right"

    r_px = max(bw, bh) / 2.0
    gy, gx = np.mgrid[0:h, 0:w] + 0.5
    d2 = (gx - cx) ** 2 + (gy - cy) ** 2
    inner = _erode(filled, 1)  # edge pixels blend with the background
    color, fill_rgb = _fill_color(img, (inner if inner.sum() >= 8 else filled) & (d2 > (0.5 * r_px) ** 2))

    spot = d2 <= max(0.5, 0.5 * world.MARK_RATIO * r_px) ** 2
    if not spot.any():
        spot = d2 <= d2.min()
    mark_rgb = img[spot].mean(axis=0)
    mark = _nearest(mark_rgb, {**world.MARKS, "none": tuple(fill_rgb)})
    return Reading(shape, color, background, size, position, mark)


def agreement(reading: Reading, scene: world.Scene, attributes=world.ATTRIBUTES) -> dict[str, bool]:
    """{attribute: reading matches the scene} for the given attributes."""
    return {a: getattr(reading, a) == getattr(scene, a) for a in attributes}


def accuracy(images, scenes, attributes=world.ATTRIBUTES) -> dict[str, float]:
    """Per-attribute accuracy and `joint` (all of `attributes` right) of images against their scenes."""
    hits = {a: 0 for a in attributes}
    joint = 0
    n = 0
    for image, scene in zip(images, scenes):
        ok = agreement(read(image), scene, attributes)
        for a, v in ok.items():
            hits[a] += v
        joint += all(ok.values())
        n += 1
    if n == 0:
        raise ValueError("oracle.accuracy: no images")
    out = {a: hits[a] / n for a in attributes}
    out["joint"] = joint / n
    return out
