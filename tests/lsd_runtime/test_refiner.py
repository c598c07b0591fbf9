"""Global refiner: seamless feathered tiles, chessboard passes, noise sliced 1:1 from the scaffold."""
from __future__ import annotations

import numpy as np
import pytest

from lsd_runtime.conditioning import CondRow
from lsd_runtime.detailer import identity_denoiser
from lsd_runtime.geometry import boxes_overlap
from lsd_runtime.refiner import RefineTileSettings, refine_tiles
from lsd_runtime.scaffold import NoiseScaffold


class FixedText:
    """A conditioning source without models: the same zero row for every tile."""

    name = "text"

    def rows(self, crops):
        import torch

        return [CondRow(torch.zeros(77, 8), torch.zeros(4), "text", 0.0) for _ in crops]


def test_identity_denoiser_leaves_a_constant_image_constant():
    canvas = np.full((512, 512, 3), 137, np.uint8)
    out, records = refine_tiles(canvas, NoiseScaffold(1, (512, 512)), FixedText(), identity_denoiser,
                                RefineTileSettings(tile=256, batch_size=3))
    assert np.array_equal(out, canvas)
    assert len(records) == 9  # 3 x 3 tiles of 256 on 512


def test_every_tile_shift_adds_the_same_shift_everywhere_no_seams():
    """A denoiser adding c to each tile: the feathered weights sum to 1, so the canvas moves by c everywhere."""
    def shift(items):
        return [it.image + 10.0 for it in items]

    canvas = np.full((384, 640, 3), 100.0, np.float32)
    out, _ = refine_tiles(canvas, NoiseScaffold(2, (640, 384)), FixedText(), shift,
                          RefineTileSettings(tile=256, overlap=64, batch_size=2))
    np.testing.assert_allclose(out, 110.0, atol=1e-3)


def test_tiles_get_their_own_scaffold_cells_and_passes_never_overlap():
    scaffold = NoiseScaffold(3, (512, 512))
    seen = []

    def record(items):
        seen.append(items)
        return identity_denoiser(items)

    _, records = refine_tiles(np.zeros((512, 512, 3), np.uint8), scaffold, FixedText(), record,
                              RefineTileSettings(tile=256, batch_size=8, passes="disjoint"))
    boxes = [tuple(r["box"]) for r in records]
    assert len(set(boxes)) == len(boxes) == 9
    for items, start in zip(seen, np.cumsum([0] + [len(b) for b in seen])):
        for it, rec in zip(items, records[start:start + len(items)]):
            x0, y0, x1, y1 = rec["box"]
            assert np.array_equal(it.noise.numpy(), scaffold.noise[:, y0 // 8:y1 // 8, x0 // 8:x1 // 8].numpy())
    by_pass: dict = {}
    for r in records:
        by_pass.setdefault(r["pass"], []).append(r["box"])
    assert len(by_pass) >= 2
    for group in by_pass.values():
        assert not any(boxes_overlap(a, b) for i, a in enumerate(group) for b in group[i + 1:])


def test_default_is_two_chessboard_passes_with_edge_neighbours_apart():
    _, records = refine_tiles(np.zeros((512, 512, 3), np.uint8), NoiseScaffold(3, (512, 512)), FixedText(),
                              identity_denoiser, RefineTileSettings(tile=256, batch_size=8))
    by_pass: dict = {}
    for r in records:
        by_pass.setdefault(r["pass"], []).append(tuple(r["box"]))
    assert len(by_pass) == 2 and sum(map(len, by_pass.values())) == 9
    for group in by_pass.values():  # tiles of one pass meet at most at a corner, never along an edge
        for i, a in enumerate(group):
            for b in group[i + 1:]:
                same_row_or_col = a[0] == b[0] or a[1] == b[1]
                assert not (same_row_or_col and boxes_overlap(a, b))


def test_scaffold_of_another_size_is_rejected():
    with pytest.raises(ValueError, match="scaffold covers"):
        refine_tiles(np.zeros((256, 256, 3), np.uint8), NoiseScaffold(0, (512, 512)), FixedText(),
                     identity_denoiser, RefineTileSettings(tile=128))


def test_tiny_sampler_refine_is_deterministic_and_changes_the_image(tiny):
    from lsd_runtime.sampler import SamplerSettings, sampler_denoiser

    text = tiny["text"]
    rng = np.random.default_rng(0)
    canvas = rng.integers(0, 256, (128, 192, 3), dtype=np.uint8)  # two overlapping 128 px tiles
    den = sampler_denoiser(tiny["components"].sampler, SamplerSettings(steps=2, strength=0.5, cfg=2.0),
                           text.negative_row)
    settings = RefineTileSettings(tile=128, batch_size=4)
    a, records = refine_tiles(canvas, NoiseScaffold(5, (192, 128)), text, den, settings)
    b, _ = refine_tiles(canvas, NoiseScaffold(5, (192, 128)), text, den, settings)
    assert len(records) == 2
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - canvas).mean() > 1.0


@pytest.fixture(scope="module")
def tiny():
    from lsd_runtime.conditioning import TextSource
    from lsd_runtime.workflow import tiny_components

    comps = tiny_components()
    return {"components": comps, "text": TextSource(comps.encoders, "a tiled landscape")}
