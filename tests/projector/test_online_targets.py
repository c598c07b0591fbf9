"""Online targets (`data.conditionings=online`): the conditioning of each batch's prompts computed by
the checkpoints' frozen text encoders equals what extraction stored, and trains the same projector."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tests.extraction.conftest import extract_cfg, write_text_encoder_checkpoint
from tests.extraction.extraction_shards import shard_metas, write_shard

from projector.cli import main
from projector.data import PairsDataError, PairsDataModule

# 13 prompts over 2 checkpoints: every prompt is drawn with both text-encoder families
PROMPTS = ["blue eyes, close-up", "a gold ring on a hand", "silk dress, red", "green eyes", "freckles", "red hair",
           "a silver necklace", "denim jacket", "brown eyes, smiling", "a hand holding a cup", "straw hat",
           "wool scarf, striped", "glasses on a nose"]
COMMON = dict(batch_size=8, val_prompts=0.25, val_checkpoints=1, num_workers=0, stats_prompts=64, knn_max_queries=16)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """Two tiny checkpoints of different text-encoder families, two shards of 13 samples, extracted
    the ordinary way (conditionings stored in float16, the default)."""
    from extraction.extract import extract
    from luna.models.fingerprint import te_fingerprint

    root = tmp_path_factory.mktemp("online_te")
    ckpts = []
    for i, family in enumerate(("base", "pony")):
        path = write_text_encoder_checkpoint(root / f"tiny-{family}-{i}", family)
        ckpts.append({"name": path.name, "fingerprint": f"fp-{path.name}", "te_fingerprint": te_fingerprint(path),
                      "dir": root})
    shards = tmp_path_factory.mktemp("online_shards")
    for s in range(2):
        write_shard(shards, f"faces-pc1-w0-{s:06d}", shard_metas(ckpts, 13, offset=13 * s, prompts=PROMPTS), seed=s)
    out = tmp_path_factory.mktemp("online_pairs")
    extract(extract_cfg(shards, out, ckpts, "workers=0"))
    return out, root


def test_online_targets_equal_the_stored_ones(extracted):
    pairs, te_dir = extracted
    stored = PairsDataModule(str(pairs), in_memory=True, **COMMON)
    online = PairsDataModule(str(pairs), conditionings="online", text_encoders=str(te_dir), text_device="cpu", **COMMON)
    stored.setup()
    online.setup()
    assert online.pairs.num_prompts == 26 and len(set(online.pairs.te_fingerprint)) == 2
    for name in ("train", "val", "val_ckpt"):
        np.testing.assert_array_equal(stored.splits[name], online.splits[name])
    # every row: the same values to within float16 rounding (both are float16 here)
    pid = online.pairs.prompt_id
    cond, pooled = online.source.online(pid)
    assert cond.dtype == torch.float16 and cond.shape == (len(pid), 77, sum(online.pairs.text_dims))
    want_c, want_p = stored.pairs.cond(pid), stored.pairs.pooled(pid)
    np.testing.assert_allclose(cond.float().numpy(), want_c.astype(np.float32), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(pooled.float().numpy(), want_p.astype(np.float32), rtol=2e-3, atol=2e-3)
    # each fingerprint's encoders loaded once; prompts met again come from the cache
    text = online.source.online.conditioner
    assert sorted(text.loads.values()) == [1, 1]
    encoded = text.prompts_encoded
    online.source.online(pid)
    assert text.prompts_encoded == encoded
    # through the loaders: batches carry no conditioning until they are on the training device
    for a, b in zip(stored.val_dataloader()[0], online.val_dataloader()[0]):
        assert "cond" not in b and torch.equal(a["prompt"], b["prompt"])
        b = online.on_after_batch_transfer(b, 0)
        np.testing.assert_allclose(b["cond"].float().numpy(), a["cond"].float().numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(b["pooled"].float().numpy(), a["pooled"].float().numpy(), rtol=2e-3, atol=2e-3)
    # a loader worker reads image rows only (it gets no encoders) and tokenizes the batch's prompts with
    # each fingerprint's tokenizers; the main process encodes those ids (no cache: every prompt encoded)
    online.num_workers = 1
    online.source.online._cache.clear()
    encoded = text.prompts_encoded
    seen = []
    for b in online.train_dataloader():
        assert "cond" not in b and b["input_ids"].shape == b["input_ids_2"].shape == (len(b["prompt"]), 77)
        b = online.on_after_batch_transfer(b, 0)
        np.testing.assert_allclose(b["cond"].float().numpy(), stored.pairs.cond(b["prompt"].numpy()).astype(np.float32),
                                   rtol=2e-3, atol=2e-3)
        seen += b["prompt"].tolist()
    assert len(seen) == len(online.splits["train"])
    assert text.prompts_encoded - encoded == len(np.unique(online.pairs.prompt_id[online.splits["train"]]))
    for k in stored.stats:
        np.testing.assert_allclose(online.stats[k], stored.stats[k], rtol=1e-2, atol=1e-3, err_msg=k)
    assert online.knn == pytest.approx(stored.knn, abs=1e-3)


def test_online_targets_need_the_encoders_of_every_fingerprint(extracted, tmp_path, monkeypatch):
    pairs, te_dir = extracted
    # no path: where the factory recorded the checkpoints, in an inventory cache that records none
    # (the session's own cache holds whatever other tests scanned)
    monkeypatch.setenv("LUNA_CACHE_DIR", str(tmp_path / "empty-cache"))
    with pytest.raises(PairsDataError, match="no recorded location for checkpoint 'tiny-"):
        PairsDataModule(str(pairs), conditionings="online", text_device="cpu", **COMMON).setup()
    one = te_dir / "tiny-base-0"  # a diffusers folder with one of the two families
    with pytest.raises(PairsDataError, match="text-encoder fingerprint"):
        PairsDataModule(str(pairs), conditionings="online", text_encoders=str(one), text_device="cpu", **COMMON).setup()
    with pytest.raises(PairsDataError, match="conditionings must be"):
        PairsDataModule(str(pairs), conditionings="disk", **COMMON)


def test_a_projector_trains_on_online_targets_like_on_stored_ones(extracted, tmp_path, fast, small_queries):
    """`luna train data.conditionings=online`: two epochs, the same metrics as the stored run (same seed,
    same batches, targets equal to within float16 rounding)."""
    pairs, te_dir = extracted
    metrics = {}
    for mode in ("stored", "online"):
        out = tmp_path / mode
        extra = [f"data.text_encoders={te_dir}", "data.text_device=cpu"] if mode == "online" else []
        code = main([f"pairs={pairs}", f"out={out}", "logger=none", "trainer.max_epochs=2", "data.val_prompts=0.25",
                     f"data.conditionings={mode}", *extra, *fast, *small_queries])
        assert code == 0, mode
        meta = json.loads((out / "projector.json").read_text())
        assert meta["trained"]["global_step"] > 0
        metrics[mode] = meta["metrics"]
    assert metrics["online"].keys() == metrics["stored"].keys() and "val/cos_content" in metrics["online"]
    for k, v in metrics["stored"].items():
        assert np.isfinite(metrics["online"][k]) and metrics["online"][k] == pytest.approx(v, abs=1e-3), k


def test_online_loader_gathers_stored_token_ids_and_never_tokenizes(extracted, tmp_path, monkeypatch):
    """Every prompt is tokenized once, at the first setup, into the pairs folder's token-ids store; later
    setups read it; the loaders (0 and 1 workers) and the targets gather ids by prompt id, equal to
    what `tokenize` gives, with the tokenizers out of reach."""
    import shutil

    from extraction.pairs import TOKEN_IDS_DIR
    from luna.models import sdxl

    src, te_dir = extracted
    pairs = tmp_path / "pairs"
    shutil.copytree(src, pairs, ignore=shutil.ignore_patterns(TOKEN_IDS_DIR))
    first = PairsDataModule(str(pairs), conditionings="online", text_encoders=str(te_dir), text_device="cpu", **COMMON)
    first.setup()
    online = first.source.online
    # 26 prompts: 13 texts under 2 fingerprints whose checkpoints share SDXL's tokenizers: 13 tokenized
    assert online.tokenized == len(set(first.pairs.prompt_text)) == 13
    digests = {sdxl.tokenizers_fingerprint(t) for t in online.tokenizers.values()}
    assert sorted(p.name for p in (pairs / TOKEN_IDS_DIR).iterdir()) == sorted(digests)
    toks = next(iter(online.tokenizers.values()))
    want = [t.numpy() for t in sdxl.tokenize(toks, first.pairs.prompt_text)]
    np.testing.assert_array_equal(online.ids[0], want[0])
    np.testing.assert_array_equal(online.ids[1], want[1])
    assert online.ids[0].dtype == np.uint16

    def no_tokenizer(*a, **k):
        raise AssertionError("tokenized after setup")

    second = PairsDataModule(str(pairs), conditionings="online", text_encoders=str(te_dir), text_device="cpu", **COMMON)
    monkeypatch.setattr(sdxl, "tokenize", no_tokenizer)  # forked loader workers inherit it too
    second.setup()
    assert second.source.online.tokenized == 0
    np.testing.assert_array_equal(second.source.online.ids[0], want[0])
    for workers in (0, 1):
        second.num_workers = workers
        second.source.online._cache.clear()
        for b in second.train_dataloader():
            pid = b["prompt"].numpy()
            assert b["input_ids"].dtype == torch.int64
            np.testing.assert_array_equal(b["input_ids"].numpy(), want[0][pid])
            np.testing.assert_array_equal(b["input_ids_2"].numpy(), want[1][pid])
            b = second.on_after_batch_transfer(b, 0)
            np.testing.assert_allclose(b["cond"].float().numpy(), first.pairs.cond(pid).astype(np.float32),
                                       rtol=2e-3, atol=2e-3)
    second.teardown()
    first.teardown()
