"""vault.query: own embedding first, weighted conditionings, filters, category routing, bad input."""
from __future__ import annotations

import numpy as np
import pytest

from extraction.synthetic import synthetic_encode, write_synthetic_pairs
from tests.vault.conftest import DIM, _queries
from vault.build import add_pairs, build_vault
from vault.index import exact_search, recall_at
from vault.manifest import VaultError
from vault.query import Vault


def test_own_embedding_returns_the_item_first(vault_dir, pairs):
    vault = Vault.open(vault_dir)
    rows = np.arange(0, len(pairs), 397)
    res = vault.query(pairs.embed[rows], k=3)
    assert [nb[0]["key"] for nb in res.neighbours] == [pairs.key[r] for r in rows]
    assert all(nb[0]["score"] == pytest.approx(1.0, abs=1e-2) for nb in res.neighbours)


def test_stored_conditioning_is_the_neighbours_weighted_mean(vault_dir, pairs):
    vault = Vault.open(vault_dir)
    res = vault.query(pairs.embed[:2], k=4, weighting="softmax", temperature=0.1)
    assert res.cond.shape == (2, 77, 96) and res.pooled.shape == (2, 64)
    for r, nbs in enumerate(res.neighbours):
        cond, pooled = synthetic_encode([n["prompt"] for n in nbs])
        w = np.array([n["weight"] for n in nbs])
        assert w.sum() == pytest.approx(1.0, abs=1e-5) and w[0] >= w[-1]
        np.testing.assert_allclose(res.cond[r].numpy(), np.tensordot(w, cond, 1), atol=2e-3)
        np.testing.assert_allclose(res.pooled[r].numpy(), w @ pooled, atol=2e-3)


def test_filters_return_only_matching_items(vault_dir, pairs):
    vault = Vault.open(vault_dir)
    q = _queries(pairs, 20)
    res = vault.query(q, k=8, filters={"checkpoint": "ckpt_a", "campaign": ["camp_2"]})
    assert all(len(nb) == 8 for nb in res.neighbours)
    assert all(n["checkpoint"] == "ckpt_a" and n["campaign"] == "camp_2" for nb in res.neighbours for n in nb)
    # filtered results are the best matching items: compare with exact search over the subset
    subset = np.flatnonzero((np.array(pairs.checkpoint) == "ckpt_a") & (np.array(pairs.campaign) == "camp_2"))
    _, truth = exact_search(pairs.embed[subset].astype(np.float32), q, 8)
    found = np.array([[int(n["key"]) for n in nb] for nb in res.neighbours])
    assert recall_at(found, subset[truth]) >= 0.9
    res = vault.query(q[:2], k=5, filters={"category": "hands", "te_fingerprint": "synthetic-te-0"})
    assert {n["category"] for nb in res.neighbours for n in nb} == {"hands"}
    with pytest.raises(VaultError, match="no vault item matches"):
        vault.query(q[:1], k=5, filters={"checkpoint": "nope"})
    with pytest.raises(VaultError, match="unknown key"):
        vault.query(q[:1], k=5, filters={"colour": "red"})


def test_category_routing_and_explicit_category(vault_dir, pairs):
    vault = Vault.open(vault_dir)
    rows = np.arange(0, 600, 7)
    res = vault.query(pairs.embed[rows], k=5, category="auto")
    routed = [nb[0]["category"] for nb in res.neighbours]
    assert np.mean([c == pairs.category[r] for c, r in zip(routed, rows)]) >= 0.95
    assert all(len({n["category"] for n in nb}) == 1 for nb in res.neighbours)
    res = vault.query(pairs.embed[rows[:3]], k=4, category="faces")
    assert {n["category"] for nb in res.neighbours for n in nb} == {"faces"}
    with pytest.raises(VaultError, match="categories"):
        vault.query(pairs.embed[:1], k=4, category="feet")


def test_bad_input_is_a_clear_error(vault_dir, pairs, tmp_path):
    vault = Vault.open(vault_dir)
    with pytest.raises(VaultError, match=f"dim {DIM}"):
        vault.query(np.zeros((1, DIM + 1), np.float32), k=3)
    with pytest.raises(VaultError, match="vision model"):
        vault.query(pairs.embed[:1], k=3, model="ViT-H-14")
    n_faces = int(np.sum(np.array(pairs.category) == "faces"))
    with pytest.warns(UserWarning, match="larger than"):
        res = vault.query(pairs.embed[:1], k=n_faces + 10, category="faces")
    assert len(res.neighbours[0]) == n_faces and res.cond.shape[0] == 1
    with pytest.warns(UserWarning, match="larger than"):
        res = vault.query(pairs.embed[:1], k=len(pairs) + 5)
    assert len(res.neighbours[0]) == len(pairs)
    # other model's pairs cannot join
    other = write_synthetic_pairs(tmp_path / "other", 50, 5, DIM, vision_model="ViT-L-14")
    with pytest.raises(VaultError, match="ViT-L-14"):
        add_pairs(vault_dir, other)
    # empty pairs
    (tmp_path / "empty").mkdir()
    with pytest.raises(VaultError, match="empty vault"):
        build_vault(tmp_path / "empty", tmp_path / "ev")
