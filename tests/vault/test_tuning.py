"""Search tuning on vectors held out of the index: honest recall, a latency budget, unmet targets said."""
from __future__ import annotations

import json
import logging

import faiss
import numpy as np
import pytest

from extraction.synthetic import write_synthetic_pairs
from vault import index as vindex
from vault.build import build_vault


@pytest.fixture
def one_thread():
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # a deterministic HNSW graph
    yield
    faiss.omp_set_num_threads(threads)


def test_held_out_tuning_needs_a_larger_ef_than_stored_vectors(one_thread):
    # unclustered 64-d vectors: a new query's neighbours are far from it, a stored vector's are
    # its own graph links, so stored-vector tuning overestimates recall at a given efSearch
    x = np.random.default_rng(0).standard_normal((3000, 64)).astype(np.float32)
    index, held = vindex.build_tuned(x, "HNSW8", target=0.99, budget_ms=None, n_queries=300)
    stored = vindex.tune_search(vindex.build_index(x, "HNSW8"), x, "HNSW8", target=0.99, n_queries=300)
    assert held.method == "held-out" and held.queries == 300 and held.met and held.recall >= 0.99
    assert stored.method == "stored+noise" and stored.met
    ef = lambda t: int(t.params.split("=")[1])  # noqa: E731
    assert ef(held) > ef(stored)
    # the held-out vectors were added afterwards: every row is in the index under its own id
    assert index.ntotal == len(x)
    q = vindex.normalize(x[::97])
    faiss.ParameterSpace().set_index_parameters(index, "efSearch=512")
    _, ids = index.search(q, 1)
    assert ids[:, 0].tolist() == list(range(0, len(x), 97))


def test_held_out_ivf_keeps_row_ids_and_recall_is_on_unseen_vectors():
    x = np.random.default_rng(1).standard_normal((4000, 32)).astype(np.float32)
    index, t = vindex.build_tuned(x, "IVF32,Flat", target=0.95, budget_ms=None, n_queries=200)
    assert t.method == "held-out" and t.params.startswith("nprobe=") and t.met and t.recall >= 0.95
    assert index.ntotal == len(x)
    faiss.ParameterSpace().set_index_parameters(index, "nprobe=32")
    _, ids = index.search(vindex.normalize(x[:50]), 1)
    assert ids[:, 0].tolist() == list(range(50))


def test_unreachable_target_warns_and_is_recorded(tmp_path, caplog):
    pairs = write_synthetic_pairs(tmp_path / "pairs", 3000, 300, 32, n_clusters=6)
    with caplog.at_level(logging.WARNING, logger="vault.build"):
        # no setting answers a query within a nanosecond: the target cannot be met
        m = build_vault(pairs, tmp_path / "v", index="HNSW16", tune_recall=0.999, tune_latency_ms=1e-6,
                        tune_queries=200)
    manifest = json.loads((tmp_path / "v" / "manifest.json").read_text())
    t = manifest["tuning"]
    assert t["met"] is False and t["target"] == 0.999 and t["budget_ms"] == 1e-6 and t["method"] == "held-out"
    assert t["latency_ms"] > 1e-6 and 0.0 < t["recall"] == manifest["tuned_recall"]
    assert m.search_params == t["params"] == "efSearch=16"  # over budget at once: the cheapest setting
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "not met" in r.getMessage()]
    assert any("global index HNSW16" in w and "0.999" in w and f"{t['recall']:.4f}" in w for w in warned)
    assert all(not c["tuning"]["met"] for c in manifest["categories"].values())
    assert len(warned) == 1 + len(manifest["categories"])


def test_reachable_target_is_met_without_a_warning(tmp_path, caplog):
    pairs = write_synthetic_pairs(tmp_path / "pairs", 3000, 300, 32, n_clusters=6)
    with caplog.at_level(logging.WARNING, logger="vault.build"):
        m = build_vault(pairs, tmp_path / "v", index="HNSW16", categories=False, tune_recall=0.9,
                        tune_latency_ms=None)
    assert m.tuning["met"] and m.tuning["recall"] >= 0.9 and m.tuning["latency_ms"] is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_tuning_settings_are_checked(tmp_path):
    pairs = write_synthetic_pairs(tmp_path / "pairs", 200, 20, 8)
    with pytest.raises(ValueError, match="tune_recall=1.5"):
        build_vault(pairs, tmp_path / "v", tune_recall=1.5)
    with pytest.raises(ValueError, match="tune_latency_ms=0"):
        build_vault(pairs, tmp_path / "v", tune_latency_ms=0)


