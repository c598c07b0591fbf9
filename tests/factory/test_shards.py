"""Shards: atomic writes, the stats marker, resume index, safe reading."""
from __future__ import annotations

import errno
import io
import json
import subprocess
import tarfile

import numpy as np
import pytest

from factory import shards
from tests.extraction.extraction_shards import sample_meta, write_shard


def _samples(n: int, ext: str = "png") -> list[shards.ShardSample]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = shards.encode_image(rng.random((8, 8, 3), dtype=np.float32), ext)
        out.append(shards.ShardSample(key=f"camp_job_{i:06d}", image=img, ext=ext, prompt=f"prompt {i}",
                                 meta={"key": f"camp_job_{i:06d}", "prompt": f"prompt {i}"}))
    return out


def test_shard_roundtrip_with_webdataset_and_tar(tmp_path):
    import webdataset as wds

    path = tmp_path / (shards.shard_name("camp", "pc1", "w0", 3) + ".tar")
    assert path.name == "camp-pc1-w0-000003.tar"
    sp = shards.write_shard(path, _samples(3), {"count": 3, "successes": 3, "unit_ids": ["u1"]})
    assert sp.name == "camp-pc1-w0-000003_stats.json" and json.loads(sp.read_text())["format_version"] == 1
    got = list(shards.read_shard(path))
    assert [s["__key__"] for s in got] == [f"camp_job_{i:06d}" for i in range(3)]
    assert set(got[0]) == {"__key__", "png", "txt", "json"} and got[1]["txt"] == b"prompt 1"
    ds = list(wds.WebDataset(str(path), shardshuffle=False).decode("rgb"))
    assert len(ds) == 3 and ds[2]["png"].shape == (8, 8, 3) and ds[0]["txt"] == "prompt 0"
    listing = subprocess.run(["tar", "tf", str(path)], capture_output=True, text=True, check=True).stdout.split()
    assert listing[:3] == ["camp_job_000000.png", "camp_job_000000.txt", "camp_job_000000.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_keys_with_dots_or_slashes_are_refused(tmp_path):
    s = _samples(1)[0]
    for bad in ("a.b", "../x", "a/b", ""):
        s.key = bad
        with pytest.raises(ValueError):
            shards.write_shard(tmp_path / "c-n-w-000000.tar", [s], {})
    assert list(tmp_path.iterdir()) == []


def test_scan_resume_and_cleanup(tmp_path):
    shards.write_shard(tmp_path / "camp-pc1-w0-000000.tar", _samples(2), {"unit_ids": ["u1"], "successes": 2})
    shards.write_shard(tmp_path / "other-pc1-w0-000007.tar", _samples(1), {"unit_ids": ["x"], "successes": 1})
    # an interrupted write: a tar without its stats marker, and a temporary file
    shards.write_tar(tmp_path / "camp-pc2-w1-000004.tar", _samples(1))
    (tmp_path / ".tmp-camp-pc1-w0-000005.tar").write_bytes(b"partial")
    idx = shards.scan(tmp_path, "camp")
    assert idx.done_units == {"u1"} and idx.keys == 2 and idx.next_seq == 6
    assert sorted(p.name for p in idx.incomplete) == [".tmp-camp-pc1-w0-000005.tar", "camp-pc2-w1-000004.tar"]
    shards.clean_incomplete(idx)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "camp-pc1-w0-000000.tar", "camp-pc1-w0-000000_stats.json",
        "other-pc1-w0-000007.tar", "other-pc1-w0-000007_stats.json"]


def test_disk_full_mid_shard_leaves_nothing(tmp_path, monkeypatch):
    real_add = shards._add
    calls = {"n": 0}

    def failing_add(tar, name, data, mtime):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_add(tar, name, data, mtime)

    monkeypatch.setattr(shards, "_add", failing_add)
    with pytest.raises(shards.ShardWriteError) as info:
        shards.write_shard(tmp_path / "camp-pc1-w0-000000.tar", _samples(3), {"unit_ids": ["u1"]})
    assert info.value.errno == errno.ENOSPC and "No space left" in str(info.value)
    assert list(tmp_path.iterdir()) == []
    assert shards.scan(tmp_path, "camp").done_units == set()


