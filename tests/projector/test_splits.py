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
