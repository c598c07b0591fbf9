"""The global refiner: overlapping tiles in chessboard passes, noise sliced 1:1, feathered blend.

Tiles come from tiles.tile_grid (5 x 5 tiles of 1024 on 4096). Each pass holds pairwise
tiles (tiles.chessboard_passes: two by parity, or pairwise-disjoint ones), runs in batches of `batch_size`, and is applied with
tiles.accumulate: canvas += w_t * (output_t - input_t), with weights summing to 1 at every
pixel over all tiles. Each pass reads the canvas the previous pass wrote. The noise of a tile
is the scaffold's own latent cells under it (no resampling), so neighbouring tiles share
noise where they overlap, and an identity denoiser leaves the canvas exactly as it was.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from lsd_runtime.sampler import DenoiseItem, time_ids
from lsd_runtime.scaffold import derived_generator
from lsd_runtime.tiles import accumulate, chessboard_passes, tile_grid, tile_weights


PASSES = ("chessboard", "disjoint")  # tiles.chessboard_passes modes


@dataclass
class RefineTileSettings:
    tile: int = 1024
    overlap: int | None = None  # minimum overlap; None = a quarter tile
    feather: float | None = None  # None = the overlap
    passes: str = "chessboard"  # chessboard: 2 passes by parity | disjoint: pairwise disjoint tiles per pass
    batch_size: int = 4

    def check(self) -> None:
        if self.tile % 8 or self.tile < 8:
            raise ValueError(f"refine.tile={self.tile}: must be a positive multiple of 8")
        if int(self.batch_size) < 1:
            raise ValueError(f"refine.batch_size={self.batch_size}: must be >= 1")
        if self.overlap is not None and not 0 <= int(self.overlap) < self.tile:
            raise ValueError(f"refine.overlap={self.overlap}: must be in [0, refine.tile={self.tile})")
        if self.passes not in PASSES:
            raise ValueError(f"refine.passes={self.passes!r}: choose one of {PASSES}")


def refine_tiles(canvas: np.ndarray, scaffold, conditioner, denoise, settings: RefineTileSettings,
                 seed: int | None = None) -> tuple[np.ndarray, list[dict]]:
    """Refine the whole canvas (uint8 or float HxWx3) tile by tile; returns (canvas, tile records)."""
    settings.check()
    canvas = np.asarray(canvas)
    h, w = canvas.shape[:2]
    if tuple(scaffold.pixel_size) != (w, h):
        raise ValueError(f"scaffold covers {scaffold.pixel_size[0]}x{scaffold.pixel_size[1]} px, canvas is {w}x{h}")
    if w % 8 or h % 8:
        raise ValueError(f"the refiner needs a canvas on the 8 px grid, got {w}x{h} (pad it first)")
    seed = scaffold.seed if seed is None else int(seed)
    tiles = tile_grid((w, h), settings.tile, settings.overlap)
    weights = dict(zip([t.box for t in tiles], tile_weights(tiles, (w, h), settings.feather)))
    work = canvas.astype(np.float32)  # accumulate in float; round once at the end
    records = []
    for p, group in enumerate(chessboard_passes(tiles, settings.passes)):
        outputs = []
        for start in range(0, len(group), int(settings.batch_size)):
            chunk = group[start:start + int(settings.batch_size)]
            t0 = time.perf_counter()
            views = [work[t.box[1]:t.box[3], t.box[0]:t.box[2]] for t in chunk]
            rows = conditioner.rows([Image.fromarray(np.clip(np.rint(v), 0, 255).astype(np.uint8)) for v in views])
            items = []
            for t, v, row in zip(chunk, views, rows):
                tw, th = t.size
                items.append(DenoiseItem(image=v.copy(), noise=scaffold.slice(t.box), row=row,
                                         seed=int(derived_generator("tile", seed, t.box).initial_seed()),
                                         time_ids=time_ids((th, tw))[0]))
            outs = denoise(items)
            per = (time.perf_counter() - t0) / len(chunk)
            for t, row, o in zip(chunk, rows, outs):
                outputs.append(np.asarray(o, dtype=np.float32))
                records.append({"box": list(t.box), "row": t.row, "col": t.col, "pass": p, "seconds": round(per, 4),
                                "conditioning": row.to_json()})
        work = accumulate(work, group, outputs, [weights[t.box] for t in group])
    if np.issubdtype(canvas.dtype, np.integer):
        return np.clip(np.rint(work), 0, 255).astype(canvas.dtype), records
    return work.astype(canvas.dtype), records
