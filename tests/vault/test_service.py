"""The vault service: the server body and a Ray actor that answers as the in-process vault does."""
from __future__ import annotations

import numpy as np
import pytest

from extraction.synthetic import synthetic_encode, write_synthetic_pairs
from tests.vault.conftest import _image
from vault.build import build_vault
from vault.manifest import VaultError
from vault.query import Vault
from vault.service import VaultClient, VaultServer, open_vault, serve, stop


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
