"""Hybrid conditioning (vault + projector) and per-category routing on the tiny preset."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lsd_runtime.categories import (CategoryRouter, CategorySettings, CategorySettingsError, CategoryTable,
                                    memory_source)
from lsd_runtime.conditioning import ProjectorSource, TextSource, VaultSource, open_projector
from lsd_runtime.hybrid import HybridSettings, HybridSource, gate, mix, vault_share

TINY_VISION = "open_clip:luna-tiny-vit"


@pytest.fixture(scope="module")
def text(comps):
    return TextSource(comps.encoders, "a portrait")


@pytest.fixture(scope="module")
def crops():
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(6)]


@pytest.fixture(scope="module")
def vault(tmp_path_factory):
    from extraction.synthetic import write_synthetic_pairs
    from vault.build import build_vault
    from vault.query import Vault

    pairs = write_synthetic_pairs(tmp_path_factory.mktemp("pairs"), 150, 30, 32, text_dims=(32, 64), pooled_dim=64,
                                  vision_model=TINY_VISION)
    out = tmp_path_factory.mktemp("v") / "vault"
    build_vault(pairs, out, index="Flat", categories=True)
    return Vault.open(out, use_gpu=False)


@pytest.fixture(scope="module")
def projector(tmp_path_factory, embedder):
    from projector.export import Projector, save_projector

    dims = {"input": "embed", "in_dim": 32, "vision_dim": 32, "vision_model": TINY_VISION, "cond_dim": 96,
            "text_dims": [32, 64], "pooled_dim": 64, "seq_len": 77, "num_tokens": None}
    proj = Projector({"net": {"_target_": "projector.models.RidgeProjector"}, "pooled_head": None}, dims)
    with torch.no_grad():
        proj.net.weight.normal_(0, 0.1)
    folder = save_projector(proj, tmp_path_factory.mktemp("proj"))
    return open_projector(folder, embedder)


def test_gate_is_one_exactly_at_and_above_tau():
    s = np.array([0.2, 0.7999, 0.8, 0.8001, 1.0, -np.inf])
    np.testing.assert_array_equal(gate(s[:-1], 0.8), [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(vault_share(s, HybridSettings("gate", 0.8)), [0, 0, 1, 1, 1, 0])


def test_mix_is_a_monotone_soft_gate_centred_on_tau():
    s = np.linspace(-1, 1, 41)
    w = mix(s, 0.3, 0.05)
    assert np.all(np.diff(w) >= 0) and w[0] < 1e-6 and w[-1] > 1 - 1e-6
    assert mix(np.array([0.3]), 0.3, 0.05)[0] == pytest.approx(0.5)
    assert mix(np.array([0.5]), 0.3, 10.0)[0] == pytest.approx(0.5, abs=0.01)  # wide: a fixed half mix


def test_bad_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="hybrid.policy='nearest'"):
        HybridSettings("nearest").check()


def test_hybrid_gate_picks_the_vault_exactly_when_top_similarity_reaches_tau(vault, projector, text, embedder, crops):
    vs = VaultSource(vault, text, embedder, k=3, weight=0.6, family="any")
    ps = ProjectorSource(projector, text, embedder, weight=0.6)
    top = np.array([r.neighbours[0]["score"] for r in vs.rows(crops)])
    tau = float(np.sort(top)[len(top) // 2])  # some crops on each side, one exactly at tau
    rows = HybridSource(vs, ps, settings=HybridSettings("gate", tau), weight=0.6).rows(crops)
    v_rows, p_rows = vs.rows(crops), ps.rows(crops)
    chosen = [r.extra["hybrid"]["chosen"] for r in rows]
    assert chosen == ["vault" if t >= tau else "projector" for t in top]
    assert 0 < chosen.count("vault") < len(crops)
    for r, v, p, t in zip(rows, v_rows, p_rows, top):
        want = v if t >= tau else p
        torch.testing.assert_close(r.cond, want.cond)
        torch.testing.assert_close(r.pooled, want.pooled)
        assert r.source == "hybrid" and r.to_json()["hybrid"]["top_similarity"] == pytest.approx(t, abs=1e-5)


def test_hybrid_mix_lies_between_vault_and_projector(vault, projector, text, embedder, crops):
    vs = VaultSource(vault, text, embedder, k=3, weight=1.0, family="any")
    ps = ProjectorSource(projector, text, embedder, weight=1.0)
    rows = HybridSource(vs, ps, settings=HybridSettings("mix", 0.5, 0.2), weight=1.0).rows(crops)
    for r, v, p in zip(rows, vs.rows(crops), ps.rows(crops)):
        w = r.extra["hybrid"]["vault_share"]
        assert 0 < w < 1
        torch.testing.assert_close(r.cond, w * v.cond + (1 - w) * p.cond, rtol=1e-4, atol=1e-5)


def test_face_detection_is_routed_to_the_faces_category(vault, text, embedder, crops):
    from lsd_runtime.detect import Detection

    ret = {"category": "route", "k": 4, "weight": 0.5, "per_category": {"hands": {"k": 2, "weight": 0.9}}}
    source = memory_source(ret, text, embedder, vault=vault, family="any")
    assert isinstance(source, CategoryRouter)
    dets = [Detection(box=(0, 0, 1, 1), label="face"), Detection(box=(0, 0, 1, 1), label="hand"),
            Detection(box=(0, 0, 1, 1), label="eyes")]
    rows = source.rows_for(crops[:3], dets)
    assert {n["category"] for n in rows[0].neighbours} == {"faces"} and len(rows[0].neighbours) == 4
    assert {n["category"] for n in rows[1].neighbours} == {"hands"} and len(rows[1].neighbours) == 2
    assert rows[1].strength == 0.9 and rows[0].strength == 0.5
    assert {n["category"] for n in rows[2].neighbours} == {"eyes"}  # a label that names a category
    assert rows[0].to_json()["route"] == {"label": "face", "category": "faces", "weight": 0.5, "k": 4,
                                          "weighting": "mean", "temperature": 0.05}


def test_settings_file_round_trips_and_unknown_category_is_named(tmp_path, vault, text, embedder):
    table = CategoryTable(routes={"face": "faces"}, default=CategorySettings(0.4, 6),
                          categories={"faces": CategorySettings(0.7, 3, "softmax", 0.1)}, tuned={"metric": "x"})
    path = table.write(tmp_path / "category_settings.json")
    again = CategoryTable.read(tmp_path)
    assert again.to_json() == table.to_json() == json.loads(path.read_text())
    src = memory_source({"settings": str(path)}, text, embedder, vault=vault, family="any")
    assert src.table.settings_for("faces").temperature == 0.1
    bad = CategoryTable(routes={"face": "portraits"})
    bad.write(tmp_path / "bad.json")
    with pytest.raises(CategorySettingsError, match="portraits"):
        memory_source({"settings": str(tmp_path / "bad.json")}, text, embedder, vault=vault, family="any")
    with pytest.raises(CategorySettingsError, match="unknown key"):
        CategoryTable.from_json({"format_version": 1, "default": {"strength": 1}})


def test_refine_config_with_vault_and_projector_builds_the_hybrid(vault, projector, comps, tmp_path):
    """`luna refine vault=V projector=P` no longer refuses the pair: its source is the hybrid (routed on request)."""
    from lsd_runtime.cli import build_conditioning
    from luna.cli import compose
    from luna.settings import plain

    values = {"vault": str(vault.folder), "projector": str(tmp_path / "p"), "hybrid": {"policy": "mix", "tau": 0.3}}
    from projector.export import save_projector

    save_projector(projector, tmp_path / "p")
    c = plain(compose("refine", ["preset=tiny", "retrieval.family=any"], values=values))
    src = build_conditioning(c, comps, "a face", None)
    assert isinstance(src, HybridSource) and src.settings == HybridSettings("mix", 0.3, 0.05)
    c = plain(compose("refine", ["preset=tiny", "retrieval.category=route", "retrieval.family=any"], values=values))
    src = build_conditioning(c, comps, "a face", None)
    assert isinstance(src, CategoryRouter) and src.name == "hybrid"
    assert isinstance(src.source_for("faces"), HybridSource)


def test_per_category_alone_turns_routing_on(vault, text, embedder, crops):
    """retrieval.per_category without retrieval.category routes by label, as documented (never ignored)."""
    from lsd_runtime.detect import Detection

    ret = {"k": 4, "weight": 0.5, "per_category": {"hands": {"k": 2, "weight": 0.9}}}
    source = memory_source(ret, text, embedder, vault=vault, family="any")
    assert isinstance(source, CategoryRouter)
    rows = source.rows_for(crops[:2], [Detection(box=(0, 0, 1, 1), label="face"),
                                       Detection(box=(0, 0, 1, 1), label="hand")])
    assert {n["category"] for n in rows[1].neighbours} == {"hands"} and len(rows[1].neighbours) == 2
    assert rows[1].strength == 0.9 and rows[0].strength == 0.5 and len(rows[0].neighbours) == 4


def test_fixed_category_takes_its_per_category_entry_and_refuses_the_others(vault, text, embedder, crops):
    ret = {"category": "hands", "k": 4, "weight": 0.5, "per_category": {"hands": {"k": 2, "weight": 0.9}}}
    source = memory_source(ret, text, embedder, vault=vault, family="any")
    assert isinstance(source, VaultSource) and (source.category, source.k, source.weight) == ("hands", 2, 0.9)
    rows = source.rows(crops[:1])
    assert {n["category"] for n in rows[0].neighbours} == {"hands"} and len(rows[0].neighbours) == 2
    with pytest.raises(CategorySettingsError, match=r"retrieval.per_category: \['faces'\] never apply"):
        memory_source({**ret, "per_category": {"faces": {"k": 2}}}, text, embedder, vault=vault, family="any")
    with pytest.raises(CategorySettingsError, match="retrieval.category='auto'"):
        memory_source({**ret, "category": "auto"}, text, embedder, vault=vault, family="any")
    with pytest.raises(CategorySettingsError, match="retrieval.category='feet'"):
        memory_source({"category": "feet"}, text, embedder, vault=vault, family="any")


@pytest.mark.parametrize("ret", [{"category": "route"}, {"per_category": {"hands": {"k": 2}}},
                                 {"category": "route", "routes": {"person": "faces"}}])
def test_routed_sources_are_built_and_checked_before_any_crop(vault, projector, text, embedder, ret):
    """A setting some category's source refuses is an error from memory_source, not at the first crop."""
    from lsd_runtime.conditioning import ConditioningError

    src = memory_source(ret, text, embedder, vault=vault, family="any")
    known = vault.info()["categories"]
    assert set(src._sources) >= {*src.table.routes.values(), *src.table.categories, "auto"}
    assert set(src.table.routes.values()) <= set(known)
    with pytest.raises(ConditioningError, match="no conditionings of this checkpoint's text encoders"):
        memory_source(ret, text, embedder, vault=vault, family="same", te_fingerprint="not-this-vaults")
    with pytest.raises(ConditioningError, match="hybrid.policy='nearest'"):
        memory_source(ret, text, embedder, vault=vault, projector=projector, hybrid={"policy": "nearest"},
                      family="any")
    with pytest.raises(CategorySettingsError, match="retrieval.per_category.faces"):
        memory_source({**ret, "per_category": {"faces": {"weight": 2.0}}}, text, embedder, vault=vault, family="any")


