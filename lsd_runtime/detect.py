"""Detectors: what to detail on the canvas, as normalised boxes, optional masks, labels, scores.

Every detector has `detect(image: PIL.Image, prompts: list[str]) -> list[Detection]`.

- `FileDetector`: boxes/labels/scores from a JSON file, masks as PNGs beside it.
- `CascadeFaceDetector`: scikit-image's shipped LBP frontal-face cascade; no download, so
  it is the default on a fresh machine. Frontal faces only, and it can fire on face-like
  texture: a fallback, not a semantic detector.
- `ZeroShotDetector`: transformers OWLv2 / OWL-ViT / Grounding DINO from a local folder,
  any text prompt.
- `Sam3Detector`: transformers' SAM 3 from a local folder: boxes and masks for any text
  prompt.

`luna refine detect=NAME` builds one from conf/detect/NAME.yaml (`_target_`); `make_detector(name, **cfg)` in Python.
See docs/runtime-detection.md.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image

from luna.settings import resolve_device


FILE_FORMAT_VERSION = 1


class DetectorUnavailable(ValueError):
    """A detector that cannot run here (missing package or local weights); says what to do."""


class DetectionFileError(ValueError):
    """A detections file that does not follow the schema (names the file and the entry)."""


@dataclass
class Detection:
    box: tuple[float, float, float, float]  # normalised (x0, y0, x1, y1) of the image given to detect
    mask: np.ndarray | None = None  # float32 [h, w] in [0, 1] over the whole image, any resolution
    label: str = ""
    score: float = 1.0
    extra: dict = field(default_factory=dict)

    def box_px(self, canvas_wh: tuple[int, int]) -> tuple[float, float, float, float]:
        w, h = canvas_wh
        x0, y0, x1, y1 = self.box
        return (x0 * w, y0 * h, x1 * w, y1 * h)

    def to_json(self) -> dict:
        """The record.json form (masks are written separately)."""
        return {"box": [round(float(v), 6) for v in self.box], "label": self.label, "score": round(float(self.score), 6),
                "has_mask": self.mask is not None, **self.extra}


@runtime_checkable
class Detector(Protocol):
    def detect(self, image: Image.Image, prompts: list[str]) -> list[Detection]: ...


def _check_box(box, where: str) -> tuple[float, float, float, float]:
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise DetectionFileError(f"{where}: box must be [x0, y0, x1, y1], got {box!r}")
    try:
        vals = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        raise DetectionFileError(f"{where}: box has a non-number: {box!r}") from None
    if not all(math.isfinite(v) for v in vals) or vals[2] <= vals[0] or vals[3] <= vals[1]:
        raise DetectionFileError(f"{where}: box must have x1 > x0 and y1 > y0, got {box!r}")
    return vals


def suppress_overlaps(dets: Sequence[Detection], max_iou: float = 0.5) -> list[Detection]:
    """Greedy non-maximum suppression per label: keep the best-scored of boxes overlapping > max_iou."""
    from lsd_runtime.geometry import iou

    kept: list[Detection] = []
    for d in sorted(dets, key=lambda d: -d.score):
        if all(k.label != d.label or iou(k.box, d.box) <= max_iou for k in kept):
            kept.append(d)
    return kept


def _wanted(label: str, prompts: Sequence[str]) -> bool:
    return not prompts or label.strip().lower() in {p.strip().lower() for p in prompts}


# --------------------------------------------------------------------------- file


class FileDetector:
    """Detections read from a JSON file (schema in docs/runtime-detection.md).

    ```json
    {"format_version": 1, "image_size": [4096, 4096],
     "detections": [{"box": [0.41, 0.12, 0.58, 0.31], "label": "face", "score": 0.93, "mask": "face0.png"},
                    {"box_px": [120, 800, 600, 1400], "label": "hand"}]}
    ```
    `box` is normalised; `box_px` is in pixels of `image_size` (required then). `mask` is a
    grayscale PNG beside the JSON covering the whole image (any resolution, 0..255).
    With prompts, only detections whose label is one of them are returned.
    """

    def __init__(self, path: str | Path | None):
        if path is None:
            raise DetectionFileError("detector 'file' needs detect.path=/path/to/detections.json")
        self.path = Path(path)
        if not self.path.is_file():
            raise DetectionFileError(f"{self.path}: no such detections file")
        try:
            self.doc = json.loads(self.path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DetectionFileError(f"{self.path}: not valid JSON ({exc})") from exc
        self.detections = self._parse()

    def _parse(self) -> list[Detection]:
        doc = self.doc
        if not isinstance(doc, dict) or not isinstance(doc.get("detections"), list):
            raise DetectionFileError(f"{self.path}: expected an object with a 'detections' list")
        version = doc.get("format_version", FILE_FORMAT_VERSION)
        if version != FILE_FORMAT_VERSION:
            raise DetectionFileError(f"{self.path}: format_version {version!r}, expected {FILE_FORMAT_VERSION}")
        size = doc.get("image_size")
        out = []
        for i, entry in enumerate(doc["detections"]):
            where = f"{self.path}: detections[{i}]"
            if not isinstance(entry, dict):
                raise DetectionFileError(f"{where}: expected an object")
            if "box" in entry:
                box = _check_box(entry["box"], where)
                if not all(0.0 <= v <= 1.0 for v in box):
                    raise DetectionFileError(f"{where}: 'box' is normalised (0..1); use 'box_px' for pixels")
            elif "box_px" in entry:
                if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, (int, float)) and v > 0 for v in size)):
                    raise DetectionFileError(f"{where}: 'box_px' needs a top-level 'image_size': [W, H]")
                x0, y0, x1, y1 = _check_box(entry["box_px"], where)
                box = (x0 / size[0], y0 / size[1], x1 / size[0], y1 / size[1])
            else:
                raise DetectionFileError(f"{where}: needs 'box' (normalised) or 'box_px'")
            try:
                score = float(entry.get("score", 1.0))
            except (TypeError, ValueError):
                raise DetectionFileError(f"{where}: score must be a number") from None
            mask = self._mask(entry.get("mask"), where) if entry.get("mask") is not None else None
            out.append(Detection(box=box, mask=mask, label=str(entry.get("label", "")), score=score))
        return out

    def _mask(self, name, where: str) -> np.ndarray:
        if not isinstance(name, str) or not name:
            raise DetectionFileError(f"{where}: mask must be a PNG file name")
        folder = self.path.parent.resolve()
        mpath = (folder / name).resolve()
        if folder not in mpath.parents:  # masks live beside the JSON, never elsewhere
            raise DetectionFileError(f"{where}: mask {name!r} must be a file beside {self.path.name}")
        try:
            with Image.open(mpath) as img:
                return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
        except (OSError, ValueError) as exc:
            raise DetectionFileError(f"{where}: cannot read mask {mpath} ({exc})") from exc

    def detect(self, image: Image.Image, prompts: list[str]) -> list[Detection]:
        """The file's detections (of `prompts`' labels), best score first as every detector returns them
        (equal scores keep the file's order)."""
        return sorted((d for d in self.detections if _wanted(d.label, prompts)), key=lambda d: -d.score)


def write_detections(path: str | Path, detections: Sequence[Detection]) -> Path:
    """Write detections in FileDetector's schema (masks as PNGs beside it); temporary name, then rename."""
    from luna.files import save_png_atomic, write_json_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, d in enumerate(detections):
        entry = {"box": [float(v) for v in d.box], "label": d.label, "score": float(d.score)}
        if d.mask is not None:
            name = f"{path.stem}-mask{i:03d}.png"
            mask8 = np.clip(np.rint(np.asarray(d.mask, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
            save_png_atomic(Image.fromarray(mask8), path.parent / name)
            entry["mask"] = name
        entries.append(entry)
    return write_json_atomic(path, {"format_version": FILE_FORMAT_VERSION, "detections": entries})


# --------------------------------------------------------------------------- cascade

FACE_WORDS = ("face", "faces", "head", "person face", "portrait")


def _cluster(hits: list[tuple[float, float, float, float]], overlap: float) -> list[list[int]]:
    """Group boxes whose intersection covers `overlap` of the smaller one (union-find)."""
    parent = list(range(len(hits)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, a in enumerate(hits):
        for j in range(i + 1, len(hits)):
            b = hits[j]
            iw = min(a[2], b[2]) - max(a[0], b[0])
            ih = min(a[3], b[3]) - max(a[1], b[1])
            if iw <= 0 or ih <= 0:
                continue
            small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
            if iw * ih >= overlap * small:
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(hits)):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


class CascadeFaceDetector:
    """Frontal faces with scikit-image's LBP cascade (ships with scikit-image, no download).

    The image is downscaled so its longer side is at most `max_side` (speed), searched for
    faces from `min_face` x its shorter side up to the whole side, and overlapping hits are
    merged (clusters of at least `min_hits` raw hits). Score = hits / (hits + 3): more
    agreeing windows, more confidence. Prompts: answers only face-like prompts ("face",
    "head", ...); with no prompt it looks for faces.
    """

    label = "face"

    def __init__(self, *, max_side: int = 1024, min_face: float = 0.06, scale_factor: float = 1.2,
                 step_ratio: float = 1.0, min_hits: int = 3, merge_overlap: float = 0.5):
        from skimage import data
        from skimage.feature import Cascade

        self.cascade = Cascade(data.lbp_frontal_face_cascade_filename())
        self.max_side, self.min_face = int(max_side), float(min_face)
        self.scale_factor, self.step_ratio = float(scale_factor), float(step_ratio)
        self.min_hits, self.merge_overlap = int(min_hits), float(merge_overlap)

    def detect(self, image: Image.Image, prompts: list[str] | None = None) -> list[Detection]:
        asked = [p for p in (prompts or []) if p.strip().lower() in FACE_WORDS]
        if prompts and not asked:
            return []
        label = asked[0] if asked else self.label  # answer in the caller's word ("head", "face")
        rgb = image.convert("RGB")
        w, h = rgb.size
        scale = min(1.0, self.max_side / max(w, h))
        if scale < 1.0:
            rgb = rgb.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
        gray = np.asarray(rgb.convert("L"), dtype=np.float32) / 255.0
        sh, sw = gray.shape
        lo = max(24, int(self.min_face * min(sh, sw)))
        hi = min(sh, sw)
        if lo > hi:
            return []
        raw = self.cascade.detect_multi_scale(
            img=gray, scale_factor=self.scale_factor, step_ratio=self.step_ratio,
            min_size=(lo, lo), max_size=(hi, hi), min_neighbor_number=1, intersection_score_threshold=1.01,
        )
        hits = [(r["c"], r["r"], r["c"] + r["width"], r["r"] + r["height"]) for r in raw]
        out = []
        for group in _cluster(hits, self.merge_overlap):
            if len(group) < self.min_hits:
                continue
            box = np.median(np.array([hits[i] for i in group], dtype=np.float64), axis=0)
            norm = (box[0] / sw, box[1] / sh, box[2] / sw, box[3] / sh)
            out.append(Detection(box=tuple(float(np.clip(v, 0.0, 1.0)) for v in norm), label=label,
                                 score=len(group) / (len(group) + 3.0), extra={"hits": len(group)}))
        return sorted(out, key=lambda d: -d.score)


# --------------------------------------------------------------------------- transformers models


def _local_folder(weights, what: str, hint: str) -> Path:
    if weights is None or str(weights) == "":
        raise DetectorUnavailable(f"{what} needs local weights: set detect.weights=/path/to/folder ({hint})")
    path = Path(str(weights)).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file():
        raise DetectorUnavailable(
            f"{what}: {path} is not a model folder with config.json ({hint}); no weights are downloaded at run time"
        )
    return path


class ZeroShotDetector:
    """Text-prompted boxes with OWLv2 / OWL-ViT / Grounding DINO from a local transformers folder."""

    HINT = "save e.g. google/owlv2-base-patch16-ensemble or IDEA-Research/grounding-dino-tiny with save_pretrained"

    def __init__(self, weights: str | Path | None = None, *, threshold: float = 0.2, text_threshold: float = 0.25,
                 nms_iou: float = 0.5, device: str | None = None):
        path = _local_folder(weights, "ZeroShotDetector", self.HINT)
        import torch
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self.device = resolve_device(device)
        try:
            self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForZeroShotObjectDetection.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise DetectorUnavailable(f"ZeroShotDetector: cannot load {path} ({exc})") from exc
        self.model.to(self.device).eval()
        self.kind = "grounding" if "grounding" in self.model.config.model_type else "owl"
        self.threshold, self.text_threshold = float(threshold), float(text_threshold)
        self.nms_iou = float(nms_iou)
        self._torch = torch

    def detect(self, image: Image.Image, prompts: list[str]) -> list[Detection]:
        if not prompts:
            raise ValueError("ZeroShotDetector needs at least one text prompt (detect.prompts=[face,hand])")
        rgb = image.convert("RGB")
        w, h = rgb.size
        if self.kind == "grounding":  # Grounding DINO wants one lower-case string of "a. b." phrases
            text = " ".join(p.strip().lower().rstrip(".") + "." for p in prompts)
        else:
            text = [list(prompts)]
        inputs = self.processor(images=rgb, text=text, return_tensors="pt").to(self.device)
        with self._torch.inference_mode():
            outputs = self.model(**inputs)
        if self.kind == "grounding":
            res = self.processor.post_process_grounded_object_detection(
                outputs, inputs.input_ids, threshold=self.threshold, text_threshold=self.text_threshold,
                target_sizes=[(h, w)])[0]
        else:
            res = self.processor.post_process_grounded_object_detection(
                outputs, threshold=self.threshold, target_sizes=[(h, w)], text_labels=[list(prompts)])[0]
        labels = res.get("text_labels", res.get("labels"))
        out = []
        for box, score, label in zip(res["boxes"].tolist(), res["scores"].tolist(), labels):
            if not isinstance(label, str):
                label = prompts[int(label)]
            x0, y0, x1, y1 = (min(max(v, 0.0), 1.0) for v in (box[0] / w, box[1] / h, box[2] / w, box[3] / h))
            if x1 > x0 and y1 > y0:
                out.append(Detection(box=(x0, y0, x1, y1), label=label, score=float(score)))
        return suppress_overlaps(out, self.nms_iou)  # OWL scores every patch: many near-duplicates


class Sam3Detector:
    """Text-prompted masks and boxes with SAM 3 (transformers' Sam3Model) from a local folder."""

    HINT = ("SAM 3 weights are gated: accept the licence of facebook/sam3, download it once and pass the folder; "
            "it needs transformers>=5 with Sam3Model")

    def __init__(self, weights: str | Path | None = None, *, threshold: float = 0.4, mask_threshold: float = 0.5,
                 device: str | None = None):
        path = _local_folder(weights, "Sam3Detector", self.HINT)  # before the (slow) import
        try:
            from transformers import Sam3Model, Sam3Processor
        except ImportError as exc:
            raise DetectorUnavailable(f"Sam3Detector: this transformers has no Sam3Model; pip install 'transformers>=5' ({exc})") from exc
        import torch

        self.device = resolve_device(device)
        try:
            self.processor = Sam3Processor.from_pretrained(path, local_files_only=True)
            self.model = Sam3Model.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise DetectorUnavailable(f"Sam3Detector: cannot load {path} ({exc})") from exc
        self.model.to(self.device).eval()
        self.threshold, self.mask_threshold = float(threshold), float(mask_threshold)
        self._torch = torch

    def detect(self, image: Image.Image, prompts: list[str]) -> list[Detection]:
        if not prompts:
            raise ValueError("Sam3Detector needs at least one text prompt (detect.prompts=[face,hand])")
        rgb = image.convert("RGB")
        w, h = rgb.size
        out = []
        for prompt in prompts:  # one concept per forward pass
            inputs = self.processor(images=rgb, text=prompt, return_tensors="pt").to(self.device)
            with self._torch.inference_mode():
                outputs = self.model(**inputs)
            res = self.processor.post_process_instance_segmentation(
                outputs, threshold=self.threshold, mask_threshold=self.mask_threshold, target_sizes=[(h, w)])[0]
            for box, score, mask in zip(res["boxes"].tolist(), res["scores"].tolist(), res["masks"]):
                x0, y0, x1, y1 = (min(max(v, 0.0), 1.0) for v in (box[0] / w, box[1] / h, box[2] / w, box[3] / h))
                if x1 > x0 and y1 > y0:
                    m = mask.float().cpu().numpy().astype(np.float32)
                    out.append(Detection(box=(x0, y0, x1, y1), mask=m, label=prompt, score=float(score)))
        return sorted(out, key=lambda d: -d.score)


# --------------------------------------------------------------------------- factory

DETECTORS = {
    "cascade": CascadeFaceDetector,
    "file": FileDetector,
    "zeroshot": ZeroShotDetector,
    "owlv2": ZeroShotDetector,
    "grounding_dino": ZeroShotDetector,
    "sam3": Sam3Detector,
}


def make_detector(name: str = "cascade", **cfg) -> Detector:
    """Build a detector by name: cascade (default), file (path=), zeroshot/owlv2/grounding_dino
    (weights=), sam3 (weights=). Unknown config keys are an error naming them."""
    key = str(name).strip().lower()
    if key not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose one of {sorted(DETECTORS)}")
    cls = DETECTORS[key]
    cfg = {k: v for k, v in cfg.items() if v is not None}
    if cls is FileDetector:
        path = cfg.pop("path", None)
        if path is None:
            raise ValueError("detector 'file' needs detect.path=/path/to/detections.json")
        if cfg:
            raise ValueError(f"detector 'file' takes only 'path'; unexpected {sorted(cfg)}")
        return FileDetector(path)
    try:
        return cls(**cfg)
    except TypeError as exc:
        raise ValueError(f"detector {name!r}: bad settings {sorted(cfg)} ({exc})") from exc
