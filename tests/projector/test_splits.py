"""The interpolation split: attribute combinations held out while each attribute is trained on alone."""
from __future__ import annotations

import numpy as np
import pytest

from projector.splits import COMBO, CombinationSplitError, has_term, held_out_prompts, split_keys


def test_terms_match_whole_words_and_phrases():
    assert has_term("Neon city, BLUE  eyes", "blue eyes") and has_term("neon-lit", "neon")
    assert not has_term("neonate", "neon") and not has_term("blue eyeshadow", "blue eyes")


def test_prompts_with_both_terms_are_held_out_and_each_term_stays_alone():
    texts = ["neon street, blue eyes", "neon street, green eyes", "rainy street, blue eyes", "neon, blue eyes, rain",
             "blue eyes"]
    held = held_out_prompts(texts, [["neon", "blue eyes"]])
    assert held.tolist() == [True, False, False, True, False]
    train = [t for t, h in zip(texts, held) if not h]
    assert any(has_term(t, "neon") and not has_term(t, "blue eyes") for t in train)
    assert any(has_term(t, "blue eyes") and not has_term(t, "neon") for t in train)


def test_a_term_never_seen_alone_is_a_clear_error():
    with pytest.raises(CombinationSplitError, match="'neon'"):
        held_out_prompts(["neon, blue eyes", "blue eyes"], [["neon", "blue eyes"]])
    with pytest.raises(CombinationSplitError, match="no prompt contains"):
        held_out_prompts(["neon", "blue eyes"], [["neon", "blue eyes"]])
    with pytest.raises(CombinationSplitError, match="not a combination"):
        held_out_prompts(["neon"], [["neon"]])


def test_datamodule_reports_the_combination_split_separately(tiny_pairs):
    from projector.data import PairsDataModule

    dm = PairsDataModule(str(tiny_pairs), batch_size=8, val_prompts=0.25, val_checkpoints=1,
                         val_combinations=[["blue", "hair"]])
    dm.setup()
    p = dm.pairs
    text = lambda rows: [p.prompt_text[i] for i in p.prompt_id[rows]]
    combo = dm.splits[COMBO]
    assert len(combo) and all(has_term(t, "blue") and has_term(t, "hair") for t in text(combo))
    for name in ("train", "val", "val_ckpt"):
        assert not any(has_term(t, "blue") and has_term(t, "hair") for t in text(dm.splits[name]))
        assert not set(dm.splits[name]) & set(combo)
    train = text(dm.splits["train"])
    assert any(has_term(t, "blue") for t in train) and any(has_term(t, "hair") for t in train)
    assert dm.val_names == ["val", "val_ckpt", COMBO] and len(dm.val_dataloader()) == 3
    assert COMBO in dm.knn and np.isfinite(dm.knn[COMBO])
    keys = split_keys(tiny_pairs, COMBO, combinations=[["blue", "hair"]], val_prompts=0.25, val_checkpoints=1)
    assert sorted(keys) == sorted(p.key[i] for i in combo)


def test_a_term_seen_alone_only_in_validation_prompts_is_a_clear_error():
    """Validation prompts are never trained on: a term must appear alone in the training split."""
    from projector.splits import with_combinations

    texts = ["neon city", "blue eyes portrait", "neon girl with blue eyes", "red car", "green tree", "old house"]
    of = lambda rows: [texts[r] for r in rows]  # noqa: E731
    combos = [["neon", "blue eyes"]]
    leaky = {"train": np.array([1, 2, 3, 4]), "val": np.array([0, 5]), "val_ckpt": np.array([], dtype=np.int64)}
    with pytest.raises(CombinationSplitError, match=r"'neon' \(of \['neon', 'blue eyes'\]\)"):
        with_combinations(leaky, of, combos)
    with pytest.raises(CombinationSplitError, match="'neon'"):
        held_out_prompts(texts, combos, training=[texts[i] for i in (1, 2, 3)])
    fine = {"train": np.array([0, 1, 2, 3]), "val": np.array([4, 5]), "val_ckpt": np.array([], dtype=np.int64)}
    out = with_combinations(fine, of, combos)
    assert out[COMBO].tolist() == [2] and out["train"].tolist() == [0, 1, 3]


