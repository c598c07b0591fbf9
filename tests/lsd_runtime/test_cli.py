"""`luna refine` end to end on the astronaut (tiny preset), and bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lsd_runtime.cli import main

TINY_VISION = "open_clip:luna-tiny-vit"


@pytest.fixture(scope="module")
def astronaut(tmp_path_factory):
    from skimage import data

    path = tmp_path_factory.mktemp("img") / "astronaut.png"
    Image.fromarray(data.astronaut()).save(path)
    return path


@pytest.fixture(scope="module")
def vault_dir(tmp_path_factory):
    """Conditionings of the tiny preset's own text encoders and of another family's."""
    from extraction.synthetic import write_synthetic_pairs
    from lsd_runtime.workflow import tiny_components
    from vault.build import build_vault

    parts = [write_synthetic_pairs(tmp_path_factory.mktemp("pairs"), 120, 30, 32, text_dims=(32, 64), pooled_dim=64,
                                   vision_model=TINY_VISION, te_fingerprint=fp)
             for fp in (tiny_components(vision=False).te_fingerprint, "other-family-te")]
    out = tmp_path_factory.mktemp("v") / "vault"
    build_vault(parts, out, index="Flat", categories=False)
    return out


def test_refine_astronaut_with_a_vault_writes_image_overlays_masks_and_record(astronaut, vault_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main([f"image={astronaut}", "prompt=an astronaut, detailed face", f"out={out}", "preset=tiny",
               f"vault={vault_dir}", "retrieval.k=3", "retrieval.weight=0.4", "detect.prompts=[face]"])
    assert rc == 0, capsys.readouterr().err
    refined = Image.open(out / "refined.png")
    assert refined.size == (512, 512)
    assert not np.array_equal(np.asarray(refined), np.asarray(Image.open(astronaut)))
    record = json.loads((out / "record.json").read_text())
    assert record["image_size"] == [512, 512] and record["canvas_size"] == [512, 512]
    assert record["crops"], "the cascade should find the astronaut's face"
    face = record["crops"][0]
    x0, y0, x1, y1 = face["crop_box"]
    assert x1 - x0 == y1 - y0 == face["crop_size"] and x0 % 8 == 0 and y0 % 8 == 0
    assert 0.3 < (x0 + x1) / 1024 < 0.6 and (y0 + y1) / 1024 < 0.4  # the face is upper centre
    cond = face["conditioning"]
    assert cond["source"] == "vault" and cond["strength"] == 0.4 and len(cond["neighbours"]) == 3
    assert all(n["key"] and n["prompt"].startswith("synthetic") for n in cond["neighbours"])
    own = record["retrieval"]["te_fingerprint"]
    assert record["retrieval"]["family"] == "same" and record["retrieval"]["warning"] is None
    assert all(n["te_fingerprint"] == own for n in cond["neighbours"])  # the other family's never blend in
    assert record["conditioning"]["vision_model"] == TINY_VISION
    assert len(record["tiles"]) == 9 and {t["pass"] for t in record["tiles"]} == {0, 1}  # two chessboard passes
    assert {"detect", "detail", "global_refine", "total"} <= set(record["timings"])
    for rel in record["files"].values():
        assert (out / rel).is_file()
    mask = np.asarray(Image.open(out / "masks" / "crop_000.png"))
    assert mask.shape == (512, 512) and mask[y0:y1, x0:x1].max() == 255 and mask[:y0].max() == 0
    assert Image.open(out / "overlays" / "detections.png").size == (512, 512)
    from lsd_runtime.detect import FileDetector  # the detections used, ready for detect=file

    back = FileDetector(out / "detections.json").detect(Image.open(astronaut), [])
    keys = ("box", "label", "score", "has_mask")  # the detector's extra evidence (hits) stays in record.json
    assert [d.to_json() for d in back] == [{k: d[k] for k in keys} for d in record["detections"]]  # unpadded


@pytest.mark.parametrize("routing", [[], ["retrieval.category=route"]])
def test_retrieval_family_any_is_recorded_as_a_warning(astronaut, vault_dir, tmp_path, capsys, routing):
    """Also when the crops are routed by label (the record's `retrieval` comes from the router's describe())."""
    out = tmp_path / "run"
    rc = main([f"image={astronaut}", "prompt=an astronaut", f"out={out}", "preset=tiny", f"vault={vault_dir}",
               "retrieval.k=6", "retrieval.family=any", "detect.prompts=[face]", "refine.enabled=false", *routing])
    assert rc == 0, capsys.readouterr().err
    record = json.loads((out / "record.json").read_text())
    assert record["retrieval"]["family"] == "any" and "other-family-te" in record["retrieval"]["warning"]
    assert record["retrieval"].get("routed", False) == bool(routing)


def test_unreadable_image_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    assert main([f"image={bad}", f"out={tmp_path / 'o'}", "preset=tiny"]) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and "Traceback" not in err


def test_sd15_checkpoint_is_refused_with_the_reason(tmp_path, astronaut, capsys):
    import torch
    from safetensors.torch import save_file

    ckpt = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
               "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": torch.zeros(77, 8)},
              str(ckpt))
    assert main([f"image={astronaut}", f"out={tmp_path / 'o'}", f"checkpoint={ckpt}"]) == 2
    err = capsys.readouterr().err
    assert "SD 1" in err and "not SDXL" in err


def test_vault_of_another_vision_model_is_refused(tmp_path, astronaut, capsys):
    from extraction.synthetic import write_synthetic_pairs
    from vault.build import build_vault

    pairs = write_synthetic_pairs(tmp_path / "pairs", 60, 10, 32, text_dims=(32, 64), pooled_dim=64,
                                  vision_model="open_clip:ViT-L-14-336")
    build_vault(pairs, tmp_path / "vault", index="Flat", categories=False)
    rc = main([f"image={astronaut}", f"out={tmp_path / 'o'}", "preset=tiny", f"vault={tmp_path / 'vault'}",
               "vision.name=tiny"])
    assert rc == 2
    assert "ViT-L-14-336" in capsys.readouterr().err


def test_wrong_setting_types_and_unknown_detector_keys_are_user_errors(astronaut, tmp_path, capsys):
    assert main([f"image={astronaut}", f"out={tmp_path / 'o'}", "preset=tiny", "detail.steps=many"]) == 2
    assert "detail.steps" in capsys.readouterr().err
    assert main([f"image={astronaut}", f"out={tmp_path / 'o'}", "preset=tiny", "+detect.radius=3"]) == 2
    assert "radius" in capsys.readouterr().err
    assert main([f"image={astronaut}", f"out={tmp_path / 'o'}", "preset=tiny", "detect=file"]) == 2
    assert "detect.path" in capsys.readouterr().err


def test_every_detector_config_names_a_detector_class():
    from hydra.utils import get_class

    from lsd_runtime.cli import make_detector_from
    from lsd_runtime.detect import CascadeFaceDetector
    from luna import CONF_DIR
    from luna.cli import compose

    names = sorted(p.stem for p in (CONF_DIR / "detect").glob("*.yaml"))
    assert {"cascade", "file", "owlv2", "sam3"} <= set(names)
    for name in names:
        detect = compose("refine", [f"detect={name}"]).detect
        assert callable(getattr(get_class(detect._target_), "detect", None)), name
    assert isinstance(make_detector_from(compose("refine").detect), CascadeFaceDetector)
