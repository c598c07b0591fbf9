"""Conditioning sources: text rows, vault and projector rows blended with text, vision-model checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lsd_runtime.conditioning import (ProjectorSource, TextSource, VaultSource, VisionModelMismatch,
                                      open_projector)

TINY_VISION = "open_clip:luna-tiny-vit"


@pytest.fixture(scope="module")
def text(comps):
    return TextSource(comps.encoders, "blue eyes, gold ring")


@pytest.fixture(scope="module")
def crops():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)) for _ in range(3)]


def _vault(tmp_path_factory, vision_model, te_fingerprint=None):
    from extraction.synthetic import write_synthetic_pairs
    from vault.build import build_vault
    from vault.query import Vault

    pairs = write_synthetic_pairs(tmp_path_factory.mktemp("pairs"), 120, 30, 32, text_dims=(32, 64), pooled_dim=64,
                                  vision_model=vision_model, te_fingerprint=te_fingerprint)
    out = tmp_path_factory.mktemp("v") / "vault"
    build_vault(pairs, out, index="Flat", categories=False)
    return Vault.open(out, use_gpu=False)


@pytest.fixture(scope="module")
def vault(tmp_path_factory, comps):
    """Conditionings of the tiny base checkpoint's own text encoders (what retrieval.family=same keeps)."""
    return _vault(tmp_path_factory, TINY_VISION, comps.te_fingerprint)


def test_text_rows_are_the_checkpoint_encoding_and_negative_is_zeros(comps, text, crops):
    from luna.models.sdxl import encode_prompt

    rows = text.rows(crops)
    cond, pooled, _, _ = encode_prompt(comps.encoders, ["blue eyes, gold ring"])
    assert len(rows) == 3 and all(r.source == "text" and r.strength == 0.0 for r in rows)
    assert torch.equal(rows[1].cond, cond[0]) and torch.equal(rows[1].pooled, pooled[0])
    assert tuple(rows[0].cond.shape) == (77, comps.sampler.cross_attention_dim)
    neg, neg_pooled = text.negative_row
    assert not neg.any() and not neg_pooled.any()  # force_zeros_for_empty_prompt
    worded = TextSource(comps.encoders, "x", "blurry")
    assert worded.negative_row[0].abs().sum() > 0


def test_vault_rows_blend_text_with_neighbours_and_keep_the_evidence(vault, text, embedder, crops):
    src = VaultSource(vault, text, embedder, k=4, weight=0.25)
    rows = src.rows(crops)
    res = vault.query(embedder(crops).numpy(), k=4)
    for i, r in enumerate(rows):
        assert r.source == "vault" and r.strength == 0.25
        torch.testing.assert_close(r.cond, 0.75 * text.cond + 0.25 * res.cond[i].float())
        torch.testing.assert_close(r.pooled, 0.75 * text.pooled + 0.25 * res.pooled[i].float())
        assert [n["key"] for n in r.neighbours] == [n["key"] for n in res.neighbours[i]]
        js = r.to_json()
        assert len(js["neighbours"]) == 4 and all(n["prompt"] and "score" in n for n in js["neighbours"])
    concat = VaultSource(vault, text, embedder, k=4, blend="concat").rows(crops[:1])[0]
    assert concat.cond.shape[0] == 154 and torch.equal(concat.cond[:77], text.cond)


def test_vault_of_another_vision_model_is_a_clear_error(tmp_path_factory, text, embedder):
    other = _vault(tmp_path_factory, "open_clip:ViT-H-14")
    with pytest.raises(VisionModelMismatch, match="ViT-H-14"):
        VaultSource(other, text, embedder)


def _projector(folder, vision_model):
    from projector.export import Projector, save_projector

    dims = {"input": "embed", "in_dim": 32, "vision_dim": 32, "vision_model": vision_model, "cond_dim": 96,
            "text_dims": [32, 64], "pooled_dim": 64, "seq_len": 77, "num_tokens": None}
    proj = Projector({"net": {"_target_": "projector.models.RidgeProjector"}, "pooled_head": None}, dims)
    with torch.no_grad():
        proj.net.weight.normal_(0, 0.1)
    return save_projector(proj, folder)


