"""`luna demo models.preset=tiny` at its smallest settings: every stage's files, a report whose images exist, a refined photo
changed only inside the detected face's crop, and a rerun that resumes instead of redoing."""
from __future__ import annotations

import json
import re

import numpy as np
from PIL import Image

SMALL = ["models.preset=tiny", "campaign.quota=2", "campaign.steps=2", "campaign.batch_size=2", "train.epochs=1", "train.batch_size=8",
         "retrieval.samples=1", "retrieval.k=3", "refine.k=3", "+refine.detail.steps=2", "report.samples_per_cell=1",
         "progress=false"]


def test_demo_runs_the_whole_loop_and_resumes(ray_cluster, tmp_path, capsys):
    from demo.run import main

    out = tmp_path / "demo run"  # a space in the path: every stage's override must survive it
    assert main([f"out={out}", *SMALL]) == 0

    # each stage's files, in the formats the next stage reads
    shards = sorted((out / "factory" / "shards").glob("*.tar"))
    assert shards and all((s.parent / f"{s.stem}_stats.json").is_file() for s in shards)
    assert sorted((out / "pairs").glob("pairs-*.h5"))
    assert (out / "vault" / "manifest.json").is_file()
    assert (out / "projector" / "projector.safetensors").is_file() and (out / "projector" / "projector.json").is_file()
    assert list((out / "projector" / "wandb").glob("offline-run-*"))  # the W&B offline run
    results = json.loads((out / "demo" / "results.json").read_text())
    families = {c["family"] for c in results["campaign"]["checkpoints"]}
    assert len(families) >= 2
    assert results["campaign"]["images"] == 6 and results["pairs"]["images"] == 6
    assert set(results["timings"]) == {"models", "factory", "extract", "vault", "train", "refine", "quality", "ab", "report"}

    # the report: self-contained, and every inlined image is also a file beside it
    html = (out / "report.html").read_text()
    files = re.findall(r'data-file="([^"]+)"', html)
    assert len(files) == html.count("<img ") >= 8
    assert not re.search(r'<img src="(?!data:)', html)
    for rel in files:
        assert (out / rel).is_file(), rel
    assert "tiny-pony-1" in html and "vault k-NN" in html

    # the astronaut: the face was found, and each refinement changed pixels only inside its crop
    refine = results["refine"]
    assert refine["detections"] and refine["detections"][0]["label"] == "face"
    original = np.asarray(Image.open(refine["original"]).convert("RGB")).astype(int)
    for variant in refine["variants"]:
        record = json.loads(open(variant["record"]).read())
        refined = np.asarray(Image.open(variant["image"]).convert("RGB")).astype(int)
        assert refined.shape == original.shape
        inside = np.zeros(original.shape[:2], bool)
        for crop in record["crops"]:
            x0, y0, x1, y1 = crop["crop_box"]
            inside[y0:y1, x0:x1] = True
        changed = (refined != original).any(-1)
        assert changed[inside].sum() > 0.1 * inside.sum(), variant["name"]
        assert not changed[~inside].any(), variant["name"]
        # the detection box lies inside the crop it was cut from
        dx0, dy0, dx1, dy1 = record["detections"][0]["box"]
        h, w = original.shape[:2]
        assert inside[int(dy0 * h) + 1:int(dy1 * h) - 1, int(dx0 * w) + 1:int(dx1 * w) - 1].all()
    assert {v["name"] for v in refine["variants"]} == {"vault", "projector"}
    assert refine["variants"][0]["neighbours"]  # the vault's evidence for the face crop

    # rerun: every finished stage is skipped (its recorded time kept), the report is rebuilt
    capsys.readouterr()
    mtime = (out / "projector" / "projector.safetensors").stat().st_mtime_ns
    assert main([f"out={out}", *SMALL]) == 0
    again = json.loads((out / "demo" / "results.json").read_text())
    assert set(again["resumed"]) == {"models", "factory", "extract", "vault", "train", "refine", "quality", "ab"}
    assert all(again["timings"][s] == results["timings"][s] for s in again["resumed"])
    assert (out / "projector" / "projector.safetensors").stat().st_mtime_ns == mtime
    assert "skipped" in capsys.readouterr().err


def test_fresh_refuses_to_wipe_a_folder_that_is_not_a_demo(tmp_path, capsys):
    from demo.run import main

    keep = tmp_path / "precious.txt"
    keep.write_text("not a demo")
    assert main([f"out={tmp_path}", "fresh=true"]) == 2
    assert keep.is_file()
    assert "fresh=true would delete" in capsys.readouterr().err
