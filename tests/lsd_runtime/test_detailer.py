"""Detailer at reduced scale (512 canvas, 128 working size, tiny preset, 2 steps)."""
from __future__ import annotations

import numpy as np
import pytest

from lsd_runtime.detailer import DetailSettings, batches, detail, identity_denoiser
from lsd_runtime.detect import Detection
from lsd_runtime.geometry import boxes_overlap
from lsd_runtime.sampler import SamplerSettings, sampler_denoiser
from lsd_runtime.scaffold import NoiseScaffold

SETTINGS = dict(working_size=128, min_crop=32, feather=8.0)
DETS = [Detection(box=(0.30, 0.10, 0.55, 0.35), label="face"),
        Detection(box=(0.45, 0.25, 0.70, 0.50), label="hand"),  # overlaps the face's crop
        Detection(box=(0.05, 0.70, 0.20, 0.85), label="hand")]


@pytest.fixture(scope="module")
def tiny():
    from lsd_runtime.conditioning import TextSource
    from lsd_runtime.workflow import tiny_components

    comps = tiny_components()
    text = TextSource(comps.encoders, "a portrait, detailed face")
    den = sampler_denoiser(comps.sampler, SamplerSettings(steps=2, strength=0.6, cfg=3.0, sampler="euler_a"),
                           text.negative_row)
    return {"text": text, "denoise": den}


@pytest.fixture(scope="module")
def canvas():
    from skimage import data
    from PIL import Image

    return np.asarray(Image.fromarray(data.astronaut()).resize((512, 512), Image.LANCZOS)).copy()


def _run(canvas, tiny, seed=0, batch_size=4, dets=DETS):
    return detail(canvas, dets, NoiseScaffold(seed, (512, 512)), tiny["text"], tiny["denoise"],
                  DetailSettings(batch_size=batch_size, **SETTINGS))


@pytest.fixture(scope="module")
def batched(canvas, tiny):
    return _run(canvas, tiny, batch_size=4)


def test_pixels_outside_every_mask_are_unchanged(canvas, batched):
    out, crops, _ = batched
    touched = np.zeros(canvas.shape[:2], bool)
    for c in crops:
        x0, y0, x1, y1 = c.box
        touched[y0:y1, x0:x1] |= c.mask > 0
    assert np.array_equal(out[~touched], canvas[~touched])
    assert (out[touched] != canvas[touched]).any()


def test_same_seed_same_output_other_seed_differs(canvas, tiny, batched):
    again, _, _ = _run(canvas, tiny, seed=0)
    other, _, _ = _run(canvas, tiny, seed=1)
    assert np.array_equal(again, batched[0])
    assert not np.array_equal(other, batched[0])


def test_batched_equals_one_by_one(canvas, tiny, batched):
    single, crops1, _ = _run(canvas, tiny, batch_size=1)
    assert [c.box for c in crops1] == [c.box for c in batched[1]]
    assert max(c.batch for c in batched[1]) < max(c.batch for c in crops1)  # batching did happen
    assert np.abs(single.astype(int) - batched[0].astype(int)).max() <= 1  # float tolerance, uint8 rounding


def test_batches_hold_only_non_overlapping_crops_in_order(batched):
    _, crops, _ = batched
    groups = batches(crops, 8)
    assert [c.index for g in groups for c in g] == [c.index for c in crops]
    for g in groups:
        assert not any(boxes_overlap(a.box, b.box) for i, a in enumerate(g) for b in g[i + 1:])
    assert boxes_overlap(crops[0].box, crops[1].box)  # the fixture really has overlapping crops


def test_overlapping_crop_sees_the_canvas_updated_by_the_earlier_one(canvas):
    seen = []

    def brighten(items):
        seen.extend(it.image.copy() for it in items)
        return [np.clip(it.image + 60.0, 0, 255) for it in items]

    flat = np.full_like(canvas, 50)
    scaffold = NoiseScaffold(0, (512, 512))
    _, crops, _ = detail(flat, DETS[:2], scaffold, _Zero(), brighten, DetailSettings(batch_size=4, **SETTINGS))
    a, b = crops
    ox0, oy0 = max(a.box[0], b.box[0]), max(a.box[1], b.box[1])
    ox1, oy1 = min(a.box[2], b.box[2]), min(a.box[3], b.box[3])
    # the centre of the overlap, in b's working frame (128 px for b's side)
    s = 128 / (b.box[2] - b.box[0])
    cx, cy = int(((ox0 + ox1) / 2 - b.box[0]) * s), int(((oy0 + oy1) / 2 - b.box[1]) * s)
    assert seen[0].max() == pytest.approx(50, abs=1)  # the first crop saw the original canvas
    assert seen[1][cy, cx].mean() > 60  # the second saw the first one's result


def test_each_crop_gets_its_scaffold_slice_at_the_working_latent_size(canvas):
    scaffold = NoiseScaffold(4, (512, 512))
    got = []

    def record(items):
        got.extend(items)
        return identity_denoiser(items)

    _, crops, _ = detail(canvas, DETS, scaffold, _Zero(), record, DetailSettings(**SETTINGS))
    for it, c in zip(got, crops):
        assert tuple(it.noise.shape) == (4, 16, 16)
        assert np.array_equal(it.noise.numpy(), scaffold.slice(c.box, (16, 16)).numpy())
        x0, y0, x1, y1 = c.box
        assert x1 - x0 == y1 - y0 and x0 % 8 == 0 and y0 % 8 == 0 and (x1 - x0) % 8 == 0


def test_bad_boxes_are_skipped_with_a_reason(canvas):
    dets = [Detection(box=(1.2, 1.2, 1.5, 1.5), label="outside"),
            Detection(box=(0.5, 0.5, 0.505, 0.505), label="speck"),
            Detection(box=(0.9, 0.9, 1.3, 1.3), label="corner")]  # partly outside: clamped, kept
    out, crops, skipped = detail(canvas, dets, NoiseScaffold(0, (512, 512)), _Zero(), identity_denoiser,
                                 DetailSettings(**SETTINGS))
    assert [s["label"] for s in skipped] == ["outside", "speck"]
    assert "outside" in skipped[0]["reason"] and "minimum" in skipped[1]["reason"]
    assert [c.detection.label for c in crops] == ["corner"]
    x0, y0, x1, y1 = crops[0].box
    assert 0 <= x0 < x1 <= 512 and 0 <= y0 < y1 <= 512
    assert np.array_equal(out[:y0], canvas[:y0])  # rows above the only crop are untouched


class _Zero:
    name = "text"

    def rows(self, crops):
        import torch

        from lsd_runtime.conditioning import CondRow

        return [CondRow(torch.zeros(77, 8), torch.zeros(4), "text", 0.0) for _ in crops]


def test_the_callers_canvas_is_never_written(canvas, tiny):
    """Crops are pasted in place into one copy of the canvas, never into the array the caller passed."""
    mine = canvas.copy()
    out, crops, _ = _run(mine, tiny, batch_size=4)
    assert crops and np.array_equal(mine, canvas) and out is not mine and not np.array_equal(out, mine)
