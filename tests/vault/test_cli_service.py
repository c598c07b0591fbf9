"""`luna vault` command line (JSON contract, contact sheet, errors) and the Ray service."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from extraction.pairs import PairsPart, write_part
from extraction.synthetic import synthetic_encode, write_synthetic_pairs
from vault.build import build_vault
from vault.cli import main
from vault.manifest import VaultError
from vault.query import Vault
from vault.service import VaultClient, VaultServer, open_vault, serve, stop


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


def test_query_json_prints_one_object_and_writes_a_contact_sheet(image_vault, capsys):
    root = image_vault
    rc = main(["query", f"vault={root / 'vault'}", f"image={root / 'q0.png'}", "k=3", "format=json",
               f"sheet={root / 'sheet0.png'}"])
    out = capsys.readouterr().out
    assert rc == 0
    result = json.loads(out)  # the whole stdout is one JSON object
    assert list(result) == ["neighbours"] and len(result["neighbours"]) == 3
    first = result["neighbours"][0]
    assert set(first) == {"key", "prompt", "score", "category", "checkpoint"}
    assert first["key"] == "img0" and first["prompt"] == "real image 0" and first["score"] > 0.99
    sheet = Image.open(root / "sheet0.png")
    assert sheet.width > 3 * sheet.height  # query + 3 tiles in a row


def test_query_text_table_and_sheet_without_shard_image(image_vault, capsys):
    root = image_vault
    assert main(["query", f"vault={root / 'vault'}", f"image={root / 'q3.png'}", "k=2", "category=faces",
                 "filters.checkpoint=ckpt_a"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0].split()[:3] == ["#", "score", "key"] and lines[1].split()[2] == "img3"
    assert (root / "q3_vault.png").is_file() and "images found in the shards" in captured.err


def test_cli_build_and_errors(tmp_path, capsys):
    pairs = write_synthetic_pairs(tmp_path / "p", 100, 10, 8)
    assert main(["build", f"pairs={pairs}", f"out={tmp_path / 'v'}", "index=Flat", "mode=prompts"]) == 0
    assert "100 images" in capsys.readouterr().out and Vault.open(tmp_path / "v").mode == "prompts"
    assert main(["query", f"vault={tmp_path / 'nope'}", f"image={tmp_path / 'x.png'}"]) == 2
    assert main(["build", f"pairs={tmp_path / 'empty'}", f"out={tmp_path / 'v2'}"]) == 2
    assert "error" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2


def test_server_body_embeds_with_the_vaults_tower(image_vault, tower):
    server = VaultServer(str(image_vault / "vault"))
    assert server.vision_error is None
    found = server.search(server.embed_images([_image(1)]), k=1)
    assert found.neighbours[0][0]["key"] == "img1"


def test_service_equals_in_process(ray_cluster, tmp_path):
    pairs = write_synthetic_pairs(tmp_path / "p", 1500, 150, 16, parts=2)
    build_vault(pairs, tmp_path / "v", index="HNSW16")
    build_vault(pairs, tmp_path / "vp", index="HNSW16", mode="prompts")
    local, local_p = Vault.open(tmp_path / "v"), Vault.open(tmp_path / "vp")
    q = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    try:
        serve(tmp_path / "v", name="test-vault", num_cpus=0, load_vision=False)
        serve(tmp_path / "vp", name="test-vault-p", num_cpus=0, load_vision=False)
        client = open_vault("ray:test-vault")
        assert isinstance(client, VaultClient) and len(client) == 1500
        for kw in ({}, {"category": "auto", "weighting": "softmax"}, {"filters": {"checkpoint": "ckpt_b"}}):
            a, b = client.query(q, k=6, **kw), local.query(q, k=6, **kw)
            assert a.neighbours == b.neighbours
            # same rows and weights; only the summation order of threaded matmuls may differ
            np.testing.assert_allclose(a.cond.numpy(), b.cond.numpy(), rtol=0, atol=1e-6)
            np.testing.assert_allclose(a.pooled.numpy(), b.pooled.numpy(), rtol=0, atol=1e-6)
        a = VaultClient("test-vault-p").query(q, k=4, encode=synthetic_encode)
        b = local_p.query(q, k=4, encode=synthetic_encode)
        assert a.neighbours == b.neighbours and np.allclose(a.cond.numpy(), b.cond.numpy())
        with pytest.raises(VaultError, match="dim 16"):
            client.query(np.zeros((1, 5), np.float32), k=3)
        with pytest.raises(VaultError, match="already running"):
            serve(tmp_path / "v", name="test-vault", num_cpus=0, load_vision=False)
    finally:
        stop("test-vault")
        stop("test-vault-p")
    with pytest.raises(VaultError, match="no vault service"):
        VaultClient("test-vault-gone")
