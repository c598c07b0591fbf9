"""Fixtures of the extraction tests: tiny checkpoints with their fingerprints, and a folder of shards."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tests.extraction.extraction_shards import shard_metas, write_shard


def write_text_encoder_checkpoint(folder: Path, family: str) -> Path:
    """A tiny SDXL diffusers folder holding what extraction reads: the model index, the UNet config
    (the architecture check) and the two text encoders of `family` (the tiny preset's weights).
    Writing only these keeps the tests fast; `luna.models.tiny.write_checkpoints` writes whole ones."""
    from luna.models.configs import SDXL_TINY
    from luna.models.tiny import tiny_text_encoders

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(SDXL_TINY / "model_index.json", folder / "model_index.json")
    (folder / "unet").mkdir(exist_ok=True)
    shutil.copy(SDXL_TINY / "unet" / "config.json", folder / "unet" / "config.json")
    te1, te2 = tiny_text_encoders(family)
    te1.save_pretrained(folder / "text_encoder", safe_serialization=True)
    te2.save_pretrained(folder / "text_encoder_2", safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> list[dict]:
    """Two tiny checkpoints of different text-encoder families (base, pony) with their fingerprints."""
    from luna.models.fingerprint import te_fingerprint

    root = tmp_path_factory.mktemp("te_checkpoints")
    out = []
    for i, family in enumerate(("base", "pony")):
        path = write_text_encoder_checkpoint(root / f"tiny-{family}-{i}", family)
        out.append({"name": path.name, "path": path, "family": family, "fingerprint": f"fp-{path.name}",
                    "te_fingerprint": te_fingerprint(path), "dir": root})
    return out


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory, tiny_checkpoints) -> Path:
    """Three complete shards (12 samples, 5 prompts x 2 text-encoder families, repeats across shards)."""
    folder = tmp_path_factory.mktemp("shards")
    for s in range(3):
        write_shard(folder, f"faces-pc1-w0-{s:06d}", shard_metas(tiny_checkpoints, 4, offset=4 * s), seed=s)
    return folder
