"""The pairs data module: splits, padding positions, statistics, RAM vs chunked reads, k-NN baseline."""
from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from projector.data import PairsDataError, PairsDataModule, content_lengths, split_images


@pytest.fixture(scope="module")
def dm(tiny_pairs):
    d = PairsDataModule(str(tiny_pairs), batch_size=8, val_prompts=0.25, val_checkpoints=1)
    d.setup()
    return d


def test_splits_hold_out_prompts_and_checkpoints(dm):
    p = dm.pairs
    text = lambda rows: {p.prompt_text[i] for i in p.prompt_id[rows]}
    ckpt = lambda rows: {p.checkpoint[i] for i in rows}
    train, val, val_ckpt = dm.splits["train"], dm.splits["val"], dm.splits["val_ckpt"]
    assert len(train) and len(val) and len(val_ckpt)
    assert not text(train) & text(val)  # validation prompts are never trained on
    assert not ckpt(train) & ckpt(val_ckpt) and len(ckpt(val_ckpt)) == 1
    assert text(val_ckpt) <= text(train)  # the checkpoint split asks: known prompts, unseen checkpoint
    assert dm.val_names == ["val", "val_ckpt"] and len(dm.val_dataloader()) == 2


def test_split_is_deterministic_and_by_text():
    texts = ["a", "a", "b", "b", "c", "c", "d", "d"]
    ckpts = ["x", "y"] * 4
    s1 = split_images(texts, ckpts, 0.5, 0, seed=1)
    s2 = split_images(texts, ckpts, 0.5, 0, seed=1)
    assert all(np.array_equal(np.sort(s1[k]), np.sort(s2[k])) for k in s1)
    held = {texts[i] for i in s1["val"]}
    assert len(held) == 2 and all(texts[i] not in held for i in s1["train"])


def test_padding_positions_follow_the_clip_token_count():
    n = content_lengths(["blue eyes", "a " * 200])
    assert n[0] == 4  # BOS + "blue" + "eyes" + EOS
    assert n[1] == 77  # truncated: no padding left


def test_statistics_standardise_each_channel_of_both_halves(dm):
    p, s = dm.pairs, dm.stats
    prompts = np.unique(p.prompt_id[dm.splits["train"]])
    cond = p.cond(prompts).astype(np.float32)
    body = (cond[:, 1:] - s["cond_mean"]) / s["cond_std"]
    flat = body.reshape(-1, body.shape[-1])
    assert np.allclose(flat.mean(0), 0, atol=1e-2) and np.allclose(flat.std(0), 1, atol=1e-2)
    # the synthetic bigG half is ~3x the CLIP-L half: each is scaled on its own
    assert s["cond_std"][16:].mean() > 2 * s["cond_std"][:16].mean()
    assert np.allclose(s["bos"], cond[:, 0].mean(0), atol=1e-3)  # BOS is constant: its mean is it


def test_in_memory_and_chunked_reads_give_the_same_batches(tiny_pairs, dm):
    chunked = PairsDataModule(str(tiny_pairs), batch_size=8, val_prompts=0.25, val_checkpoints=1, in_memory=False)
    chunked.setup()
    assert dm.source.in_memory and not chunked.source.in_memory
    rows = [0, 5, 3, 3]
    a = dm.val_dataloader()[0].dataset.__getitems__(rows)
    b = chunked.val_dataloader()[0].dataset.__getitems__(rows)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert a["x"].shape == (4, 32) and a["cond"].shape == (4, 77, 48) and a["pooled"].shape == (4, 16)


def test_token_input_and_dims(tiny_pairs):
    d = PairsDataModule(str(tiny_pairs), input="tokens", batch_size=4)
    d.setup()
    assert d.dims["input"] == "tokens" and d.dims["num_tokens"] == 5 and d.dims["in_dim"] == 16
    assert d.dims["vision_dim"] == 32 and d.dims["cond_dim"] == 48
    assert next(iter(d.train_dataloader()))["x"].shape == (4, 5, 16)


def test_knn_baseline_is_a_cosine_and_beats_a_random_neighbour(dm):
    assert set(dm.knn) == {"val", "val_ckpt"}
    assert -1 <= dm.knn["val"] <= 1
    assert dm.knn["val_ckpt"] > dm.knn["val"]  # same prompt under another checkpoint is in the training set


