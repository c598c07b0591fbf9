"""report.html from a synthetic results dict: self-contained, its PNGs beside it, every image loads in Chromium."""
from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from demo.report import build_report

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars"]


def _png(path: Path, colour, size=(64, 64)) -> str:
    rng = np.random.default_rng(sum(colour))
    arr = np.clip(np.array(colour, np.float32) + rng.normal(0, 20, (*size[::-1], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return str(path)


def synthetic_results(tmp: Path) -> dict:
    jobs, ckpts = ["eyes", "faces"], ["tiny-base-0", "tiny-pony-1"]
    samples = [{"job": j, "checkpoint": c, "key": f"demo_{j}_{i:06d}", "prompt": f"{j} prompt {i}",
                "image": _png(tmp / "in" / f"{j}_{c}_{i}.png", (40 + 80 * a, 60 + 60 * b, 30 * i))}
               for a, j in enumerate(jobs) for b, c in enumerate(ckpts) for i in range(3)]
    history = []
    for step in range(1, 9):
        history.append({"step": step, "epoch": step // 2, "train/loss": 2.0 / step})
        if step % 2 == 0:
            history.append({"step": step, "epoch": step // 2 - 1, "val/loss": 2.5 / step, "val/cos_content": 0.1 * step / 2,
                            "val/cos_pad": 0.5, "val/knn_cos": 0.3})
    photo = tmp / "in" / "photo.png"
    _png(photo, (120, 120, 160), (160, 120))
    refined = Image.open(photo).copy()
    refined.paste((250, 200, 180), (60, 30, 100, 70))
    refined.save(tmp / "in" / "refined.png")
    return {
        "title": "Synthetic demo", "command": "luna demo out=x",
        "timings": {"models": 1.5, "factory": 30.2, "extract": 8.0, "vault": 1.1, "train": 12.0, "refine": 5.0},
        "resumed": ["models"],
        "campaign": {"name": "demo", "images": 12, "rejected": 1, "shards": 4, "units": 4,
                     "rejected_reasons": {"flat": 1},
                     "checkpoints": [{"name": c, "family": c.split("-")[1], "te_fingerprint": "ab" * 12} for c in ckpts],
                     "counts": {j: {c: 3 for c in ckpts} for j in jobs}, "samples": samples},
        "pairs": {"images": 12, "unique_prompts": 11, "bytes": 120000, "bytes_per_sample": 10000.0, "parts": 4,
                  "vision_model": "open_clip:luna-tiny-vit", "vision_dim": 32, "text_dims": [77, 2048],
                  "categories": {"demo/eyes": 6, "demo/faces": 6}, "text_encoders": {"ab" * 12: 6, "cd" * 12: 5}},
        "vault": {"images": 12, "prompts": 11, "index": "Flat", "mode": "stored", "bytes_per_image": 15000,
                  "categories": ["demo/eyes", "demo/faces"]},
        "retrieval": [{"title": "crop of a sample", "sheet": _png(tmp / "in" / "sheet.png", (200, 200, 200), (400, 96)),
                       "neighbours": [{"key": "k1", "prompt": "blue <eyes> & co", "score": 0.98, "checkpoint": "tiny-base-0"}]}],
        "training": {"history": history, "parameters": 188320, "epochs": 4, "model": "LearnedQueryDecoder",
                     "metrics": {"val/cos_content": 0.4, "val/knn_cos": 0.3, "val_ckpt/cos_content": 0.1,
                                 "val_ckpt/cos_shuffled": 0.05, "val/r_at_1": 1.0}},
        "refine": {"prompt": "portrait", "original": str(photo), "overlay": str(tmp / "in" / "refined.png"),
                   "box": [60, 30, 100, 70], "detections": [{"label": "face", "score": 0.9, "box": [0.37, 0.25, 0.62, 0.58]}],
                   "variants": [{"name": "vault", "image": str(tmp / "in" / "refined.png"),
                                 "neighbours": [{"key": "k2", "prompt": "a face", "score": 0.7}]},
                                {"name": "projector", "image": str(tmp / "in" / "refined.png")}]},
    }


def _images(html: str) -> list[tuple[str, str]]:
    return re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"[^>]*data-file="([^"]+)"', html)


def test_report_is_self_contained_with_pngs_beside_it(tmp_path):
    path = build_report(synthetic_results(tmp_path), tmp_path / "out")
    html = path.read_text()
    assert path == tmp_path / "out" / "report.html"
    imgs = _images(html)
    assert len(imgs) == html.count("<img ") >= 9  # grid, sheet, curves, comparison, 4 refine, strip, timings
    assert not re.search(r'<img src="(?!data:)', html)  # nothing loaded from disk or the network
    for data, rel in imgs:
        beside = tmp_path / "out" / rel
        assert beside.is_file() and beside.read_bytes() == base64.b64decode(data)
        Image.open(beside).verify()
    # user text is escaped, numbers reach the page
    assert "blue &lt;eyes&gt; &amp; co" in html and "<eyes>" not in html
    for text in ("tiny-pony-1", "9.8 KiB", "Flat", "188,320", "57.8 s"):
        assert text in html, text


def test_sample_grid_has_a_cell_per_job_and_checkpoint(tmp_path):
    from demo.report import sample_grid

    res = synthetic_results(tmp_path)
    grid = np.asarray(sample_grid(res["campaign"]["samples"], per_cell=2, tile=32))
    # 2 jobs x 2 checkpoints, 2 tiles per cell side by side: the four distinct sample colours all appear
    for a in range(2):
        for b in range(2):
            want = np.array([40 + 80 * a, 60 + 60 * b], np.float32)
            close = np.abs(grid[..., :2].astype(np.float32) - want).max(-1) < 30
            assert close.sum() > 32 * 32, (a, b)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def test_report_opens_in_headless_chromium_with_every_image_loaded(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (CI installs it: apt-get install -y chromium)")
    path = build_report(synthetic_results(tmp_path), tmp_path / "out")
    n_images = path.read_text().count("<img ")
    url = path.resolve().as_uri()
    shot = tmp_path / "report.png"
    common = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1280,2400", url],
                   check=True, capture_output=True, timeout=120)
    with Image.open(shot) as im:
        assert im.size == (1280, 2400)
        arr = np.asarray(im.convert("RGB"))
    assert arr.std() > 10  # a rendered page, not a blank one
    dom = subprocess.run([*common, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=120).stdout
    m = re.search(r'id="image-check" data-loaded="(\d+)" data-total="(\d+)"', dom)
    assert m, dom[-500:]
    assert int(m.group(1)) == int(m.group(2)) == n_images
