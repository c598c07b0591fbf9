"""Global refiner tiles: the 5x5 grid, passes of disjoint tiles, weights without seams."""
from __future__ import annotations

import numpy as np
import pytest

from lsd_runtime.geometry import boxes_overlap
from lsd_runtime.tiles import Tile, accumulate, chessboard_passes, tile_grid, tile_weights


def _coverage(tiles, cw, ch):
    cov = np.zeros((ch, cw), dtype=np.int32)
    for t in tiles:
        x0, y0, x1, y1 = t.box
        cov[y0:y1, x0:x1] += 1
    return cov


def test_default_grid_on_4096_is_5x5_at_stride_768():
    tiles = tile_grid((4096, 4096))
    assert len(tiles) == 25
    assert sorted({t.box[0] for t in tiles}) == [0, 768, 1536, 2304, 3072]
    assert sorted({t.box[1] for t in tiles}) == [0, 768, 1536, 2304, 3072]
    assert all(t.size == (1024, 1024) for t in tiles)
    assert {(t.row, t.col) for t in tiles} == {(r, c) for r in range(5) for c in range(5)}


@pytest.mark.parametrize("canvas,tile", [((512, 512), 128), ((520, 384), 128), ((100, 300), 128), ((64, 64), 128)])
def test_grid_covers_the_canvas_with_equal_tiles_on_the_grid(canvas, tile):
    cw, ch = canvas
    tiles = tile_grid(canvas, tile=tile)
    assert (_coverage(tiles, cw, ch) >= 1).all()
    assert len({t.size for t in tiles}) == 1
    for t in tiles:
        x0, y0, x1, y1 = t.box
        assert 0 <= x0 < x1 <= cw and 0 <= y0 < y1 <= ch
        assert (x0 % 8 == 0 or x1 == cw) and (y0 % 8 == 0 or y1 == ch)


def _overlaps(starts, tile):
    return [tile - (b - a) for a, b in zip(starts, starts[1:])]


def test_rounding_to_the_grid_never_leaves_an_overlap_below_the_minimum():
    """2872 px, tile 1024, overlap 100: the even spread 0, 924, 1848 is off the 8 px grid, and 928 would
    leave 96 px; no start on the grid gives three tiles with >= 100 px, so the grid takes four."""
    starts = sorted({t.box[0] for t in tile_grid((2872, 1024), tile=1024, overlap=100)})
    assert starts[0] == 0 and starts[-1] == 2872 - 1024 and all(s % 8 == 0 for s in starts)
    assert min(_overlaps(starts, 1024)) >= 100 and len(starts) == 4


@pytest.mark.parametrize("tile,overlap", [(1024, 100), (1024, None), (256, 64), (256, 1), (128, 120), (96, 0),
                                          (1024, 1013), (200, 37)])
def test_every_overlap_reaches_the_minimum_on_many_widths(tile, overlap):
    """Property: on every width (multiples of 8 and not), each neighbour pair overlaps by >= `overlap`,
    starts sit on the 8 px grid (the last ends on the edge), and no tile repeats."""
    want = tile // 4 if overlap is None else overlap
    for width in range(tile + 1, 6 * tile, 1 if tile <= 256 else 7):
        starts = sorted(t.box[0] for t in tile_grid((width, 8), tile=tile, overlap=overlap))
        assert len(set(starts)) == len(starts) and starts[0] == 0 and starts[-1] == width - tile
        assert all(s % 8 == 0 for s in starts[:-1]), (width, starts)
        assert min(_overlaps(starts, tile)) >= want, (width, starts)
        if width % 8 == 0:  # on a padded canvas no smaller count would do: n - 1 gaps of <= the grid stride
            stride8 = (tile - want) // 8 * 8
            assert (len(starts) - 2) * stride8 < width - tile, (width, starts)


def test_an_overlap_leaving_a_stride_below_the_grid_is_an_error():
    with pytest.raises(ValueError, match="stride of 4 px"):
        tile_grid((2048, 1024), tile=1024, overlap=1020)


def test_default_chessboard_is_two_passes_without_edge_neighbours_together():
    tiles = tile_grid((4096, 4096))
    passes = chessboard_passes(tiles)
    assert len(passes) == 2 and sum(map(len, passes)) == 25
    for p in passes:
        cells = {(t.row, t.col) for t in p}
        assert not any((r + 1, c) in cells or (r, c + 1) in cells for r, c in cells)