def test_read_shard_never_uses_member_paths(tmp_path):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("../../etc/x.txt", b"bad"), ("/abs.txt", b"bad"), ("good.txt", b"ok"),
                           ("good.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    assert list(shards.read_shard(path)) == [{"__key__": "good", "txt": b"ok", "json": b"{}"}]


def test_samples_grouped_by_key_and_truncation_detected(tmp_path):
    metas = [sample_meta(f"prompt {i}", {"name": "ck", "fingerprint": "f", "te_fingerprint": "te"}, seed=i,
                         category="eyes") for i in range(5)]
    path = write_shard(tmp_path, "c-pc1-w0-000000", metas)  # stock webdataset.TarWriter
    samples = list(shards.iter_samples(path))
    assert len(samples) == 5 and all(set(f) == {"png", "txt", "json"} for _, f in samples)
    data = path.read_bytes()
    # cut in the middle of a member, and exactly at a member boundary (tarfile alone misses the latter)
    with tarfile.open(path) as tf:
        boundary = tf.getmembers()[6].offset
    for cut in (len(data) // 2 + 7, boundary):
        with pytest.raises(shards.CorruptShard):
            list(shards.iter_samples(data[:cut]))


def test_member_names_never_become_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in (("../evil.png", b"x"), ("/abs/evil.json", b"{}"), ("ok.txt", b"hi")):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    keys = [k for k, _ in shards.iter_samples(buf.getvalue())]
    assert keys == ["../evil", "/abs/evil", "ok"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == [] and not (tmp_path.parent / "evil.png").exists()
    assert shards.split_member("a/b.c.json") == ("a/b", "c.json")


def test_reads_a_shard_written_by_the_format_v1_writer_and_writes_the_same_members(tmp_path):
    """tests/fixtures/formats_v1: a shard written before the redesign is found, read by every reader
    (ours, extraction's, stock webdataset), and today's writer stores the same members and bytes."""
    from pathlib import Path

    import webdataset as wds

    from extraction.reader import check_format_version, find_shards

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "formats_v1" / "shards"
    tar = fixture / "old-pc1-w0-000000.tar"
    assert shards.FORMAT_VERSION == 1 and shards.READABLE_FORMAT_VERSIONS == (1,)
    index = shards.scan(fixture, "old")
    assert index.complete == [tar] and index.done_units == {"u0"} and index.next_seq == 1
    stats = shards.read_stats(tar)
    assert stats["format_version"] == 1 and stats["keys"] == [f"old_{i:06d}" for i in range(3)]
    samples = list(shards.read_shard(tar))
    assert [s["__key__"] for s in samples] == stats["keys"] and all(set(s) == {"__key__", "png", "txt", "json"}
                                                                     for s in samples)
    (found,), _ = find_shards(str(fixture))
    assert check_format_version(found) == 1 and found.expected_count == 3
    stock = list(wds.WebDataset(str(tar), shardshuffle=False))
    assert [(s["__key__"], s["png"], s["txt"]) for s in stock] == [(s["__key__"], s["png"], s["txt"]) for s in samples]
    again = [shards.ShardSample(s["__key__"], s["png"], "png", s["txt"].decode(), json.loads(s["json"]))
             for s in samples]
    shards.write_shard(tmp_path / tar.name, again, {k: v for k, v in stats.items() if k not in ("format_version", "shard")})
    with tarfile.open(tar) as old, tarfile.open(tmp_path / tar.name) as new:
        assert [(m.name, m.size, m.mode) for m in old] == [(m.name, m.size, m.mode) for m in new]
        assert [old.extractfile(m).read() for m in old] == [new.extractfile(m).read() for m in new]
    assert shards.read_stats(tmp_path / tar.name) == stats


def test_in_place_uint8_conversion_gives_the_pixels_of_the_plain_expression():
    # the encoder converts on one float32 copy, in place: the pixels (hence the png bytes) of the expression it
    # replaced, for NaN, +-inf, out-of-range values, float16/64 and non-contiguous arrays; the input is untouched
    rng = np.random.default_rng(7)
    for i, dtype in enumerate([np.float32, np.float64, np.float16] * 4):
        a = (rng.standard_normal((19, 23, 3)) * 0.7 + 0.5).astype(dtype)
        a.flat[rng.integers(a.size, size=6)] = [np.nan, np.inf, -np.inf, 1.0000001, -0.0, 0.5 / 255]
        a = a[::2, 1:] if i % 3 == 1 else np.asfortranarray(a) if i % 3 == 2 else a
        before = a.copy()
        plain = (np.clip(np.nan_to_num(a.astype(np.float32)), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        assert np.array_equal(shards.to_uint8(a), plain) and np.array_equal(a, before, equal_nan=True), dtype
        assert shards.encode_image(a) == shards.encode_image(plain)
    u8 = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
    assert shards.to_uint8(u8) is u8
