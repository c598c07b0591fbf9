"""Vault build/query: recall, filters, routing, persistence, incremental add, modes, bad input."""
from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pytest
import torch

from extraction.pairs import Pairs
from extraction.synthetic import synthetic_encode, write_synthetic_pairs
from vault.blend import blend_concat, blend_linear, neighbour_weights
from vault.build import add_pairs, build_vault, drop_conditionings
from vault.index import choose_index_spec, exact_search, recall_at
from vault.manifest import FORMAT_VERSION, VaultError
from vault.query import Vault

DIM = 48


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    return write_synthetic_pairs(tmp_path_factory.mktemp("pairs"), 4000, 400, DIM, n_clusters=12, parts=2)


@pytest.fixture(scope="module")
def vault_dir(pairs_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("v") / "vault"
    build_vault(pairs_dir, out, index="HNSW32")
    return out


@pytest.fixture(scope="module")
def pairs(pairs_dir):
    with Pairs(pairs_dir) as p:
        yield p


def _queries(pairs, n=100, seed=1):
    rng = np.random.default_rng(seed)
    x = pairs.embed[rng.choice(len(pairs), n, replace=False)].astype(np.float32)
    return x + rng.standard_normal(x.shape).astype(np.float32) * 0.05


@pytest.mark.parametrize("spec", ["HNSW32", "IVF64,Flat"])
def test_recall_at_10_against_exact_search(pairs, pairs_dir, tmp_path, spec):
    vault = Vault.open(build_vault(pairs_dir, tmp_path / "v", index=spec, categories=False) and tmp_path / "v")
    q = _queries(pairs)
    _, truth = exact_search(pairs.embed.astype(np.float32), q, 10)
    found = vault.search(q, k=10)
    ids = np.array([[int(n["key"]) for n in nb] for nb in found.neighbours])  # synthetic keys are row numbers
    assert recall_at(ids, truth) >= 0.95


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


def test_persistence_round_trip_with_stock_faiss(vault_dir, pairs):
    manifest = json.loads((vault_dir / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["vision_dim"] == DIM
    assert manifest["count"] == len(pairs) and manifest["mode"] == "stored"
    index = faiss.read_index(str(vault_dir / manifest["files"]["global"]))
    assert index.ntotal == len(pairs) and index.d == DIM
    q = pairs.embed[:5].astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    _, ids = index.search(q, 1)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]
    for info in manifest["categories"].values():
        assert faiss.read_index(str(vault_dir / info["file"])).ntotal == info["count"]
    a = Vault.open(vault_dir).query(q, k=5)
    b = Vault.open(vault_dir).query(q, k=5)
    assert a.neighbours == b.neighbours and bool((a.cond == b.cond).all())


def test_incremental_add_of_new_parts(tmp_path):
    src = tmp_path / "pairs"
    write_synthetic_pairs(src, 600, 60, 16, parts=1, seed=3)
    build_vault(src, tmp_path / "v", index="HNSW16")
    first = Vault.open(tmp_path / "v")
    # a second, later part: other seed (other prompts), same model; written under a new name
    more = write_synthetic_pairs(tmp_path / "more", 300, 30, 16, parts=1, seed=4)
    (more / "part-00000.h5").rename(src / "part-00001.h5")
    m = build_vault(src, tmp_path / "v")  # existing vault: adds only the new part
    assert m.count == 900 and m.num_prompts == 90 and m.generation == 2 and len(m.cond_files) == 2
    assert m.index_spec == first.manifest.index_spec  # no rebuild
    vault = Vault.open(tmp_path / "v")
    new = Pairs(src / "part-00001.h5")
    res = vault.query(new.embed[:3], k=2)
    assert [nb[0]["key"] for nb in res.neighbours] == new.key[:3]
    cond, _ = synthetic_encode([new.prompt_text[new.prompt_id[0]]], seed=4)
    assert res.neighbours[0][0]["prompt"] == new.prompt_text[new.prompt_id[0]]
    np.testing.assert_allclose(vault.query(new.embed[:1], k=1).cond[0].numpy(), cond[0], atol=2e-3)
    assert add_pairs(tmp_path / "v", src).count == 900  # nothing new: unchanged
    assert sorted(p.name for p in (tmp_path / "v" / "index").iterdir()) == sorted(
        [m.files["global"].split("/")[1]] + [i["file"].split("/")[1] for i in m.categories.values()])


def test_prompts_mode_matches_stored_mode(pairs_dir, vault_dir, tmp_path, pairs):
    build_vault(pairs_dir, tmp_path / "p", index="HNSW32", mode="prompts")
    small, big = Vault.open(tmp_path / "p"), Vault.open(vault_dir)
    assert not list((tmp_path / "p").glob("cond-*"))
    q = _queries(pairs, 4)
    with pytest.raises(VaultError, match="encode="):
        small.query(q, k=3)
    a = small.query(q, k=3, encode=synthetic_encode)
    b = big.query(q, k=3)
    assert [[n["key"] for n in nb] for nb in a.neighbours] == [[n["key"] for n in nb] for nb in b.neighbours]
    np.testing.assert_allclose(a.cond.numpy(), b.cond.numpy(), atol=2e-3)
    size = lambda d: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())  # noqa: E731
    assert size(tmp_path / "p") < size(vault_dir)
    # a stored vault shrunk in place answers like the one built prompts-only
    shutil.copytree(vault_dir, tmp_path / "shrunk")
    assert drop_conditionings(tmp_path / "shrunk").mode == "prompts"
    assert not list((tmp_path / "shrunk").glob("cond-*"))
    c = Vault.open(tmp_path / "shrunk").query(q, k=3, encode=synthetic_encode)
    assert c.neighbours == a.neighbours and torch.equal(c.cond, a.cond)


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


def test_broken_vault_files_are_clear_errors(pairs_dir, tmp_path):
    out = tmp_path / "v"
    write_synthetic_pairs(tmp_path / "p", 200, 20, 8)
    build_vault(tmp_path / "p", out, categories=False)
    manifest = json.loads((out / "manifest.json").read_text())
    index_file = out / manifest["files"]["global"]
    index_file.write_bytes(index_file.read_bytes()[:50])
    with pytest.raises(VaultError, match="corrupted"):
        Vault.open(out)
    index_file.unlink()
    with pytest.raises(VaultError, match="missing"):
        Vault.open(out)
    (out / "manifest.json").write_text(json.dumps({**manifest, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(VaultError, match="newer"):
        Vault.open(out)
    with pytest.raises(VaultError, match="not a vault"):
        Vault.open(tmp_path / "p")


def test_index_choice_follows_size_and_memory():
    assert choose_index_spec(500, 1024, 2**32) == "Flat"
    assert choose_index_spec(5000, 1024, 2**32) == "HNSW15"
    assert choose_index_spec(200_000, 1024, 16 * 2**30) == "HNSW32"
    assert choose_index_spec(1_000_000, 1024, 4 * 2**30) == "HNSW24"
    assert choose_index_spec(200_000, 1024, 830_000_000) == "IVF2048,Flat"  # HNSW8 would not fit
    assert choose_index_spec(5_000_000, 1024, 16 * 2**30) == "OPQ256,IVF16384_HNSW32,PQ256x8"


def test_weights_and_blends():
    valid = np.array([[True, True, False]])
    w = neighbour_weights(np.array([[0.9, 0.8, 0.0]]), valid, "softmax", 0.05)
    assert w[0, 2] == 0 and w[0, 0] > w[0, 1] and w.sum() == pytest.approx(1)
    assert neighbour_weights(np.array([[0.9, 0.1, 0.0]]), valid, "mean").tolist() == [[0.5, 0.5, 0.0]]
    user, ret = np.ones((2, 77, 8), np.float32), np.zeros((1, 77, 8), np.float32)
    assert float(blend_linear(user, ret, 0.25).mean()) == pytest.approx(0.75)
    cond, pooled = blend_concat(user, ret, user_pooled="p")
    assert tuple(cond.shape) == (2, 154, 8) and pooled == "p" and float(cond[:, 77:].abs().sum()) == 0