def test_cli_build_says_when_the_target_is_not_met(tmp_path, capsys, caplog):
    from vault.cli import main

    pairs = write_synthetic_pairs(tmp_path / "p", 2000, 200, 16)
    assert main(["build", f"pairs={pairs}", f"out={tmp_path / 'v'}", "index=HNSW16", "categories=false",
                 "tune_recall=0.999", "tune_latency_ms=0.000001", "tune_queries=100"]) == 0
    out = capsys.readouterr().out
    assert "held-out queries, TARGET 0.999 NOT MET" in out
    assert any("not met within the latency budget" in r.getMessage() for r in caplog.records)
    assert main(["build", f"pairs={pairs}", f"out={tmp_path / 'v2'}", "index=HNSW16", "categories=false",
                 "tune_recall=0.5"]) == 0
    assert "NOT MET" not in capsys.readouterr().out


@pytest.mark.parametrize("spec", ["HNSW8", "IVF32,Flat"])
def test_an_add_re_tunes_on_held_out_new_vectors(one_thread, spec):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4000, 32)).astype(np.float32)
    index, first = vindex.build_tuned(x[:1000], spec, target=0.98, budget_ms=None, n_queries=100)
    index, t = vindex.add_tuned(index, x[1000:], spec, target=0.98, budget_ms=None, n_queries=300)
    assert (t.held_rows >= 1000).all() and t.method == "held-out" and t.queries == 300 and t.met and t.recall >= 0.98
    assert index.ntotal == len(x)
    if spec.startswith("IVF"):  # the direct map made to read the stored vectors is not kept
        assert faiss.extract_index_ivf(index).direct_map.type == faiss.DirectMap.NoMap
    # the recorded recall holds for new queries at the re-tuned setting
    q = vindex.normalize(rng.standard_normal((300, 32)).astype(np.float32))
    _, truth = vindex.exact_search(x, q, 10)
    vindex.apply_search_params(index, t.params)
    assert vindex.recall_at(index.search(q, 10)[1], truth) >= t.recall - 0.03
    # every row, old or new, is in the index under its own row number
    vindex.apply_search_params(index, "efSearch=512" if spec.startswith("HNSW") else "nprobe=32")
    _, ids = index.search(vindex.normalize(x[::97]), 1)
    assert ids[:, 0].tolist() == list(range(0, len(x), 97))