def test_too_few_prompts_is_a_clear_error(tmp_path):
    from projector.synthetic import write_closed_loop_pairs

    pairs = write_closed_loop_pairs(tmp_path / "p", n_prompts=1, checkpoints=("a",), dim=4, text_dims=(2, 2), pooled_dim=2)
    with pytest.raises(PairsDataError, match="more prompts"):
        PairsDataModule(str(pairs)).setup()


def test_chunk_shuffle_visits_every_row_once_and_is_deterministic():
    from projector.data import ChunkShuffleSampler

    key = np.random.default_rng(0).permutation(1003)  # storage position of each dataset row
    s = ChunkShuffleSampler(key, batch_size=64, chunk_rows=16, seed=7)
    epoch0 = list(s)
    assert len(epoch0) == len(s) == 16 and all(len(b) == 64 for b in epoch0[:-1]) and len(epoch0[-1]) == 43
    flat = np.concatenate(epoch0)
    assert np.array_equal(np.sort(flat), np.arange(1003))  # every row exactly once
    assert list(ChunkShuffleSampler(key, 64, 16, seed=7)) == epoch0  # same seed, same epoch: same batches
    s.set_epoch(1)
    epoch1 = list(s)
    assert np.array_equal(np.sort(np.concatenate(epoch1)), np.arange(1003)) and epoch1 != epoch0
    assert list(ChunkShuffleSampler(key, 64, 16, seed=8)) != epoch0
    assert not np.array_equal(flat, np.argsort(key))  # shuffled, not storage order
    # a batch is a few contiguous runs of storage: 64 rows = 4 chunks of 16 (+1 where a window splits)
    for batch in epoch0[:-1]:
        pos = np.sort(key[batch])
        assert 1 + np.count_nonzero(np.diff(pos) > 1) <= 64 // 16 + 1
    dropped = list(ChunkShuffleSampler(key, 64, 16, seed=7, drop_last=True))
    assert len(dropped) == 15 and all(len(b) == 64 for b in dropped)


def test_chunked_loader_from_disk_with_workers_reads_the_right_rows(tiny_pairs, dm):
    disk = PairsDataModule(str(tiny_pairs), batch_size=8, val_prompts=0.25, val_checkpoints=1, in_memory=False,
                           num_workers=2, chunk_rows=4)
    disk.setup()
    loader = disk.train_dataloader()
    assert type(loader.batch_sampler).__name__ == "ChunkShuffleSampler"
    batches = list(loader)
    pids = torch.cat([b["prompt"] for b in batches]).numpy()
    train = disk.splits["train"]
    assert np.array_equal(np.sort(pids), np.sort(disk.pairs.prompt_id[train]))  # the epoch covers the split once
    for b in batches:  # the values are those of the in-RAM source for the same prompts
        ref = dm.source.batch(np.array([np.flatnonzero(dm.pairs.prompt_id == p)[0] for p in b["prompt"].numpy()]))
        assert torch.equal(b["cond"], ref["cond"]) and torch.equal(b["pooled"], ref["pooled"])
    again = torch.cat([b["prompt"] for b in disk.train_dataloader()]).numpy()
    assert np.array_equal(again, pids)  # persistent workers, same epoch: the same order


