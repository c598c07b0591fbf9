"""The actor body (FactoryWorker) with a fake generator: quality gate, derived retry seeds, pipeline reuse."""
from __future__ import annotations

import functools

from factory import quality
from factory.worker import FactoryWorker
from tests.factory.tasks import make_tasks


def test_actor_gate_regenerates_with_derived_seed_and_rejects_with_reason(fakes):
    # in-process actor body: seed 1 is black on the first try, seed 2 is NaN on every try
    nan_seeds = [quality.derive_seed(2, a) for a in range(3)]
    gen = functools.partial(fakes.FakeGenerator, black_seeds=[1], nan_seeds=nan_seeds)
    w = FactoryWorker("w0", "pc1", gen)
    task = make_tasks({"ck": ["pc1"]}, 1)[0]
    task["samples"] = [{"key": "a", "prompt": "x", "seed": 1}, {"key": "b", "prompt": "y", "seed": 2},
                       {"key": "c", "prompt": "z", "seed": 3}]
    r = w.run(task)
    kept = {s["key"]: s for s in r["samples"]}
    assert set(kept) == {"a", "c"}
    assert kept["a"]["seed"] == quality.derive_seed(1, 1) != 1
    assert kept["a"]["quality"]["attempts"] == 2 and kept["a"]["quality"]["rejected_attempts"] == [["black"]]
    assert kept["c"]["seed"] == 3 and kept["c"]["quality"]["attempts"] == 1
    assert r["rejected"] == [{"key": "b", "reasons": [["nan"]] * 3}]
    assert r["loads"] == 1
    w.run(task)
    assert w.loads == 1  # same checkpoint: the pipeline stays loaded
