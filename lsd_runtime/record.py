"""What a refine run leaves behind: the image, record.json, debug overlays, masks, the scaffold.

    OUT/refined.png              the final image
    OUT/record.json              every decision: detections, crops (box, size, conditioning source
                                 and strength, vault neighbours), skipped detections and why,
                                 tiles, settings, timings
    OUT/overlays/detections.png  detection boxes (red) and square crops (green) on the result
    OUT/overlays/tiles.png       the global refiner's tiles, coloured by chessboard pass
    OUT/masks/crop_NNN.png       each crop's paste mask in the image frame
    OUT/scaffold.safetensors     the noise scaffold (reload it to reproduce the run)
    OUT/detections.json          the detections used, in FileDetector's format (detect.write_detections,
                                 masks as detections-maskNNN.png beside it): edit it and pass it back
                                 with detect=file detect.path=OUT/detections.json

Every file is written to a temporary name and renamed.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from luna.files import save_png_atomic, write_json_atomic

PASS_COLOURS = [(255, 80, 80), (80, 200, 80), (80, 120, 255), (240, 200, 40), (200, 80, 220), (60, 210, 210)]


def detection_overlay(image: Image.Image, record: dict) -> Image.Image:
    """Detection boxes (red, with label and score) and the square crops cut from them (green)."""
    img = image.convert("RGB").copy()
    w, h = img.size
    cw, ch = record.get("canvas_size", [w, h])
    draw = ImageDraw.Draw(img)
    lw = max(1, round(max(w, h) / 512))
    for d in record.get("detections", []):
        x0, y0, x1, y1 = d["box"]
        draw.rectangle([x0 * cw, y0 * ch, x1 * cw - 1, y1 * ch - 1], outline=(255, 0, 0), width=lw)
        draw.text((x0 * cw + 2, y0 * ch + 2), f"{d.get('label', '')} {d.get('score', 0):.2f}", fill=(255, 0, 0))
    for c in record.get("crops", []):
        x0, y0, x1, y1 = c["crop_box"]
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(0, 255, 0), width=lw)
        src = c.get("conditioning", {}).get("source", "")
        draw.text((x0 + 2, y1 - 12), f"#{c['index']} {src}", fill=(0, 255, 0))
    return img


def tile_overlay(image: Image.Image, record: dict) -> Image.Image:
    """Tile outlines, one colour per chessboard pass."""
    img = image.convert("RGB").copy()
    draw = ImageDraw.Draw(img)
    lw = max(1, round(max(img.size) / 512))
    for t in record.get("tiles", []):
        x0, y0, x1, y1 = t["box"]
        colour = PASS_COLOURS[t.get("pass", 0) % len(PASS_COLOURS)]
        inset = lw * (1 + t.get("pass", 0))  # passes overlap: inset so every outline shows
        draw.rectangle([x0 + inset, y0 + inset, x1 - 1 - inset, y1 - 1 - inset], outline=colour, width=lw)
        draw.text((x0 + inset + 2, y0 + inset + 2), f"{t['row']},{t['col']} p{t.get('pass', 0)}", fill=colour)
    return img


def _save_png(img: Image.Image, path: Path) -> str:
    return str(save_png_atomic(img, path))


def write_json(obj: dict, path: Path) -> Path:
    return write_json_atomic(path, obj, default=_json_default)


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return repr(x)


def write_outputs(result, out_dir, name: str = "refined.png") -> dict:
    """Write the result's image, overlays, masks, scaffold, detections.json and record.json into `out_dir`;
    returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"image": _save_png(result.image, out / name)}
    for key, img in result.overlays.items():
        files[f"overlay_{key}"] = _save_png(img, out / "overlays" / f"{key}.png")
    for key, mask in result.masks.items():
        arr = np.clip(np.rint(np.asarray(mask, np.float32) * 255.0), 0, 255).astype(np.uint8)
        files[f"mask_{key}"] = _save_png(Image.fromarray(arr), out / "masks" / f"{key}.png")
    if result.scaffold is not None:
        files["scaffold"] = str(result.scaffold.save(out / "scaffold.safetensors"))
    if getattr(result, "detections", None) is not None:  # FileDetector's format, not record.json's
        from lsd_runtime.detect import write_detections

        files["detections"] = str(write_detections(out / "detections.json", result.detections))
    record = dict(result.record)
    record["files"] = {k: os.path.relpath(v, out) for k, v in files.items()}
    files["record"] = str(write_json(record, out / "record.json"))
    return files