def test_disjoint_grid_needs_four_passes_and_parity_would_not_do():
    tiles = tile_grid((4096, 4096))
    # two-colour (row + col) parity puts diagonal neighbours, which share a 256 px corner, together
    t00 = next(t for t in tiles if (t.row, t.col) == (0, 0))
    t11 = next(t for t in tiles if (t.row, t.col) == (1, 1))
    assert boxes_overlap(t00.box, t11.box)
    passes = chessboard_passes(tiles, "disjoint")
    assert len(passes) == 4
    assert sorted((t.row, t.col) for p in passes for t in p) == sorted((t.row, t.col) for t in tiles)
    for p in passes:
        for i, a in enumerate(p):
            for b in p[i + 1:]:
                assert not boxes_overlap(a.box, b.box)


def test_pass_count_follows_the_overlap():
    # overlap along x only -> two passes; no overlap -> one; overlap beyond half a tile -> more
    row = tile_grid((1024, 256), tile=256, overlap=64)
    assert len({t.row for t in row}) == 1 and len(chessboard_passes(row, "disjoint")) == 2
    assert len(chessboard_passes(tile_grid((1024, 1024), tile=256, overlap=0), "disjoint")) == 1
    dense = tile_grid((1024, 1024), tile=256, overlap=160)
    passes = chessboard_passes(dense, "disjoint")
    assert len(passes) == 9
    for p in passes:
        assert not any(boxes_overlap(a.box, b.box) for i, a in enumerate(p) for b in p[i + 1:])


def test_weights_sum_to_one_everywhere():
    cw, ch = 512, 384
    tiles = tile_grid((cw, ch), tile=128)
    weights = tile_weights(tiles, (cw, ch))
    total = np.zeros((ch, cw), dtype=np.float64)
    for t, w in zip(tiles, weights):
        assert w.shape == (t.size[1], t.size[0]) and (w > 0).all()
        total[t.box[1]:t.box[3], t.box[0]:t.box[2]] += w
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_constant_image_stays_constant_exactly(dtype):
    cw = ch = 512
    canvas = np.full((ch, cw, 3), 0.3 if dtype == np.float32 else 77, dtype=dtype)
    tiles = tile_grid((cw, ch), tile=128)
    weights = tile_weights(tiles, (cw, ch))
    for group in chessboard_passes(tiles):  # pass by pass, each reading the updated canvas
        idx = [tiles.index(t) for t in group]
        outputs = [canvas[t.box[1]:t.box[3], t.box[0]:t.box[2]].copy() for t in group]  # identity refiner
        canvas = accumulate(canvas, group, outputs, [weights[i] for i in idx])
    assert canvas.dtype == dtype
    assert (canvas == canvas.flat[0]).all() and canvas.flat[0] == (dtype(77) if dtype == np.uint8 else np.float32(0.3))


def test_all_tiles_at_once_give_the_weighted_average():
    cw = ch = 256
    canvas = np.zeros((ch, cw), dtype=np.float32)
    tiles = tile_grid((cw, ch), tile=128, overlap=32)
    weights = tile_weights(tiles, (cw, ch))
    shifted = [np.full((128, 128), 5.0, np.float32) for _ in tiles]  # every tile brightens by the same
    out = accumulate(canvas, tiles, shifted, weights)
    np.testing.assert_allclose(out, 5.0, atol=1e-5)


def test_feathering_leaves_no_seams():
    # tiles that disagree (each a different constant) blend smoothly: no jump anywhere
    cw = ch = 512
    canvas = np.zeros((ch, cw), dtype=np.float32)
    tiles = tile_grid((cw, ch), tile=128)
    rng = np.random.default_rng(4)
    outputs = [np.full((128, 128), float(rng.uniform(0, 1)), np.float32) for _ in tiles]
    out = accumulate(canvas, tiles, outputs, tile_weights(tiles, (cw, ch)))
    step = max(np.abs(np.diff(out, axis=0)).max(), np.abs(np.diff(out, axis=1)).max())
    assert step < 0.1, f"largest neighbour jump {step}"
    # plain averaging over the overlap (weights 1/count, no feather) jumps at every tile edge
    cov = _coverage(tiles, cw, ch).astype(np.float32)
    plain = [1.0 / cov[t.box[1]:t.box[3], t.box[0]:t.box[2]] for t in tiles]
    cut = accumulate(canvas, tiles, outputs, plain)
    assert np.abs(np.diff(cut, axis=1)).max() > 2 * step


def test_accumulate_rejects_mismatches():
    tiles = [Tile((0, 0, 8, 8), 0, 0)]
    with pytest.raises(ValueError, match="one output"):
        accumulate(np.zeros((8, 8)), tiles, [], [])
    with pytest.raises(ValueError, match="does not match"):
        accumulate(np.zeros((8, 8)), tiles, [np.zeros((4, 4))], [np.ones((8, 8))])
    with pytest.raises(ValueError, match="overlap"):
        tile_grid((512, 512), tile=128, overlap=128)
