"""vault.build: persistence readable by stock FAISS, incremental add, prompts mode, broken files."""
from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pytest
import torch

from extraction.pairs import Pairs
from extraction.synthetic import synthetic_encode, write_synthetic_pairs
from tests.vault.conftest import DIM, _queries
from vault.build import add_pairs, build_vault, drop_conditionings
from vault.manifest import FORMAT_VERSION, Manifest, VaultError
from vault.query import Vault


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


def test_adding_to_a_vault_checks_and_uses_the_build_settings(tmp_path):
    src = tmp_path / "pairs"
    write_synthetic_pairs(src, 300, 30, 16, categories=("eyes",), seed=0)
    build_vault(src, tmp_path / "v", tune_recall=0.5, tune_latency_ms=None)
    more = write_synthetic_pairs(tmp_path / "more", 300, 30, 16, categories=("hands",), seed=1)
    (more / "part-00000.h5").rename(src / "part-00001.h5")
    with pytest.raises(ValueError, match=r"tune_recall=5\.0"):
        build_vault(src, tmp_path / "v", tune_recall=5.0)
    for key, value, has in (("mode", "prompts", "'stored'"), ("index", "HNSW32", "'Flat'"), ("categories", False, "True")):
        with pytest.raises(ValueError, match=rf"{key}={value!r}: .*existing vault with {key}={has}"):
            build_vault(src, tmp_path / "v", **{key: value})
    assert Manifest.read(tmp_path / "v").count == 300  # refused adds change nothing
    m = build_vault(src, tmp_path / "v", mode="stored", index="Flat", categories=True,
                    tune_recall=0.6, tune_latency_ms=None)
    assert m.count == 600 and m.generation == 2
    assert m.categories["hands"]["tuning"]["target"] == 0.6 and m.categories["hands"]["tuning"]["budget_ms"] is None


def test_mismatch_errors_name_the_quantity_at_fault(tmp_path):
    from vault.store import read_prompts, write_prompts

    write_synthetic_pairs(tmp_path / "a", 200, 20, 8, seed=0)
    build_vault(tmp_path / "a", tmp_path / "v", categories=False)
    other = write_synthetic_pairs(tmp_path / "b", 200, 20, 8, seed=1, pooled_dim=32)
    with pytest.raises(VaultError, match=r"part-00000\.h5: pooled dim 32 differs from the vault's 64"):
        build_vault(other, tmp_path / "v")
    m = Manifest.read(tmp_path / "v")
    text, fps = read_prompts(tmp_path / "v" / m.files["prompts"])
    write_prompts(tmp_path / "v" / m.files["prompts"], text[:-1], fps[:-1])
    with pytest.raises(VaultError, match=r"prompts\.g1\.h5: prompt table \(19 prompts\) disagrees with manifest\.json "
                                         r"num_prompts \(20\)"):
        Vault.open(tmp_path / "v")


def test_an_add_that_would_exceed_the_memory_budget_is_refused(tmp_path):
    from vault import index as vindex

    src = tmp_path / "pairs"
    budget = 4_000_000  # HNSW32: 4 * n * (32 + 2 * 32) bytes, 3,840,000 for 10,000 x 32, 4,608,000 for 12,000
    write_synthetic_pairs(src, 10_000, 1000, 32, seed=0)
    m = build_vault(src, tmp_path / "v", memory_budget=budget, categories=False, tune_queries=200)
    assert m.index_spec == "HNSW32" and m.memory_budget == budget
    before = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "v").rglob("*") if f.is_file()}
    (write_synthetic_pairs(tmp_path / "more", 2000, 200, 32, seed=1) / "part-00000.h5").rename(src / "part-00001.h5")
    with pytest.raises(VaultError, match=r"memory_budget=4000000: global index HNSW32 over 12000 x 32 vectors would "
                                         r"take about 4,608,000 bytes .* rebuild=true memory_budget=4000000"):
        build_vault(src, tmp_path / "v")
    # nothing was written: the vault is as it was
    assert {f.name: f.stat().st_mtime_ns for f in (tmp_path / "v").rglob("*") if f.is_file()} == before
    assert Manifest.read(tmp_path / "v").count == 10_000
    # the rebuild the error names chooses an index within the budget, as a build of 12,000 does
    m = build_vault(src, tmp_path / "v", memory_budget=budget, categories=False, tune_queries=200, rebuild=True)
    assert m.count == 12_000 and m.index_spec == vindex.choose_index_spec(12_000, 32, budget) == "HNSW25"
    assert vindex.index_bytes("HNSW32", 10_000, 32) == 3_840_000 and vindex.index_bytes("HNSW25", 12_000, 32) <= budget


def test_an_add_within_the_budget_or_to_a_hand_chosen_index_goes_ahead(tmp_path):
    src = tmp_path / "pairs"
    write_synthetic_pairs(src, 10_000, 1000, 32, seed=0)
    (write_synthetic_pairs(tmp_path / "more", 2000, 200, 32, seed=1) / "part-00000.h5").rename(tmp_path / "p1.h5")
    # index= chosen by hand is over the budget from the build on (the budget only picks the index type)
    build_vault(src, tmp_path / "v", index="HNSW32", memory_budget=1_000_000, categories=False, tune_queries=200)
    assert build_vault(tmp_path / "p1.h5", tmp_path / "v").count == 12_000
    build_vault(src, tmp_path / "w", memory_budget="5M", categories=False, tune_queries=200)
    assert build_vault(tmp_path / "p1.h5", tmp_path / "w").count == 12_000