def test_routed_and_hybrid_sources_describe_the_retrieval_and_its_warning(vault, projector, text, embedder):
    """record.json's `retrieval` (cli.run) comes from describe(): routed and hybrid sources have one too."""
    held = vault.info()["te_fingerprints"]
    ret = {"category": "route", "per_category": {"faces": {"k": 3}}}
    d = memory_source(ret, text, embedder, vault=vault, family="any", te_fingerprint="mine").describe()
    assert d["family"] == "any" and "retrieval.family=any" in d["warning"] and str(held[0]) in d["warning"]
    assert d["routed"] and d["routes"]["face"] == "faces" and d["categories"]["faces"]["k"] == 3
    assert d["sources"]["faces"]["warning"] and "auto" in d["sources"]
    json.dumps(d)  # goes into record.json as it is
    h = memory_source({"k": 5}, text, embedder, vault=vault, projector=projector, hybrid={"policy": "mix", "tau": 0.3},
                      family="any", te_fingerprint="mine").describe()
    assert isinstance(h, dict) and h["hybrid"] == {"policy": "mix", "tau": 0.3, "softness": 0.05}
    assert "retrieval.family=any" in h["warning"] and h["parts"]["vault"]["k"] == 5
    assert h["parts"]["projector"]["vision_model"] == TINY_VISION
    routed = memory_source(ret, text, embedder, vault=vault, projector=projector, family="any",
                           te_fingerprint="mine").describe()
    assert routed["source"] == "hybrid" and routed["sources"]["faces"]["hybrid"]["policy"] == "gate"
    json.dumps(h), json.dumps(routed)


def test_projector_alone_says_once_that_it_ignores_category_settings(projector, text, embedder, caplog):
    """The projector has no categories: routing / per-category settings given with it alone are named in one
    warning (sources are built per batch and prompt), not silently dropped."""
    import lsd_runtime.categories as categories

    categories._WARNED.clear()
    ret = {"category": "route", "per_category": {"faces": {"weight": 0.9}}, "weight": 0.4}
    with caplog.at_level("WARNING", logger="lsd_runtime.categories"):
        for _ in range(3):
            src = categories.memory_source(ret, text, embedder, projector=projector)
    assert isinstance(src, ProjectorSource) and src.weight == pytest.approx(0.4)
    warned = [r.getMessage() for r in caplog.records if "projector alone" in r.getMessage()]
    assert len(warned) == 1 and "per_category" in warned[0] and "category" in warned[0]