def test_manifest_tuning_follows_adds_or_says_it_is_stale(tmp_path, caplog):
    src = tmp_path / "pairs"
    write_synthetic_pairs(src, 2000, 200, 32, seed=0)
    build_vault(src, tmp_path / "v", index="HNSW16", categories=False, tune_recall=0.95, tune_latency_ms=None)
    for n, seed in ((2000, 1), (100, 2)):
        more = write_synthetic_pairs(tmp_path / f"more{seed}", n, n // 10, 32, seed=seed)
        (more / "part-00000.h5").rename(src / f"part-0000{seed}.h5")
    m = build_vault(sorted(src.glob("*.h5"))[:2], tmp_path / "v", tune_recall=0.95, tune_latency_ms=None)
    assert m.count == 4000 and m.tuning["method"] == "held-out" and m.tuning["queries"] == 200
    assert "stale" not in m.tuning and m.tuned_recall == m.tuning["recall"] and m.search_params == m.tuning["params"]
    # 100 new rows hold out only 10 < 20: the add tunes on 410 held out of the whole vault instead
    m = build_vault(src, tmp_path / "v", tune_recall=0.95, tune_latency_ms=None)
    assert m.count == 4100 and "stale" not in m.tuning and m.tuning["queries"] == 410
    assert m.tuned_recall == m.tuning["recall"] and m.search_params == m.tuning["params"]
    # a vault too small to hold out 20 queries keeps its old tuning, marked stale, and says why
    small = write_synthetic_pairs(tmp_path / "small", 100, 10, 32, seed=3)
    build_vault(small, tmp_path / "s", index="HNSW16", categories=False)
    (write_synthetic_pairs(tmp_path / "more4", 50, 5, 32, seed=4) / "part-00000.h5").rename(small / "part-00004.h5")
    with caplog.at_level(logging.WARNING, logger="vault.build"):
        m = build_vault(small, tmp_path / "s")
    assert m.count == 150 and m.tuning["stale"] is True and m.tuning["method"] == "stored+noise"
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["tuning"]["stale"] is True
    assert any("150 vectors are too few to hold out 20 tuning queries" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("spec", ["IVF64,Flat", "IVF64,PQ8"])
def test_ivf_is_trained_without_the_held_out_queries(one_thread, spec):
    rng = np.random.default_rng(3)
    data = rng.standard_normal((10_000, 32)).astype(np.float32)
    x, fresh = data[:8000], vindex.normalize(data[8000:])
    index, t = vindex.build_tuned(x, spec, target=0.95, budget_ms=None, n_queries=800)
    assert t.method == "held-out" and len(t.held_rows) == t.queries == 800
    # 100 points per cluster from the 7,200 rows left: the quantizer (and PQ codebooks) never saw a query
    assert len(t.train_rows) == 6400 and not np.isin(t.held_rows, t.train_rows).any()
    assert "held_rows" not in t.as_dict() and "train_rows" not in t.as_dict()
    if spec.endswith("Flat"):  # the recorded recall is what new vectors get at the tuned nprobe
        _, truth = vindex.exact_search(x, fresh, 10)
        vindex.apply_search_params(index, t.params)
        assert abs(vindex.recall_at(index.search(fresh, 10)[1], truth) - t.recall) <= 0.01


@pytest.mark.parametrize("spec", ["HNSW8", "IVF64,Flat"])
def test_a_small_add_re_tunes_on_the_whole_vault(one_thread, tmp_path, spec):
    from extraction.pairs import Pairs
    from extraction.synthetic import synthetic_queries

    src = tmp_path / "pairs"
    write_synthetic_pairs(src, 4000, 400, 32, seed=0, noise=1.0)  # wide prompts: recall below 1 at low settings
    build_vault(src, tmp_path / "v", index=spec, categories=False, tune_recall=0.97, tune_latency_ms=None)
    # one small campaign: 50 new rows are too few to hold out 20 queries from them alone
    more = write_synthetic_pairs(tmp_path / "more", 50, 5, 32, seed=1, noise=1.0)
    (more / "part-00000.h5").rename(src / "part-00001.h5")
    m = build_vault(src, tmp_path / "v", tune_recall=0.97, tune_latency_ms=None)
    assert m.count == 4050 and "stale" not in m.tuning
    assert m.tuning["method"] == "held-out" and m.tuning["queries"] == 405 and m.search_params == m.tuning["params"]
    # the recorded recall is what new images get from the vault's index at its recorded setting
    x = np.concatenate([Pairs(p).embed for p in m.sources]).astype(np.float32)
    q, _ = synthetic_queries(2000, 400, 32, seed=0, noise=1.0, query_seed=7)
    _, truth = vindex.exact_search(x, q, 10)
    index = vindex.read_index(tmp_path / "v" / m.files["global"])
    assert index.ntotal == len(x)
    vindex.apply_search_params(index, m.search_params)
    assert abs(vindex.recall_at(index.search(vindex.normalize(q), 10)[1], truth) - m.tuned_recall) <= 0.01
    # rows keep their numbers through the rebuild: each finds itself
    vindex.apply_search_params(index, "efSearch=512" if spec.startswith("HNSW") else "nprobe=64")
    _, ids = index.search(vindex.normalize(x[::41]), 1)
    assert ids[:, 0].tolist() == list(range(0, len(x), 41))


def test_a_small_add_keeps_lossy_or_large_indices_stale_rather_than_rebuilding(one_thread, tmp_path, caplog, monkeypatch):
    """The whole-vault re-tune rebuilds the index: never over re-quantised PQ codes (each add would lose
    more), nor past WHOLE_RETUNE_MAX vectors (minutes for a 50-row add); the warning says which."""
    import logging

    assert vindex.whole_retune_ok("HNSW32", 4050) and vindex.whole_retune_ok("IVF64,Flat", 4050)
    assert not vindex.whole_retune_ok("IVF64,PQ8", 4050) and not vindex.whole_retune_ok("PCA16,HNSW32", 4050)
    assert not vindex.whole_retune_ok("HNSW32", vindex.WHOLE_RETUNE_MAX + 1)
    src = tmp_path / "pairs"
    write_synthetic_pairs(src, 4000, 400, 32, seed=0, noise=1.0)
    build_vault(src, tmp_path / "v", index="HNSW8", categories=False, tune_recall=0.97, tune_latency_ms=None)
    monkeypatch.setattr(vindex, "WHOLE_RETUNE_MAX", 4000)  # this vault stands for a big one
    more = write_synthetic_pairs(tmp_path / "more", 50, 5, 32, seed=1, noise=1.0)
    (more / "part-00000.h5").rename(src / "part-00001.h5")
    with caplog.at_level(logging.WARNING, logger="vault.build"):
        m = build_vault(src, tmp_path / "v", tune_recall=0.97, tune_latency_ms=None)
    assert m.count == 4050 and m.tuning.get("stale") is True
    assert "more than 4000" in caplog.text and "rebuild=true" in caplog.text


def test_ivf_with_nearly_as_many_clusters_as_vectors_still_builds_tuned():
    """nlist between the rows outside the held-out slice and all rows: trained on all rows, as build_index does."""
    x = np.random.default_rng(0).standard_normal((1100, 16)).astype(np.float32)
    index, tuning = vindex.build_tuned(x, "IVF1024,Flat", target=0.9, budget_ms=None, n_queries=110)
    assert index.ntotal == 1100 and tuning.queries == 110