def test_chunk_shuffle_shares_an_epoch_between_ranks():
    from projector.data import ChunkShuffleSampler

    key = np.random.default_rng(0).permutation(1003)
    whole = list(ChunkShuffleSampler(key, 64, 16, seed=7))  # 16 batches: 8 a rank, every other one
    for batch_size, drop_last in ((64, False), (100, False), (100, True)):  # 16, 11, 10 batches
        ranks = [ChunkShuffleSampler(key, batch_size, 16, seed=7, drop_last=drop_last, num_replicas=2, rank=r)
                 for r in (0, 1)]
        epochs = [list(s) for s in ranks]
        assert len(epochs[0]) == len(epochs[1]) == len(ranks[0]) == len(ranks[1])  # DDP steps in lock-step
        rows = [np.concatenate(e) for e in epochs]
        assert not set(rows[0]) & set(rows[1])  # disjoint
        union = np.sort(np.concatenate(rows))
        if drop_last:
            assert len(union) == 10 * 100 and all(len(b) == 100 for e in epochs for b in e)
        else:
            assert np.array_equal(union, np.arange(1003)), batch_size  # the ranks cover the epoch once
        if batch_size == 64:
            assert epochs[0] == whole[0::2] and epochs[1] == whole[1::2]
    # 1003 batches of one row for 2 ranks: one row is seen twice, the only way both get 502 steps
    ones = [list(ChunkShuffleSampler(key, 1, 16, seed=7, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ones[0]) == len(ones[1]) == 502 and sorted(set(np.concatenate(ones[0] + ones[1]))) == list(range(1003))
    with pytest.raises(TypeError, match="DistributedSampler"):  # a sampler where the storage keys go
        ChunkShuffleSampler(torch.utils.data.DistributedSampler(range(4), num_replicas=2, rank=0), 2)


def test_lightning_rebuilds_the_chunk_sampler_for_each_rank(tiny_pairs):
    """Under DDP Lightning re-creates the train loader's batch sampler with its DistributedSampler as
    `sampler` (the other arguments as the dataloader hook gave them): each rank gets its share."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import BatchSampler, DistributedSampler

    disk = PairsDataModule(str(tiny_pairs), batch_size=8, val_prompts=0.25, val_checkpoints=1, in_memory=False, chunk_rows=4)
    disk.setup()
    with _replace_dunder_methods(BatchSampler):  # as Lightning calls a dataloader hook
        loader = disk.train_dataloader()
    rebuilt = [_update_dataloader(loader, DistributedSampler(loader.dataset, num_replicas=2, rank=r, shuffle=True),
                                  mode=RunningStage.TRAINING) for r in (0, 1)]
    for r, new in enumerate(rebuilt):
        s = new.batch_sampler
        assert (s.num_replicas, s.rank, s.chunk_rows, s.seed) == (2, r, 4, disk.seed)
        assert np.array_equal(s.order, loader.batch_sampler.order)
    positions = [[i for b in new.batch_sampler for i in b] for new in rebuilt]
    assert len(rebuilt[0].batch_sampler) == len(rebuilt[1].batch_sampler) == -(-len(loader.batch_sampler) // 2)
    assert not set(positions[0]) & set(positions[1])
    assert sorted(positions[0] + positions[1]) == list(range(len(disk.splits["train"])))
    disk.trainer = SimpleNamespace(world_size=2, global_rank=1)  # the hook reads the ranks from the trainer
    s = disk.train_dataloader().batch_sampler
    assert (s.num_replicas, s.rank) == (2, 1) and [i for b in s for i in b] == positions[1]


class _SeenPrompts(L.Callback):
    """The prompt ids of every training batch, by epoch."""

    def __init__(self):
        self.epochs: dict[int, list[list[int]]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.epochs.setdefault(trainer.current_epoch, []).append(batch["prompt"].tolist())


def _fit_from_disk(tiny_pairs, epochs: int, **trainer_kw):
    from projector.module import ProjectorModule

    disk = PairsDataModule(str(tiny_pairs), batch_size=8, val_prompts=0.25, val_checkpoints=1, in_memory=False,
                           chunk_rows=4, knn_max_queries=8)
    disk.setup()
    model = ProjectorModule({"_target_": "projector.models.LearnedQueryDecoder", "width": 8, "depth": 1, "heads": 2,
                             "memory_tokens": 2}, disk.dims, {"_target_": "projector.models.PooledHead", "hidden": 8})
    model.projector.set_stats(disk.stats)
    seen = _SeenPrompts()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[seen], **trainer_kw)
    trainer.fit(model, datamodule=disk)
    return disk, trainer, seen.epochs


def test_a_ddp_epoch_from_disk_covers_the_training_split_once(tiny_pairs, monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)  # whatever DDP sets up is undone after the test
    try:
        disk, trainer, epochs = _fit_from_disk(tiny_pairs, 1, strategy="ddp")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert type(trainer.train_dataloader.batch_sampler).__name__ == "ChunkShuffleSampler"
    pids = np.concatenate(epochs[0])
    assert np.array_equal(np.sort(pids), np.sort(disk.pairs.prompt_id[disk.splits["train"]]))


def test_the_chunk_shuffle_changes_every_epoch_under_a_trainer(tiny_pairs):
    """Lightning sets the epoch on `batch_sampler.sampler`, never on the batch sampler itself."""
    from projector.data import ChunkShuffleSampler

    disk, trainer, epochs = _fit_from_disk(tiny_pairs, 3)
    train = disk.splits["train"]
    for e in range(3):
        assert np.array_equal(np.sort(np.concatenate(epochs[e])), np.sort(disk.pairs.prompt_id[train]))
        s = ChunkShuffleSampler(disk.source.storage_order(train), 8, 4, seed=disk.seed)
        s.set_epoch(e)  # the order depends only on (seed, epoch)
        assert epochs[e] == [disk.pairs.prompt_id[train[b]].tolist() for b in s]
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]
