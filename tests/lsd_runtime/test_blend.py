"""Blending: pixels outside the mask are unchanged bit for bit; masks and resizes behave."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lsd_runtime.blend import blend, feather_mask, mask_from_detection, resize_lanczos, smoothstep


def test_smoothstep():
    m = np.linspace(-0.5, 1.5, 101)
    a = smoothstep(m)
    assert a[0] == 0.0 and a[-1] == 1.0 and np.all(np.diff(a) >= 0)
    assert smoothstep(0.5) == pytest.approx(0.5)
    assert smoothstep(0.25) == pytest.approx(0.25 * 0.25 * 2.5)


def test_feather_mask():
    m = feather_mask(40, 60, 8)
    assert m.shape == (40, 60) and m.dtype == np.float32
    assert (m[0] == 0).all() and (m[-1] == 0).all() and (m[:, 0] == 0).all() and (m[:, -1] == 0).all()
    assert (m[8:-8, 8:-8] == 1).all()
    assert np.all(np.diff(m[20, :30]) >= 0)
    assert (feather_mask(5, 7, 0) == 1).all()
    left_open = feather_mask(20, 20, 4, edges=(False, True, True, True))
    assert left_open[10, 0] == 1 and left_open[10, -1] == 0


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_pixels_outside_the_mask_are_unchanged_exactly(dtype):
    rng = np.random.default_rng(2)
    if dtype == np.uint8:
        canvas = rng.integers(0, 256, size=(256, 320, 3)).astype(dtype)
        patch = rng.integers(0, 256, size=(96, 96, 3)).astype(dtype)
    else:
        canvas = rng.random((256, 320, 3), dtype=np.float32) * 2 - 1  # any float range
        patch = rng.random((96, 96, 3), dtype=np.float32) * 2 - 1
    crop = (112, 64, 208, 160)
    det_box = (140 / 320, 90 / 256, 180 / 320, 130 / 256)
    mask = mask_from_detection(crop, (320, 256), box=det_box, feather_px=12)
    out = blend(canvas, patch, mask, crop)
    assert out.dtype == canvas.dtype and out.shape == canvas.shape
    outside = np.ones(canvas.shape[:2], dtype=bool)
    outside[crop[1]:crop[3], crop[0]:crop[2]] = mask == 0
    assert np.array_equal(out[outside], canvas[outside]), "bit-for-bit outside the mask"
    assert (mask == 0).any() and (mask == 1).any()
    full = np.zeros(canvas.shape[:2], dtype=bool)
    full[crop[1]:crop[3], crop[0]:crop[2]] = mask == 1
    if dtype == np.uint8:
        assert np.array_equal(out[full], patch[(mask == 1)])
    else:
        np.testing.assert_allclose(out[full], patch[mask == 1], atol=1e-6)
    assert not np.array_equal(out, canvas)


def test_blend_keeps_nan_free_float_canvas_and_grayscale():
    canvas = np.full((32, 32), 0.25, dtype=np.float32)
    patch = np.full((16, 16), 0.75, dtype=np.float32)
    mask = feather_mask(16, 16, 4)
    out = blend(canvas, patch, mask, (8, 8, 24, 24))
    assert out[16, 16] == pytest.approx(0.75) and out[8, 8] == 0.25 and out[0, 0] == 0.25
    assert canvas[16, 16] == 0.25, "the input canvas is not modified"


def test_blend_rejects_mismatched_shapes():
    canvas = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="patch"):
        blend(canvas, np.zeros((8, 8, 3), np.uint8), np.ones((16, 16)), (0, 0, 16, 16))
    with pytest.raises(ValueError, match="inside"):
        blend(canvas, np.zeros((16, 16, 3), np.uint8), np.ones((16, 16)), (24, 24, 40, 40))


def test_mask_from_detection_box_and_segmentation():
    crop = (64, 64, 192, 192)
    m = mask_from_detection(crop, (256, 256), box=(0.375, 0.375, 0.625, 0.625), feather_px=8)
    assert m.shape == (128, 128)
    assert m[64, 64] == 1.0 and m[0, 64] == 0.0 and m[127, 127] == 0.0 and m[64, 0] == 0.0
    assert m[32, 64] == 1.0 and 0 < m[28, 64] < 1, "ramps outside the box edge"
    # a crop side on the canvas border is not feathered: a face touching the edge is refined to it
    corner = mask_from_detection((0, 0, 128, 128), (256, 256), box=(0.0, 0.0, 0.25, 0.25), feather_px=8)
    assert corner[0, 0] == 1.0 and corner[127, 127] == 0.0 and corner[0, 127] == 0.0
    crop = (0, 0, 128, 128)
    # a segmentation mask at half resolution, a disc centred in the crop
    yy, xx = np.mgrid[0:128, 0:128]
    seg = ((yy - 32) ** 2 + (xx - 32) ** 2 < 15 ** 2).astype(np.float32)
    ms = mask_from_detection(crop, (256, 256), mask=seg, feather_px=8, out_hw=(64, 64))
    assert ms.shape == (64, 64)
    assert ms[32, 32] == 1.0 and ms[2, 2] == 0.0 and ms[32, 60] == 0.0
    # working-size output: same shape scaled up
    big = mask_from_detection(crop, (256, 256), box=(0.125, 0.125, 0.375, 0.375), feather_px=8, out_hw=(256, 256))
    assert big[128, 128] == 1.0 and big[0, 0] == 0.0


def test_resize_lanczos_keeps_kind_and_dtype():
    arr = np.full((40, 30, 3), 100, dtype=np.uint8)
    out = resize_lanczos(arr, (60, 80))
    assert out.shape == (80, 60, 3) and out.dtype == np.uint8 and (out == 100).all()
    f = np.random.default_rng(3).random((40, 30, 3)).astype(np.float32) * 4 - 2
    g = resize_lanczos(f, (15, 20))
    assert g.shape == (20, 15, 3) and g.dtype == np.float32
    assert abs(float(g.mean()) - float(f.mean())) < 0.1, "float range kept, not clipped to 0..1"
    assert g.min() < 0 and g.max() > 1
    pil = resize_lanczos(Image.new("RGB", (30, 40)), (10, 12))
    assert isinstance(pil, Image.Image) and pil.size == (10, 12)


def test_mask_from_a_detection_object():
    from lsd_runtime.detect import Detection

    seg = np.zeros((64, 64), np.float32)
    seg[:, :32] = 1.0  # left half of the canvas
    det = Detection(box=(0.0, 0.0, 0.5, 1.0), mask=seg, label="x")
    m = mask_from_detection((0, 0, 128, 128), (128, 128), detection=det, feather_px=4)
    assert m[64, 30] == 1.0 and m[64, 100] == 0.0
    only_box = mask_from_detection((0, 0, 128, 128), (128, 128), box=det.box, feather_px=4)
    assert only_box[64, 30] == 1.0 and only_box[64, 100] == 0.0


def test_inplace_blend_writes_the_same_pixels_into_the_canvas_itself():
    rng = np.random.default_rng(3)
    canvas = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    patch = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    mask = rng.random((20, 24)).astype(np.float32)
    expected = blend(canvas, patch, mask, (10, 30, 34, 50))
    before = canvas.copy()
    assert np.array_equal(canvas, before)  # the copying form left it alone
    out = blend(canvas, patch, mask, (10, 30, 34, 50), inplace=True)
    assert out is canvas and np.array_equal(canvas, expected) and not np.array_equal(canvas, before)
    frozen = before.copy()
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        blend(frozen, patch, mask, (10, 30, 34, 50), inplace=True)
