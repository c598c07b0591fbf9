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


def compose(overrides: list[str]):
    """conf/extract.yaml composed with `overrides`, as `luna extract` would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from luna import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose("extract", overrides=overrides)


def extract_cfg(shards, out, ckpts, *extra):
    return compose([f"shards={shards}", f"out={out}", f"checkpoints.dirs=[{ckpts[0]['dir']}]", "progress=false",
                    "batch_size=3", *extra])


@pytest.fixture(scope="session")
def extracted(tmp_path_factory, shards_dir, tiny_checkpoints):
    """The three shards extracted once in this process, stored in float32 so comparisons are exact."""
    from extraction.extract import extract

    out = tmp_path_factory.mktemp("pairs")
    result = extract(extract_cfg(shards_dir, out, tiny_checkpoints, "dtype=float32", "workers=2"))
    return out, result


def part_arrays(folder: Path) -> dict[str, dict]:
    """{part name: {dataset path: array}} of every part in a pairs folder."""
    import h5py

    out = {}
    for p in sorted(folder.glob("pairs-*.h5")):
        with h5py.File(p, "r") as f:
            arrays = {}
            f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        out[p.name] = arrays
    return out


def assert_same_parts(a: Path, b: Path) -> None:
    import numpy as np

    pa, pb = part_arrays(a), part_arrays(b)
    assert list(pa) == list(pb) and pa
    for name in pa:
        assert sorted(pa[name]) == sorted(pb[name]), name
        for ds in pa[name]:
            np.testing.assert_array_equal(pa[name][ds], pb[name][ds], err_msg=f"{name}:{ds}")
