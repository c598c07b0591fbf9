"""The global refiner's tile grid, its passes, and seamless feathered accumulation.

Grid: tiles of `tile` px with at least `overlap` px overlap (a quarter tile by default),
spread evenly so the first and last tiles touch the canvas edges: 4096 px with 1024 tiles
gives 5 x 5 tiles at stride (4096 - 1024) / 4 = 768, i.e. 256 px overlap in both axes.

How many "chessboard" passes? `mode="chessboard"` (the default, DESIGN §2) is two passes by
(row + col) parity: edge neighbours are always in different passes, so every tile of the
second pass sees its four edge neighbours' results. Diagonal neighbours of one pass share a
corner (on 4096: a 256 x 256 square); both read the same canvas there and `accumulate`
weights their outputs, so the corner is still seamless. `mode="disjoint"` makes every pass a
set of pairwise disjoint tiles: rows d apart are disjoint only once d * stride >= tile, so
the passes are the classes (row mod pr, col mod pc), with pr = pc = ceil(1024 / 768) = 2 on
4096: four passes, the minimum for disjointness (tiles (r, c), (r, c+1), (r+1, c),
(r+1, c+1) all share a corner).

Weights: every tile gets a separable ramp (1 on canvas borders, rising from near 0 at its
inner edges over `feather` px), normalised by the sum over all tiles, so the weights
sum to 1 at every pixel. `accumulate` adds `w * (output - input)`: an identity refiner
leaves the canvas bit-for-bit unchanged (a constant image stays constant, no seams).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lsd_runtime.blend import smoothstep
from lsd_runtime.geometry import boxes_overlap


@dataclass(frozen=True)
class Tile:
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) canvas pixels, x1/y1 exclusive
    row: int
    col: int

    @property
    def size(self) -> tuple[int, int]:
        """(W, H) in pixels."""
        return (self.box[2] - self.box[0], self.box[3] - self.box[1])


def _starts(extent: int, tile: int, overlap: int, multiple: int) -> list[int]:
    """Starts of `tile`-px tiles over `extent` px, evenly spread, on multiples of `multiple` (the last
    one ends on the edge), every two neighbours overlapping by at least `overlap` px.

    Rounding the even spread to the grid can widen a gap by up to `multiple` px, so the count grows
    until no gap exceeds `tile - overlap` (it always can when that stride is at least `multiple`).
    """
    if extent <= tile:
        return [0]
    stride = tile - overlap  # the widest gap that keeps the overlap
    if stride < multiple:
        raise ValueError(f"overlap {overlap} with tile {tile} leaves a stride of {stride} px, below the "
                         f"{multiple} px grid the tiles start on: use an overlap of at most {tile - multiple}")
    span = extent - tile
    n = max(math.ceil((extent - overlap) / stride), 2)
    while True:
        starts = sorted({int(round(i * span / (n - 1) / multiple)) * multiple for i in range(n - 1)} - {span})
        starts = [s for s in starts if s < span] + [span]  # the last tile ends exactly on the canvas edge
        if all(b - a <= stride for a, b in zip(starts, starts[1:])):
            return starts
        n += 1


def tile_grid(canvas_wh: tuple[int, int], tile: int = 1024, overlap: int | None = None, *, multiple: int = 8) -> list[Tile]:
    """Overlapping tiles covering the canvas, row-major; `overlap` is the minimum overlap: every two
    neighbouring tiles overlap by at least that many px (after rounding their starts to the grid).

    Tile starts are multiples of `multiple` and the last tile ends on the canvas edge, so on a
    canvas padded to a multiple of 8 (geometry.pad_to_multiple) every tile sits on the latent
    grid. A side shorter than `tile` gets one tile of that side's length.
    """
    cw, ch = int(canvas_wh[0]), int(canvas_wh[1])
    if cw <= 0 or ch <= 0:
        raise ValueError(f"canvas size must be positive, got {canvas_wh}")
    if tile <= 0:
        raise ValueError(f"tile must be positive, got {tile}")
    overlap = tile // 4 if overlap is None else int(overlap)
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got {overlap} for tile {tile}")
    tw, th = min(tile, cw), min(tile, ch)
    xs = _starts(cw, tw, min(overlap, tw - 1), multiple)
    ys = _starts(ch, th, min(overlap, th - 1), multiple)
    return [Tile((x, y, x + tw, y + th), r, c) for r, y in enumerate(ys) for c, x in enumerate(xs)]


def _period(spans: dict[int, tuple[int, int]]) -> int:
    """Smallest d such that spans d (or more) indices apart never overlap."""
    keys = sorted(spans)
    for d in range(1, len(keys) + 1):
        if all(spans[k + d][0] >= spans[k][1] for k in keys if k + d in spans):
            return d
    return max(1, len(keys))


def chessboard_passes(tiles: list[Tile], mode: str = "chessboard") -> list[list[Tile]]:
    """Group tiles into passes (see the module docstring).

    "chessboard": two passes by (row + col) parity; no two edge neighbours share a pass.
    "disjoint": classes (row mod pr, col mod pc) of pairwise non-overlapping tiles: the
    default 5 x 5 grid on 4096 needs 4, a grid overlapping along one axis only 2, none 1.
    """
    if not tiles:
        return []
    if mode == "chessboard":
        return [g for g in ([t for t in tiles if (t.row + t.col) % 2 == k] for k in (0, 1)) if g]
    if mode != "disjoint":
        raise ValueError(f"tile pass mode {mode!r}: expected 'chessboard' or 'disjoint'")
    rows = {t.row: (t.box[1], t.box[3]) for t in tiles}
    cols = {t.col: (t.box[0], t.box[2]) for t in tiles}
    pr, pc = _period(rows), _period(cols)
    passes: list[list[Tile]] = []
    for i in range(pr):
        for j in range(pc):
            group = [t for t in tiles if t.row % pr == i and t.col % pc == j]
            if group:
                passes.append(group)
    for group in passes:  # the grouping is the contract: check it rather than trust it
        for a in range(len(group)):
            for b in range(a + 1, len(group)):
                if boxes_overlap(group[a].box, group[b].box):
                    raise ValueError(f"tiles {group[a]} and {group[b]} overlap within one pass")
    return passes


def _axis_ramp(start: int, stop: int, extent: int, feather: float) -> np.ndarray:
    n = stop - start
    out = np.ones(n, dtype=np.float32)
    if feather <= 0:
        return out
    pos = np.arange(n, dtype=np.float32) + 0.5  # pixel centres: never exactly 0
    if start > 0:
        out = np.minimum(out, pos / feather)
    if stop < extent:
        out = np.minimum(out, (n - pos) / feather)
    return smoothstep(out) + np.float32(1e-6)  # stays > 0 so every pixel has some weight


def tile_weights(tiles: list[Tile], canvas_wh: tuple[int, int], feather: float | None = None) -> list[np.ndarray]:
    """Per-tile float32 weights `[h, w]` (tile frame) summing to 1 over all tiles at every pixel.

    `feather` defaults to the smallest overlap between neighbouring tiles.
    """
    cw, ch = int(canvas_wh[0]), int(canvas_wh[1])
    if feather is None:
        feather = _min_overlap(tiles)
    raw = []
    total = np.zeros((ch, cw), dtype=np.float32)  # 64 MB at 4096², not 128
    for t in tiles:
        x0, y0, x1, y1 = t.box
        if x0 < 0 or y0 < 0 or x1 > cw or y1 > ch:
            raise ValueError(f"tile {t.box} lies outside the {cw}x{ch} canvas")
        r = np.outer(_axis_ramp(y0, y1, ch, feather), _axis_ramp(x0, x1, cw, feather))
        raw.append(r)
        total[y0:y1, x0:x1] += r
    if (total <= 0).any():
        raise ValueError("the tiles do not cover the whole canvas")
    return [(r / total[t.box[1]:t.box[3], t.box[0]:t.box[2]]).astype(np.float32) for t, r in zip(tiles, raw)]


def _min_overlap(tiles: list[Tile]) -> float:
    best = math.inf
    for a in tiles:
        for b in tiles:
            if (b.row, b.col) == (a.row, a.col + 1):
                best = min(best, a.box[2] - b.box[0])
            if (b.row, b.col) == (a.row + 1, a.col):
                best = min(best, a.box[3] - b.box[1])
    return 0.0 if best == math.inf else float(max(best, 0))


def accumulate(canvas: np.ndarray, tiles: list[Tile], outputs: list[np.ndarray], weights: list[np.ndarray]) -> np.ndarray:
    """`canvas + sum_t w_t * (output_t - canvas[tile])` as a new array of the canvas dtype.

    With every tile's output (all computed from `canvas`) this is the weighted average of the
    outputs. With one pass's tiles it applies that pass: the refiner calls it once per pass,
    each pass reading the canvas the previous one returned. Pixels no given tile changes
    keep their exact value.
    """
    canvas = np.asarray(canvas)
    if not (len(tiles) == len(outputs) == len(weights)):
        raise ValueError("accumulate needs one output and one weight per tile")
    work = np.float64 if canvas.dtype == np.float64 else np.float32
    base = canvas.astype(work)
    out = base.copy()
    for t, o, w in zip(tiles, outputs, weights):
        x0, y0, x1, y1 = t.box
        region = base[y0:y1, x0:x1]
        o = np.asarray(o, dtype=work)
        if o.shape != region.shape:
            raise ValueError(f"tile output {o.shape} does not match tile {t.box} region {region.shape}")
        ww = w.astype(work)[:, :, None] if region.ndim == 3 else w.astype(work)
        out[y0:y1, x0:x1] += ww * (o - region)
    if np.issubdtype(canvas.dtype, np.integer):
        info = np.iinfo(canvas.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(canvas.dtype)
