"""`workers: auto` sizes the decoding processes to the device: a GPU's forward outruns two of them."""
from __future__ import annotations

import os

import pytest

from extraction.reader import AUTO_WORKERS_MAX, decode_workers


@pytest.mark.parametrize("cores, device, expected", [
    (16, "cuda", AUTO_WORKERS_MAX), (16, "cuda:1", AUTO_WORKERS_MAX), (6, "cuda", 4), (2, "cuda", 1), (3, "cuda", 1),
    (16, "cpu", 2), (1, "cpu", 1),
])
def test_auto_follows_the_cores_and_the_device(monkeypatch, cores, device, expected):
    assert AUTO_WORKERS_MAX == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert decode_workers("auto", device) == expected
    assert decode_workers("AUTO", device) == expected


def test_a_number_is_taken_as_given():
    assert decode_workers(0, "cuda") == 0
    assert decode_workers("3", "cpu") == 3


@pytest.mark.parametrize("bad", ["many", -1, None, "2.5"])
def test_bad_values_name_the_setting(bad):
    with pytest.raises(ValueError, match="workers="):
        decode_workers(bad, "cpu")


@pytest.mark.parametrize("bad", [True, 2.5])
def test_bools_and_fractions_are_not_counts(bad):
    with pytest.raises(ValueError, match="workers="):
        decode_workers(bad, "cpu")


def test_extract_names_a_bad_workers_value_before_loading_a_model(tmp_path, monkeypatch):
    import extraction.extract as ex

    loaded = []
    monkeypatch.setattr(ex, "load_tower", lambda *a: loaded.append(a))
    monkeypatch.setattr(ex, "find_shards", lambda *a, **k: ([], []))
    cfg = {"shards": str(tmp_path), "out": str(tmp_path / "pairs"), "workers": "many", "device": "cpu"}
    with pytest.raises(ValueError, match="workers='many'"):
        ex.extract(cfg)
    assert not loaded
