"""Crop geometry: square, on the 8 px grid, inside the canvas; padding that never fails."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lsd_runtime.geometry import (
    BoxOutsideCanvas,
    boxes_overlap,
    iou,
    latent_box,
    pad_to_multiple,
    square_crop,
    unpad,
)


def test_random_boxes_give_square_grid_crops_inside_the_canvas():
    rng = np.random.default_rng(0)
    for _ in range(600):
        cw, ch = (int(v) for v in rng.integers(16, 3000, size=2))
        if rng.random() < 0.5:  # half the canvases on the 8 px grid
            cw, ch = max(8, cw // 8 * 8), max(8, ch // 8 * 8)
        normalized = rng.random() < 0.5
        x0, x1 = np.sort(rng.uniform(-0.2, 1.2, size=2))
        y0, y1 = np.sort(rng.uniform(-0.2, 1.2, size=2))
        if x1 <= 0 or y1 <= 0 or x0 >= 1 or y0 >= 1:
            continue
        box = (x0, y0, x1, y1) if normalized else (x0 * cw, y0 * ch, x1 * cw, y1 * ch)
        pad, min_size = float(rng.uniform(0, 0.6)), int(rng.integers(8, 300))
        cx0, cy0, cx1, cy1 = square_crop(box, (cw, ch), pad=pad, min_size=min_size, normalized=normalized)
        side = cx1 - cx0
        assert side == cy1 - cy0 > 0, "square"
        assert cx0 % 8 == 0 and cy0 % 8 == 0 and side % 8 == 0, "on the 8 px grid"
        assert 0 <= cx0 and 0 <= cy0 and cx1 <= cw and cy1 <= ch, "inside the canvas"
        fit = min(cw, ch) // 8 * 8
        assert side >= min(min_size, fit), "at least the minimum size unless the canvas is smaller"
        # the (visible part of the) detection lies inside the crop when the padded box fits
        bx0, by0 = max(x0 * cw, 0), max(y0 * ch, 0)
        bx1, by1 = min(x1 * cw, cw), min(y1 * ch, ch)
        longest = max(bx1 - bx0, by1 - by0)
        if cw % 8 == 0 and ch % 8 == 0 and pad * longest >= 4 and longest * (1 + 2 * pad) + 8 <= fit:
            assert cx0 <= bx0 + 1e-6 and cy0 <= by0 + 1e-6 and cx1 >= bx1 - 1e-6 and cy1 >= by1 - 1e-6, (
                box, (cw, ch), (cx0, cy0, cx1, cy1))


def test_crop_near_a_border_is_shifted_not_shrunk():
    crop = square_crop((0.0, 0.0, 0.05, 0.05), (1024, 1024), pad=0.5, min_size=256)
    assert crop == (0, 0, 256, 256)
    crop = square_crop((1000, 990, 1024, 1024), (1024, 1024), pad=0.25, min_size=128, normalized=False)
    assert crop == (896, 896, 1024, 1024)


def test_crop_size_and_centre():
    # a 200 px face padded by 25 % per side -> 300 px, rounded up to 304, centred on the face
    x0, y0, x1, y1 = square_crop((400, 400, 600, 600), (2048, 2048), pad=0.25, normalized=False)
    assert x1 - x0 == 304 and abs((x0 + x1) / 2 - 500) <= 4 and abs((y0 + y1) / 2 - 500) <= 4


def test_tiny_box_is_raised_to_the_minimum_size():
    x0, y0, x1, y1 = square_crop((500, 500, 503, 502), (1024, 1024), min_size=64, normalized=False)
    assert x1 - x0 == 64 and y1 - y0 == 64
    assert square_crop((500, 500, 503, 502), (1024, 1024), min_size=61, normalized=False)[2] % 8 == 0


def test_canvas_smaller_than_the_crop_shrinks_it():
    # 56 is the largest multiple of 8 that fits the 60 px side; still centred along x
    assert square_crop((0.1, 0.1, 0.9, 0.9), (100, 60), min_size=256) == (24, 0, 80, 56)


def test_box_outside_the_canvas_is_a_clear_error():
    with pytest.raises(BoxOutsideCanvas, match="outside"):
        square_crop((1100, 10, 1200, 100), (1024, 1024), normalized=False)
    assert issubclass(BoxOutsideCanvas, ValueError)
    with pytest.raises(ValueError):
        square_crop((0.5, 0.5, 0.4, 0.6), (1024, 1024))


def test_normalised_and_pixel_boxes_agree():
    assert square_crop((0.25, 0.25, 0.5, 0.5), (1024, 1024)) == square_crop((256, 256, 512, 512), (1024, 1024))
    # floats in [0, 1] are normalised, even whole ones; ints are pixels
    assert square_crop((0.0, 0.0, 1.0, 1.0), (512, 256), pad=0) == (128, 0, 384, 256)
    assert square_crop((0, 0, 1, 1), (512, 256), pad=0, min_size=8) == (0, 0, 8, 8)
    assert square_crop(np.array([0.0, 0.0, 0.5, 0.5]), (512, 512), pad=0) == (0, 0, 256, 256)


def test_pad_to_multiple_replicates_edges_and_unpads_exactly():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(61, 100, 3), dtype=np.uint8)
    padded, size = pad_to_multiple(img, 8)
    assert size == (100, 61) and padded.shape == (64, 104, 3)
    assert (padded[:, 100:] == padded[:, 99:100]).all() and (padded[61:] == padded[60:61]).all()
    assert np.array_equal(unpad(padded, size), img)
    same, size = pad_to_multiple(img[:56, :96], 8)
    assert same.shape == (56, 96, 3) and size == (96, 56)


def test_pad_to_multiple_pil_and_torch():
    pil = Image.new("RGB", (13, 9), (10, 20, 30))
    padded, size = pad_to_multiple(pil)
    assert isinstance(padded, Image.Image) and padded.size == (16, 16) and size == (13, 9)
    assert unpad(padded, size).size == (13, 9)
    t = torch.arange(2 * 5 * 7, dtype=torch.float32).reshape(2, 5, 7)
    tp, size = pad_to_multiple(t, 4)
    assert tp.shape == (2, 8, 8) and size == (7, 5)
    assert torch.equal(tp[:, :, 7], tp[:, :, 6]) and torch.equal(unpad(tp, size), t)
    ti = torch.ones(1, 3, 5, 5, dtype=torch.uint8)
    assert pad_to_multiple(ti)[0].dtype == torch.uint8


def test_latent_box_and_overlap():
    assert latent_box((0, 0, 1024, 1024)) == (0, 0, 128, 128)
    assert latent_box((4, 9, 17, 23)) == (0, 1, 3, 3)
    assert boxes_overlap((0, 0, 10, 10), (5, 5, 15, 15))
    assert not boxes_overlap((0, 0, 10, 10), (10, 0, 20, 10)), "touching edges do not overlap"
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0 and iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert abs(iou((0, 0, 10, 10), (5, 0, 15, 10)) - 1 / 3) < 1e-9
