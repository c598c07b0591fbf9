"""luna.settings: one way to read a key, turn a config into plain data and pick a device."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from omegaconf import OmegaConf

from luna.settings import get, plain, resolve_device


@dataclass
class Ray:
    actors: int | None = None
    cpus: int = 2


def test_get_reads_dicts_omegaconf_and_objects_alike():
    for cfg in ({"actors": None, "cpus": 2}, OmegaConf.create({"actors": None, "cpus": 2}), Ray()):
        assert get(cfg, "cpus", 1) == 2
        assert get(cfg, "actors", 4) == 4  # null means "not set"
        assert get(cfg, "missing", "d") == "d"
    assert get(None, "cpus", 3) == 3


def test_plain_resolves_interpolations_and_leaves_plain_data():
    cfg = OmegaConf.create({"out": "/x", "shards": "${out}/shards", "list": [1, {"a": "${out}"}]})
    assert plain(cfg) == {"out": "/x", "shards": "/x/shards", "list": [1, {"a": "/x"}]}
    assert type(plain(cfg)) is dict
    assert plain({"a": 1}) == {"a": 1} and plain(None) is None


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == resolve_device(None) == resolve_device("") == expected
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("cpu") == "cpu"


def test_names_takes_one_name_or_a_list_and_names_the_key_otherwise():
    from luna.settings import names

    assert names("pony", "families") == ["pony"] and names(["base", "pony"], "families") == ["base", "pony"]
    assert names(None, "only") == []
    for bad in ([1], "", [""], {"a": 1}):
        with pytest.raises(ValueError, match=r"families="):
            names(bad, "families")


def test_number_or_auto():
    from luna.settings import number_or_auto

    assert number_or_auto("auto", "k") is None and number_or_auto(" AUTO ", "k") is None
    assert number_or_auto(3, "k") == 3 and number_or_auto("3", "k") == 3 and number_or_auto(2.5, "k", float) == 2.5
    for bad, kind in ((True, int), (2.5, int), (-1, int), ("x", float), (None, float)):
        with pytest.raises(ValueError, match=r"^k="):
            number_or_auto(bad, "k", kind)
