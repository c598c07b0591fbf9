"""`luna extract clip_l=true`: the SD 1.x-style CLIP-L target and pooled vector, from the same CLIP-L encoder."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from extraction.extract import extract
from extraction.pairs import Pairs
from tests.extraction.conftest import extract_cfg


def test_clip_l_target_is_clip_l_final_norm_output_and_pooled(shards_dir, tiny_checkpoints, tmp_path):
    from luna.models.sdxl import load_text_encoders

    out = tmp_path / "pairs"
    extract(extract_cfg(str(shards_dir / "faces-pc1-w0-000000.tar"), out, tiny_checkpoints, "clip_l=true",
                        "dtype=float32", "workers=0"))
    with Pairs(out) as p:
        assert p.has_clip_l
        ids = np.arange(p.num_prompts)
        target, pooled, cond = p.clip_l(ids), p.clip_l_pooled(ids), p.cond(ids)
        fp = p.te_fingerprint[0]
        texts = [p.prompt_text[i] for i in ids if p.te_fingerprint[i] == fp]
        rows = [i for i in ids if p.te_fingerprint[i] == fp]
    ckpt = next(c for c in tiny_checkpoints if c["te_fingerprint"] == fp)
    enc = load_text_encoders(ckpt["path"])
    ids_t = enc.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = enc.text_encoder(ids_t, output_hidden_states=True)
    width = enc.text_encoder.config.hidden_size
    assert target.shape == (len(ids), 77, width) and pooled.shape == (len(ids), width)
    np.testing.assert_allclose(target[rows], ref.last_hidden_state.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(pooled[rows], ref.pooler_output.numpy(), rtol=1e-4, atol=1e-4)
    # not the SDXL half: that is the penultimate layer without the final norm
    np.testing.assert_allclose(cond[rows][..., :width], ref.hidden_states[-2].numpy(), rtol=1e-4, atol=1e-4)
    assert not np.allclose(target[rows], cond[rows][..., :width], atol=1e-3)


def test_without_clip_l_the_datasets_are_absent_and_a_mixed_folder_is_named(shards_dir, tiny_checkpoints, tmp_path):
    from extraction.text import PromptStore
    from projector.targets import TargetsError, target_view

    out = tmp_path / "pairs"
    first = str(shards_dir / "faces-pc1-w0-000000.tar")
    extract(extract_cfg(first, out, tiny_checkpoints, "workers=0"))
    with Pairs(out) as p:
        assert not p.has_clip_l
    old = next(out.glob("*.h5"))
    with h5py.File(old, "r") as f:
        assert "clip_l_cond" not in f["prompts"]
    # a prompt stored without the CLIP-L columns cannot be reused by a clip_l run: the part is named
    store = PromptStore.from_parts([old])
    with Pairs(out) as p:
        known = (p.prompt_text[0], p.te_fingerprint[0])
    store.add([("new prompt", known[1])], np.zeros((1, 77, 4)), np.zeros((1, 4)),
              clip_l_cond=np.zeros((1, 77, 2)), clip_l_pooled=np.zeros((1, 2)))
    assert store.extras([("new prompt", known[1])])["clip_l_cond"].shape == (1, 77, 2)
    with pytest.raises(ValueError, match=old.name):
        store.extras([("new prompt", known[1]), known])
    store.close()
    # a folder with parts of both kinds cannot train a CLIP-L head: the parts without are named
    second = str(shards_dir / "faces-pc1-w0-000001.tar")
    extract(extract_cfg(second, out, tiny_checkpoints, "clip_l=true", "workers=0"))
    with Pairs(out) as p, pytest.raises(TargetsError, match=old.name):
        target_view(p, "clip_l")
