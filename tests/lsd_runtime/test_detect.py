"""Detectors: the shipped face cascade finds the astronaut's face; files; clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lsd_runtime.detect import (
    CascadeFaceDetector,
    Detection,
    DetectionFileError,
    Detector,
    DetectorUnavailable,
    FileDetector,
    Sam3Detector,
    ZeroShotDetector,
    make_detector,
    write_detections,
)
from lsd_runtime.geometry import iou

# Eileen Collins' face in scikit-image's astronaut.png (512 x 512), read off the image by eye:
# hairline to chin and ear to ear, in pixels.
ASTRONAUT_FACE_PX = (170, 70, 270, 180)


@pytest.fixture(scope="module")
def astronaut():
    from skimage import data

    return Image.fromarray(data.astronaut())


@pytest.fixture(scope="module")
def cascade():
    return CascadeFaceDetector()


def _px(det: Detection, size=512):
    return tuple(v * size for v in det.box)


def test_cascade_finds_the_astronaut_face(astronaut, cascade):
    dets = cascade.detect(astronaut, ["face"])
    assert dets, "no face found"
    best = max(dets, key=lambda d: iou(_px(d), ASTRONAUT_FACE_PX))
    assert iou(_px(best), ASTRONAUT_FACE_PX) > 0.5
    assert best is dets[0], "the face is the most confident detection"
    assert best.label == "face" and 0 < best.score <= 1
    assert all(0 <= v <= 1 for d in dets for v in d.box)
    assert isinstance(cascade, Detector)


def test_cascade_on_a_big_canvas_is_downscaled_and_still_finds_it(astronaut):
    det = CascadeFaceDetector(max_side=256)  # the same path a 4K canvas takes (here 512 -> 256)
    dets = det.detect(astronaut.resize((1024, 1024), Image.LANCZOS), [])
    assert any(iou(_px(d), ASTRONAUT_FACE_PX) > 0.5 for d in dets)


def test_cascade_finds_nothing_on_a_flat_image_or_for_other_prompts(astronaut, cascade):
    assert cascade.detect(Image.new("RGB", (256, 256), (128, 128, 128)), ["face"]) == []
    assert cascade.detect(astronaut, ["hand"]) == []
    assert {d.label for d in cascade.detect(astronaut, ["hand", "head"])} == {"head"}, "answers in the prompt's word"


def test_file_detector_reads_boxes_pixels_and_masks(tmp_path):
    mask = np.zeros((64, 64), np.uint8)
    mask[10:30, 20:40] = 255
    Image.fromarray(mask).save(tmp_path / "m0.png")
    doc = {
        "format_version": 1,
        "image_size": [1000, 500],
        "detections": [
            {"box": [0.1, 0.2, 0.3, 0.4], "label": "face", "score": 0.9, "mask": "m0.png"},
            {"box_px": [100, 50, 300, 250], "label": "Hand"},
        ],
    }
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(doc))
    det = make_detector("file", path=str(path))
    everything = det.detect(Image.new("RGB", (8, 8)), [])
    assert len(everything) == 2
    hand, face = everything  # best score first (the hand's default 1.0), whatever the file's order
    assert face.box == pytest.approx((0.1, 0.2, 0.3, 0.4)) and face.score == 0.9
    assert face.mask.shape == (64, 64) and face.mask[20, 30] == 1.0 and face.mask[0, 0] == 0.0
    assert hand.box == pytest.approx((0.1, 0.1, 0.3, 0.5)) and hand.mask is None and hand.score == 1.0
    assert [d.label for d in det.detect(Image.new("RGB", (8, 8)), ["hand"])] == ["Hand"]


def test_write_detections_round_trips(tmp_path):
    m = np.zeros((16, 16), np.float32)
    m[4:8, 4:8] = 1.0
    dets = [Detection((0.1, 0.1, 0.5, 0.5), m, "eyes", 0.7), Detection((0.5, 0.5, 0.9, 0.9), None, "hand", 0.4)]
    path = write_detections(tmp_path / "out" / "detections.json", dets)
    back = FileDetector(path).detect(Image.new("RGB", (4, 4)), [])
    assert [d.label for d in back] == ["eyes", "hand"]
    assert np.array_equal(back[0].mask, m) and back[1].mask is None
    assert back[0].box == pytest.approx(dets[0].box)


@pytest.mark.parametrize(
    "entry,message",
    [
        ({"box": [0.5, 0.5, 0.4, 0.6]}, "x1 > x0"),
        ({"box": [10, 10, 40, 40]}, "box_px"),
        ({"box_px": [10, 10, 40, 40]}, "image_size"),
        ({"label": "face"}, "needs 'box'"),
        ({"box": [0.1, 0.1, 0.2, 0.2], "mask": "../secret.png"}, "beside"),
        ({"box": [0.1, 0.1, 0.2, 0.2], "mask": "missing.png"}, "cannot read mask"),
    ],
)
def test_file_detector_errors_name_the_file_and_entry(tmp_path, entry, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"detections": [{"box": [0, 0, 1, 1]}, entry]}))
    with pytest.raises(DetectionFileError, match=message) as err:
        FileDetector(path)
    assert "bad.json" in str(err.value) and "detections[1]" in str(err.value)


def test_file_detector_rejects_non_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{not json")
    with pytest.raises(DetectionFileError, match="x.json"):
        FileDetector(path)
    with pytest.raises(DetectionFileError, match="no such"):
        FileDetector(tmp_path / "nope.json")


@pytest.mark.parametrize("cls", [ZeroShotDetector, Sam3Detector])
def test_model_detectors_need_local_weights(tmp_path, cls):
    with pytest.raises(DetectorUnavailable, match="detect.weights"):
        cls()
    with pytest.raises(DetectorUnavailable, match="config.json"):
        cls(weights=tmp_path)
    assert issubclass(DetectorUnavailable, ValueError)


def test_make_detector():
    assert isinstance(make_detector(), CascadeFaceDetector)
    assert make_detector("cascade", max_side=512).max_side == 512
    with pytest.raises(ValueError, match="unknown detector"):
        make_detector("yolo")
    with pytest.raises(ValueError, match="detect.path"):
        make_detector("file")
    with pytest.raises(ValueError, match="bad settings"):
        make_detector("cascade", colour="red")
    with pytest.raises(DetectorUnavailable, match="detect.weights"):
        make_detector("owlv2")


def test_suppress_overlaps_keeps_the_best_box_per_label():
    from lsd_runtime.detect import suppress_overlaps

    dets = [
        Detection((0.10, 0.10, 0.30, 0.30), label="face", score=0.6),
        Detection((0.11, 0.10, 0.31, 0.30), label="face", score=0.9),  # same face, better score
        Detection((0.11, 0.10, 0.31, 0.30), label="eyes", score=0.5),  # another label survives
        Detection((0.60, 0.60, 0.80, 0.80), label="face", score=0.3),  # another face survives
    ]
    kept = suppress_overlaps(dets, 0.5)
    assert [(d.label, d.score) for d in kept] == [("face", 0.9), ("eyes", 0.5), ("face", 0.3)]
