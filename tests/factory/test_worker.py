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


def test_v_prediction_checkpoint_is_sampled_with_a_v_prediction_scheduler(tmp_path):
    """The inventory reads v_pred/ztsnr from the file; the worker builds the scheduler that needs."""
    from factory.worker import SDXLGenerator
    from luna.models import inventory as inv
    from tests.luna.model_kinds import META, save, tiny_state

    state = tiny_state(0, "base")
    state.update(v_pred=__import__("torch").tensor([]), ztsnr=__import__("torch").tensor([]))
    path = save(tmp_path / "vpredMerge.safetensors", state, META)
    row = inv.scan([tmp_path], cache=None)[0]
    assert (row.status, row.prediction) == ("used", "v+ztsnr")
    gen = SDXLGenerator(device="cpu", dtype="float32", threads=1)
    gen.load(str(path))
    images = gen.generate(["a red fox"], [""], [1], {"scheduler": "euler", "steps": 2, "cfg": 2.0, "width": 64,
                                                      "height": 64, "prediction": row.prediction})
    cfg = gen.pipe.scheduler.config
    assert (cfg.prediction_type, cfg.rescale_betas_zero_snr, cfg.timestep_spacing) == ("v_prediction", True, "trailing")
    assert images[0].shape == (64, 64, 3)
    gen.generate(["a red fox"], [""], [1], {"scheduler": "euler", "steps": 2, "width": 64, "height": 64})
    assert gen.pipe.scheduler.config.prediction_type == "epsilon"  # the next checkpoint's own needs
