"""lsd_runtime.workflow: refine() at the tiny preset's sizes (conf/preset/tiny.yaml), settings from the config."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image


def tiny_settings(*overrides: str):
    """RefineSettings of the tiny preset (conf/preset/tiny.yaml) with `overrides`, as `luna refine` builds them."""
    from lsd_runtime.workflow import settings_from_config
    from luna.cli import compose

    return settings_from_config(compose("refine", ["preset=tiny", *overrides]))


def test_tiny_preset_is_one_config_group_and_overrides_win():
    s = tiny_settings("detail.steps=5")
    assert (s.detail.working_size, s.detail.steps, s.refine.tile, s.draft.canvas) == (128, 5, 256, 512)
    from luna.cli import compose

    cfg = compose("refine", ["preset=tiny", "detect=file", "detect.path=/x.json"])
    assert cfg.preset == "tiny" and cfg.checkpoint is None
    assert cfg.detect._target_ == "lsd_runtime.detect.FileDetector" and cfg.detect.path == "/x.json"


def test_refine_api_pads_odd_sizes_and_keeps_pixels_outside_masks(tmp_path):
    from lsd_runtime.detailer import identity_denoiser
    from lsd_runtime.detect import Detection
    from lsd_runtime.workflow import refine, tiny_components

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (203, 301, 3), dtype=np.uint8)

    def brighten(items):
        return [np.clip(it.image + 40.0, 0, 255) for it in items]

    res = refine(img, "x", components=tiny_components(), detections=[Detection(box=(0.4, 0.3, 0.6, 0.6))],
                 settings=tiny_settings("refine.enabled=false"), denoise=brighten)
    out = np.asarray(res.image)
    assert out.shape == img.shape
    assert res.record["canvas_size"] == [304, 208] and res.record["padded"] == [3, 5]
    mask = res.masks["crop_000"]
    assert mask.shape == img.shape[:2]
    assert np.array_equal(out[mask == 0], img[mask == 0])
    assert (out[mask > 0.5].astype(int) - img[mask > 0.5]).mean() > 10
    same = refine(img, "x", components=tiny_components(), detections=[], settings=tiny_settings(),
                  denoise=identity_denoiser)
    assert np.array_equal(np.asarray(same.image), img)  # identity everywhere: nothing moves, no seams


def test_from_draft_runs_draft_smoothing_and_upscale():
    from lsd_runtime.workflow import refine, tiny_components

    settings = tiny_settings("from_draft=true", "refine.enabled=false")
    res = refine(None, "a red planet", components=tiny_components(), detections=[], settings=settings)
    assert res.image.size == (512, 512)
    assert res.record["draft"] == {"draft_size": [128, 128], "smooth_size": [192, 192]}
    assert np.asarray(res.image).std() > 1.0


@pytest.mark.parametrize("override,message", [
    ("refine.tile=100", "refine.tile=100"), ("refine.passes=diagonal", "refine.passes='diagonal'"),
    ("refine.steps=0", "refine.steps=0"), ("refine.conditioning=sme", "refine.conditioning='sme'"),
    ("refine.overlap=300", "refine.overlap=300"), ("detail.sampler=heun", "detail.sampler='heun'")])
def test_bad_stage_settings_are_refused_before_any_crop_is_denoised(override, message):
    """refine.* / detail.* are checked when refine() starts, not after every crop has been denoised."""
    from lsd_runtime.detailer import identity_denoiser
    from lsd_runtime.detect import Detection
    from lsd_runtime.workflow import refine, tiny_components

    calls = []

    def counting(items):
        calls.append(len(items))
        return identity_denoiser(items)

    class Detector:
        def detect(self, image, prompts):
            calls.append("detect")
            return [Detection(box=(0.1, 0.1, 0.4, 0.4), label="face")]

    img = np.full((256, 256, 3), 120, np.uint8)
    with pytest.raises(ValueError, match=re.escape(message)):
        refine(img, "x", components=tiny_components(), detector=Detector(), settings=tiny_settings(override),
               denoise=counting, tile_denoise=counting)
    assert calls == []


def test_both_refine_conditioning_values_are_accepted():
    from lsd_runtime.detailer import identity_denoiser
    from lsd_runtime.workflow import refine, tiny_components

    img = np.full((256, 256, 3), 120, np.uint8)
    for value in ("text", "same"):
        res = refine(img, "x", components=tiny_components(), detections=[], denoise=identity_denoiser,
                     settings=tiny_settings(f"refine.conditioning={value}"))
        assert res.record["tiles"] and res.record["settings"]["refine"]["conditioning"] == value


def test_output_folder_detections_round_trip_through_the_file_detector(tmp_path):
    """OUT/detections.json holds the detections used, in FileDetector's format: fed back with detect=file
    it reproduces the run's detections and crops (the docs' edit-and-feed-back loop)."""
    from dataclasses import replace

    from lsd_runtime.detect import Detection, FileDetector
    from lsd_runtime.record import write_outputs
    from lsd_runtime.workflow import refine, tiny_components

    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (203, 301, 3), dtype=np.uint8)  # odd size: the canvas is padded
    mask = np.zeros((203, 301), np.float32)
    mask[70:120, 130:170] = 1.0
    dets = [Detection(box=(0.4, 0.3, 0.6, 0.6), mask=mask, label="face", score=0.9),
            Detection(box=(0.05, 0.6, 0.3, 0.95), label="hand", score=0.7)]
    settings = tiny_settings("refine.enabled=false")

    def brighten(items):
        return [np.clip(it.image + 40.0, 0, 255) for it in items]

    first = refine(img, "x", components=tiny_components(), detections=dets, settings=settings, denoise=brighten)
    files = write_outputs(first, tmp_path / "run")
    assert files["detections"] == str(tmp_path / "run" / "detections.json")
    assert first.record["padded"] == [3, 5]
    back = FileDetector(files["detections"]).detect(Image.fromarray(img), [])
    assert [(d.label, d.score) for d in back] == [("face", 0.9), ("hand", 0.7)]
    for d, b in zip(dets, back):
        np.testing.assert_allclose(b.box, d.box, atol=1e-12)  # the image's frame, not the padded canvas's
    assert back[1].mask is None and np.array_equal(back[0].mask, mask)
    again = refine(img, "x", components=tiny_components(), detector=FileDetector(files["detections"]),
                   settings=replace(settings, detect_prompts=["face", "hand"]), denoise=brighten)
    assert again.record["detections"] == first.record["detections"]
    assert [c["crop_box"] for c in again.record["crops"]] == [c["crop_box"] for c in first.record["crops"]]
    assert np.array_equal(np.asarray(again.image), np.asarray(first.image))
    relisted = json.loads((tmp_path / "run" / "record.json").read_text())["files"]
    assert relisted["detections"] == "detections.json"