def _two_family_pairs(folder):
    """Prompts 0..19 under text encoders fpA, 10..29 under fpB (10..19 under both), one image each."""
    from extraction.pairs import PairsPart, write_part

    rng = np.random.default_rng(0)
    texts = [f"prompt number {i}" for i in range(30)]
    rows = [(t, "fpA") for t in texts[:20]] + [(t, "fpB") for t in texts[10:]]
    n = len(rows)
    images = {"key": np.array([f"k{i}" for i in range(n)], dtype=object), "embed": rng.standard_normal((n, 8)),
              "prompt_id": np.arange(n), "checkpoint": np.array(["ck" + r[1][-1] for r in rows], dtype=object),
              "category": np.array(["c"] * n, dtype=object), "campaign": np.array(["x"] * n, dtype=object),
              "seed": np.arange(n)}
    prompts = {"text": np.array([r[0] for r in rows], dtype=object),
               "te_fingerprint": np.array([r[1] for r in rows], dtype=object),
               "cond": rng.standard_normal((n, 77, 8)), "pooled": rng.standard_normal((n, 4))}
    write_part(folder / "p.h5", PairsPart(images, prompts, {"vision_model": "v", "vision_dim": 8, "text_dims": [4, 4],
                                                            "pooled_dim": 4}))
    return folder


def test_split_keys_splits_one_fingerprint_as_the_datamodule_does(tmp_path):
    """data.te_fingerprint changes every split (fewer prompts to draw from): split_keys must be given it."""
    from projector.data import PairsDataModule

    pairs = _two_family_pairs(tmp_path)
    dm = PairsDataModule(str(pairs), batch_size=4, val_prompts=0.2, val_checkpoints=0, te_fingerprint="fpA",
                         knn_max_queries=4)
    dm.setup()
    for name in ("train", "val"):
        keys = split_keys(pairs, name, val_prompts=0.2, val_checkpoints=0, te_fingerprint="fpA")
        assert keys == [dm.pairs.key[i] for i in dm.splits[name]], name
    trained = {dm.pairs.key[i] for i in dm.splits["train"]}
    assert not trained & set(split_keys(pairs, "val", val_prompts=0.2, val_checkpoints=0, te_fingerprint="fpA"))
    assert trained & set(split_keys(pairs, "val", val_prompts=0.2, val_checkpoints=0))  # what `luna ab` sampled
    with pytest.raises(ValueError, match=r"p.*'fpC'.*\['fpA', 'fpB'\]"):
        split_keys(pairs, "val", te_fingerprint="fpC")


def test_luna_ab_takes_the_fingerprint_the_projector_recorded(tmp_path):
    import json

    from lsd_runtime.arms import ABError, crops_te_fingerprint

    proj = tmp_path / "proj"
    proj.mkdir()
    assert crops_te_fingerprint({"projector": str(proj), "crops": {"te_fingerprint": "fpB"}}) == "fpB"  # none recorded
    (proj / "projector.json").write_text(json.dumps({"trained": {"data": {"te_fingerprint": "fpA", "val_prompts": 0.2}}}))
    assert crops_te_fingerprint({"projector": str(proj), "crops": {"te_fingerprint": None}}) == "fpA"
    assert crops_te_fingerprint({"projector": str(proj / "projector.safetensors"), "crops": {}}) == "fpA"
    with pytest.raises(ABError, match="crops.te_fingerprint='fpB'.*data.te_fingerprint='fpA'"):
        crops_te_fingerprint({"projector": str(proj), "crops": {"te_fingerprint": "fpB"}})
    (proj / "projector.json").write_text(json.dumps({"trained": {"data": {"te_fingerprint": None}}}))
    assert crops_te_fingerprint({"projector": str(proj), "crops": {}}) is None
    assert crops_te_fingerprint({"crops": {"te_fingerprint": "fpA"}}) == "fpA"  # no projector: as configured
