"""A full disk (OSError ENOSPC raised mid-write) leaves no file that a later run takes for complete,
and the rerun after space is freed completes exactly: extraction on its own (the same arrays as an
uninterrupted run), and across stages (factory disk-full mid-shard -> rerun -> extraction pairs every
sample of the quota exactly once, with the metadata of its own shard sample). The factory's own
disk-full test (tests/factory/test_factory_run.py) covers the shards folder alone."""
from __future__ import annotations

import errno
import functools
import json
from pathlib import Path

import h5py
import pytest

from tests.extraction.conftest import assert_same_parts, compose


def _cfg(shards: Path, out: Path, ckpt: Path):
    return compose([f"shards={shards}", f"out={out}", "text=reference", f"text.checkpoint={ckpt}",
                    "progress=false", "batch_size=3", "workers=0", "dtype=float32"])


def _shards(folder: Path, te: str, n: int = 3) -> Path:
    from tests.extraction.extraction_shards import shard_metas, write_shard

    ckpt = {"name": "tiny-base-0", "fingerprint": "fp", "te_fingerprint": te}
    for s in range(n):
        write_shard(folder, f"disk-pc1-w0-{s:06d}", shard_metas([ckpt], 4, offset=4 * s), seed=s)
    return folder


def _fill_disk_on_part(monkeypatch, part_number: int, after_datasets: int) -> dict:
    """From the `part_number`-th part written (1-based), every HDF5 dataset after the first
    `after_datasets` of it raises ENOSPC, as a disk that filled up mid-part would."""
    import extraction.pairs as pairs_fmt

    state = {"parts": 0, "datasets": 0, "raised": 0}
    real_write, real_create = pairs_fmt.write_part, h5py.Group.create_dataset

    def write_part(path, part, dtype="float16"):
        state["parts"] += 1
        state["datasets"] = 0
        return real_write(path, part, dtype=dtype)

    def create_dataset(self, *a, **kw):
        if state["parts"] >= part_number:
            state["datasets"] += 1
            if state["datasets"] > after_datasets:
                state["raised"] += 1
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_create(self, *a, **kw)

    monkeypatch.setattr(pairs_fmt, "write_part", write_part)
    monkeypatch.setattr(h5py.Group, "create_dataset", create_dataset)
    return state


def _no_partial_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".hydra")


def test_extraction_disk_full_mid_part_then_rerun_gives_the_uninterrupted_arrays(te_checkpoint, tmp_path,
                                                                                  monkeypatch):
    from extraction.extract import extract

    ckpt, te = te_checkpoint
    shards = _shards(tmp_path / "shards", te)
    reference = tmp_path / "reference"
    extract(_cfg(shards, reference, ckpt))

    out = tmp_path / "pairs"
    with monkeypatch.context() as m:
        state = _fill_disk_on_part(m, part_number=2, after_datasets=5)
        with pytest.raises(OSError) as info:
            extract(_cfg(shards, out, ckpt))
    assert info.value.errno == errno.ENOSPC and state["raised"] >= 1  # the writer thread may try the next part too
    # the first part is complete and kept; the second has neither its final name nor a temporary left
    assert sorted(p.name for p in out.glob("*.h5")) == ["pairs-disk-pc1-w0-000000.h5"]
    assert _no_partial_files(out) == []
    report = json.loads((out / "extract_report.json").read_text())
    assert report["written"] == ["pairs-disk-pc1-w0-000000.h5"]

    again = extract(_cfg(shards, out, ckpt))
    assert again.skipped_done == ["disk-pc1-w0-000000.tar"] and len(again.written) == 2
    assert _no_partial_files(out) == []
    assert_same_parts(reference, out)


def test_factory_disk_full_then_rerun_then_extraction_pairs_exactly_the_quota(ray_cluster, tiny_dir, te_checkpoint,
                                                                              fake_generators, tmp_path, monkeypatch):
    from extraction.extract import extract
    from extraction.pairs import Pairs
    from factory import shards as shards_mod
    from factory.errors import FactoryError
    from factory.run import run

    quota = 10
    camp = tmp_path / "diskcamp.yaml"
    camp.write_text(
        "campaign: diskcamp\nwildcards:\n  color: [blue eyes, green eyes, grey eyes]\n"
        "jobs:\n  eyes: {quota: 6, templates: ['closeup of __color__']}\n"
        "  faces: {quota: 4, templates: ['portrait, __color__']}\n"
        "sampler: {steps: 2, width: 32, height: 32, batch_size: 2}\nseed: 11\n")
    cfg = {"campaign_file": str(camp), "out": str(tmp_path / "out"), "progress": False,
           "checkpoints": {"dirs": [], "node_dirs": {"pc1": [str(tiny_dir / "single")]}},
           "workers": {"device": "cpu", "inflight_per_actor": 2, "max_retries": 3},
           "image": {"format": "png"}, "quality": {"max_attempts": 2}}
    gen = functools.partial(fake_generators.FakeGenerator)
    real_add, calls = shards_mod._add, {"n": 0}

    def add_until_full(tar, name, data, mtime):
        calls["n"] += 1
        if calls["n"] > 10:  # the 4th sample: mid-shard of the second unit
            raise OSError(errno.ENOSPC, "No space left on device")
        real_add(tar, name, data, mtime)

    with monkeypatch.context() as m:
        m.setattr(shards_mod, "_add", add_until_full)
        with pytest.raises(FactoryError, match="disk full"):
            run(cfg, make_generator=gen)
    shards_dir = tmp_path / "out" / "shards"
    first = shards_mod.complete_shards(shards_dir, "diskcamp")
    assert first and not [p for p in shards_dir.iterdir() if p.name.startswith(".")]
    assert all(shards_mod.stats_path(t).exists() for t in shards_dir.glob("*.tar"))

    # extraction of the half-done folder sees only complete shards, then the rerun fills in the rest
    pairs = tmp_path / "pairs"
    extract(_cfg(shards_dir, pairs, te_checkpoint[0]))
    report = run(cfg, make_generator=gen)
    assert report.skipped_units == len(first)
    extract(_cfg(shards_dir, pairs, te_checkpoint[0]))

    metas = {}
    for t in shards_mod.complete_shards(shards_dir, "diskcamp"):
        for s in shards_mod.read_shard(t):
            metas[s["__key__"]] = json.loads(s["json"])
    assert len(metas) == quota
    with Pairs(pairs) as p:
        assert sorted(p.key) == sorted(metas)  # every sample exactly once: nothing lost, nothing twice
        for i, key in enumerate(p.key):
            assert p.prompt_text[p.prompt_id[i]] == metas[key]["prompt"]
            assert int(p.seed[i]) == metas[key]["seed"] and p.checkpoint[i] == metas[key]["checkpoint"]
