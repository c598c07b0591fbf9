"""Shared by the vault's CLI and service tests: the tiny vision tower and a vault holding 4 real images."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from extraction.pairs import Pairs, PairsPart, write_part
from extraction.synthetic import synthetic_encode, write_synthetic_pairs
from vault.build import build_vault


def _image(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray((rng.random((48, 48, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def tower():
    from luna.models.vision import load_vision

    return load_vision("tiny")


@pytest.fixture(scope="module")
def image_vault(tower, tmp_path_factory):
    """Synthetic pairs in the tiny tower's space plus 4 real images (keys img0..img3, two in a shard)."""
    from luna.models.vision import embed

    root = tmp_path_factory.mktemp("iv")
    pairs = write_synthetic_pairs(root / "pairs", 300, 30, tower.dim, vision_model=tower.model_id)
    images = [_image(i) for i in range(4)]
    embeds = embed(tower, images).embed.numpy()
    texts = [f"real image {i}" for i in range(4)]
    cond, pooled = synthetic_encode(texts)
    write_part(pairs / "part-img.h5", PairsPart(
        images={"key": np.array([f"img{i}" for i in range(4)], dtype=object), "embed": embeds,
                "prompt_id": np.arange(4), "checkpoint": np.array(["ckpt_a"] * 4, dtype=object),
                "category": np.array(["faces"] * 4, dtype=object), "campaign": np.array(["c"] * 4, dtype=object),
                "seed": np.arange(4)},
        prompts={"text": np.array(texts, dtype=object), "cond": cond, "pooled": pooled,
                 "te_fingerprint": np.array(["synthetic-te-0"] * 4, dtype=object)},
        attrs={"vision_model": tower.model_id, "vision_dim": tower.dim, "text_dims": [32, 64], "pooled_dim": 64}))
    shards = root / "shards"
    shards.mkdir()
    with tarfile.open(shards / "c-pc1-w0-000000.tar", "w") as tar:
        for i in range(2):
            buf = io.BytesIO()
            images[i].save(buf, format="PNG")
            info = tarfile.TarInfo(f"img{i}.png")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    for i in range(4):
        images[i].save(root / f"q{i}.png")
    build_vault(pairs, root / "vault", shards=shards)
    return root


# a synthetic vault shared by the build / query / index tests (built once per session)
DIM = 48


@pytest.fixture(scope="session")
def pairs_dir(tmp_path_factory):
    return write_synthetic_pairs(tmp_path_factory.mktemp("pairs"), 4000, 400, DIM, n_clusters=12, parts=2)


@pytest.fixture(scope="session")
def vault_dir(pairs_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("v") / "vault"
    build_vault(pairs_dir, out, index="HNSW32")
    return out


@pytest.fixture(scope="session")
def pairs(pairs_dir):
    with Pairs(pairs_dir) as p:
        yield p


def _queries(pairs, n=100, seed=1):
    rng = np.random.default_rng(seed)
    x = pairs.embed[rng.choice(len(pairs), n, replace=False)].astype(np.float32)
    return x + rng.standard_normal(x.shape).astype(np.float32) * 0.05
