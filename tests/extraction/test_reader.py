"""Extraction's reader: shard discovery, completeness markers, format versions, bad samples, batches."""
from __future__ import annotations

import json

import pytest

from extraction.reader import ShardError, check_format_version, expand_patterns, find_shards, iter_shard_batches
from tests.extraction.extraction_shards import sample_meta, write_shard

CKPT = {"name": "ck", "fingerprint": "f", "te_fingerprint": "te"}


def _metas(n, offset=0):
    return [sample_meta(f"prompt {i % 3}", CKPT, seed=offset + i, category="eyes") for i in range(n)]


def test_discovery_folders_globs_braces(tmp_path):
    for s in range(3):
        write_shard(tmp_path, f"c-pc1-w0-{s:06d}", _metas(2), seed=s)
    write_shard(tmp_path / "other", "c-pc2-w0-000000", _metas(2))
    assert [p.name for p in expand_patterns(str(tmp_path))] == [f"c-pc1-w0-{s:06d}.tar" for s in range(3)]
    assert len(expand_patterns(str(tmp_path / "c-pc1-w0-{000000..000001}.tar"))) == 2
    assert len(expand_patterns([str(tmp_path / "*.tar"), str(tmp_path / "other")])) == 4
    with pytest.raises(ShardError, match="no such shard"):
        expand_patterns(str(tmp_path / "c-pc1-w0-{000007..000008}.tar"))
    with pytest.raises(ShardError, match="no shard tars"):
        find_shards(str(tmp_path / "empty-*.tar"))


def test_shard_without_stats_is_skipped_unless_forced(tmp_path, caplog):
    write_shard(tmp_path, "c-pc1-w0-000000", _metas(2))
    write_shard(tmp_path, "c-pc1-w0-000001", _metas(2), stats=False)
    shards, skipped = find_shards(str(tmp_path))
    assert [s.path.name for s in shards] == ["c-pc1-w0-000000.tar"]
    assert [p.name for p in skipped] == ["c-pc1-w0-000001.tar"]
    assert "force=true" in caplog.text
    shards, skipped = find_shards(str(tmp_path), force=True)
    assert len(shards) == 2 and not skipped


def test_bad_samples_are_listed_and_the_shard_goes_on(tmp_path):
    import torch
    import webdataset as wds

    path = tmp_path / "c-pc1-w0-000000.tar"
    good = json.dumps(sample_meta("p", CKPT, 0, "eyes")).encode()
    with wds.TarWriter(str(path)) as w:
        w.write({"__key__": "a", "png": b"not a png", "json": good})
        w.write({"__key__": "b", "txt": "no json, no image"})
    write_shard(tmp_path / "ok", "s", _metas(2))
    items = list(iter_shard_batches(0, path, lambda im: torch.zeros(3, 4, 4), 8))
    end = items[-1]
    assert end.error is None and end.count == 0 and len(items) == 1
    reasons = {b["key"]: b["reason"] for b in end.bad_samples}
    assert set(reasons) == {"a", "b"}
    assert "json" in reasons["b"] and "Image" in reasons["a"]
    items = list(iter_shard_batches(3, tmp_path / "ok" / "s.tar", lambda im: torch.zeros(3, 4, 4), 8))
    assert [type(i).__name__ for i in items] == ["Batch", "ShardEnd"] and items[0].pixels.shape == (2, 3, 4, 4)
    assert items[1].count == 2 and not items[1].bad_samples and items[0].shard == 3


def test_other_format_version_is_a_clear_error(tmp_path):
    write_shard(tmp_path, "c-pc1-w0-000000", _metas(1), format_version=99)
    shards, _ = find_shards(str(tmp_path))
    with pytest.raises(ShardError, match="format_version 99"):
        check_format_version(shards[0])


def test_reads_the_factory_shard_writer(tmp_path):
    """Shards written by factory/shards.py (the real producer) read back with every field."""
    import torch

    from factory import shards as fshards

    samples = []
    for i in range(3):
        meta = sample_meta(f"prompt {i}", CKPT, seed=10 + i, category="eyes/color")
        samples.append(fshards.ShardSample(f"k{i:04d}", fshards.encode_image(torch.rand(24, 24, 3).numpy()), "png",
                                           meta["prompt"], meta))
    path = tmp_path / f"{fshards.shard_name('faces', 'pc1', 'w0', 0)}.tar"
    fshards.write_shard(path, samples, {"count": 3, "successes": 3})
    (shard,), skipped = find_shards(str(tmp_path))
    assert not skipped and shard.expected_count == 3 and check_format_version(shard) == fshards.FORMAT_VERSION
    items = list(iter_shard_batches(0, shard.path, lambda im: torch.zeros(3, *im.size), 8))
    batch, end = items
    assert end.count == 3 and not end.bad_samples and batch.pixels.shape == (3, 3, 24, 24)
    assert [(m.key, m.prompt, m.seed, m.category, m.te_fingerprint) for m in batch.meta] == [
        (f"k{i:04d}", f"prompt {i}", 10 + i, "eyes/color", "te") for i in range(3)]