def test_projector_rows_follow_the_exported_projector(tmp_path, text, embedder, crops):
    folder = _projector(tmp_path / "proj", TINY_VISION)
    proj = open_projector(folder, embedder)
    rows = ProjectorSource(proj, text, embedder, weight=0.5).rows(crops)
    with torch.no_grad():
        cond, pooled = proj(embedder(crops))
    for i, r in enumerate(rows):
        assert r.source == "projector" and r.strength == 0.5
        torch.testing.assert_close(r.cond, 0.5 * text.cond + 0.5 * cond[i])
        torch.testing.assert_close(r.pooled, 0.5 * text.pooled + 0.5 * pooled[i])
    assert not torch.allclose(rows[0].cond, rows[1].cond)  # one row per crop, not one for all


def test_projector_of_another_vision_model_is_a_clear_error(tmp_path, text, embedder):
    folder = _projector(tmp_path / "proj", "open_clip:ViT-bigG-14")
    proj = open_projector(folder, embedder)  # same width: only the model id tells them apart
    with pytest.raises(VisionModelMismatch, match="ViT-bigG-14"):
        ProjectorSource(proj, text, embedder)


@pytest.fixture(scope="module")
def mixed_vault(tmp_path_factory, comps):
    """A vault of two text-encoder families: this checkpoint's and another's, the same images twice."""
    from extraction.synthetic import write_synthetic_pairs
    from vault.build import build_vault
    from vault.query import Vault

    parts = [write_synthetic_pairs(tmp_path_factory.mktemp(f"pairs_{fp[:4]}"), 120, 30, 32, text_dims=(32, 64),
                                   pooled_dim=64, vision_model=TINY_VISION, te_fingerprint=fp, seed=0)
             for fp in (comps.te_fingerprint, "0" * 24)]
    out = tmp_path_factory.mktemp("mixed") / "vault"
    build_vault(parts, out, index="Flat", categories=False)
    return Vault.open(out, use_gpu=False)


def test_refine_keeps_only_neighbours_of_its_own_text_encoders(mixed_vault, comps, text, embedder, crops):
    fp = comps.te_fingerprint
    unfiltered = mixed_vault.query(embedder(crops).numpy(), k=6)
    assert {n["te_fingerprint"] for row in unfiltered.neighbours for n in row} == {fp, "0" * 24}  # the hazard
    same = VaultSource(mixed_vault, text, embedder, k=6, te_fingerprint=fp)  # family="same" is the default
    rows = same.rows(crops)
    assert all(n["te_fingerprint"] == fp for r in rows for n in r.neighbours) and len(rows[0].neighbours) == 6
    assert same.describe()["warning"] is None
    anyf = VaultSource(mixed_vault, text, embedder, k=6, family="any", te_fingerprint=fp)
    assert {n["te_fingerprint"] for r in anyf.rows(crops) for n in r.neighbours} == {fp, "0" * 24}
    assert "retrieval.family=any" in anyf.describe()["warning"]


def test_family_names_filter_the_vault(mixed_vault, comps, text, embedder, crops):
    from vault.query import VaultError

    # the shipped families.yaml names the tiny base encoders "base"
    res = mixed_vault.query(embedder(crops).numpy(), k=6, filters={"family": "base"})
    assert {n["te_fingerprint"] for row in res.neighbours for n in row} == {comps.te_fingerprint}
    with pytest.raises(VaultError, match="filters.family='pony'"):
        mixed_vault.query(embedder(crops).numpy(), k=6, filters={"family": "pony"})
    named = VaultSource(mixed_vault, text, embedder, k=6, family="base")
    assert all(n["te_fingerprint"] == comps.te_fingerprint for r in named.rows(crops) for n in r.neighbours)


def test_vault_without_this_checkpoints_encoders_is_a_clear_error(tmp_path_factory, text, embedder):
    from lsd_runtime.conditioning import ConditioningError

    other = _vault(tmp_path_factory, TINY_VISION, "1" * 24)
    with pytest.raises(ConditioningError, match="retrieval.family=any"):
        VaultSource(other, text, embedder)  # the fingerprint comes from the text source's encoders
