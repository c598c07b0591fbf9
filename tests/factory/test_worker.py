"""The actor body (FactoryWorker) with a fake generator: quality gate, derived retry seeds, pipeline reuse."""
from __future__ import annotations

import functools

import pytest

from factory import quality
from factory.worker import FactoryWorker
from tests.factory.tasks import SAMPLER, make_tasks


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


def _legacy_run(gen, task) -> dict:
    """What the actor returned before encoding was overlapped: every attempt generated and gated in
    line, the kept images encoded after the last attempt with PIL's defaults (the reference bytes)."""
    from factory.shards import encode_image

    sampler, img = task["sampler"], task["image"]
    qcfg = quality.QualityConfig.from_cfg(task["quality"])
    history = {s["key"]: [] for s in task["samples"]}
    images, seeds_used, pending = {}, {}, list(task["samples"])
    for attempt in range(qcfg.max_attempts):
        failed = []
        for i in range(0, len(pending), sampler["batch_size"]):
            chunk = pending[i : i + sampler["batch_size"]]
            seeds = [quality.derive_seed(s["seed"], attempt) for s in chunk]
            for s, seed, im in zip(chunk, seeds, gen.generate([s["prompt"] for s in chunk], [""] * len(chunk), seeds, sampler)):
                reasons = quality.check_image(im, qcfg)
                history[s["key"]].append(reasons)
                (failed.append(s) if reasons else (images.__setitem__(s["key"], im), seeds_used.__setitem__(s["key"], seed)))
        pending = failed
    out = [{"key": s["key"], "image": encode_image(images[s["key"]], img["format"], img.get("quality", 95)),
            "ext": img["format"], "seed": seeds_used[s["key"]], "quality": quality.flags(history[s["key"]])}
           for s in task["samples"] if s["key"] in images]
    rejected = [{"key": s["key"], "reasons": quality.flags(history[s["key"]])["rejected_attempts"]}
                for s in task["samples"] if s["key"] not in images]
    return {"samples": out, "rejected": rejected}


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_overlapped_encoding_keeps_order_keys_and_bytes(fakes, fmt):
    # seeds 3 and 8 are black on their first try: the retry pass runs, out of sample order
    gen = functools.partial(fakes.FakeGenerator, black_seeds=[3, 8])
    task = make_tasks({"ck": ["pc1"]}, 1, per_unit=11)[0]
    task["sampler"] = dict(SAMPLER, width=48, height=40, batch_size=3)
    task["image"] = {"format": fmt}
    reference = _legacy_run(gen(), task)
    assert [s["key"] for s in reference["samples"]] == [f"ck_0_{i}" for i in range(11)]
    for threads in (0, 1, 3):
        task["image"]["encode_threads"] = threads
        got = FactoryWorker("w0", "pc1", gen).run(task)
        assert [s["key"] for s in got["samples"]] == [s["key"] for s in reference["samples"]]
        assert got["samples"] == reference["samples"] and got["rejected"] == reference["rejected"], threads
        assert got["timings"]["encode_s"] > 0 and got["timings"]["wait_s"] >= 0


def test_a_generator_faster_than_the_pool_waits_for_it(fakes, monkeypatch):
    # encoding slower than generation: the images generated but not yet gated and encoded stay bounded
    # (2 * encode_threads + batch_size, less the batch about to be made), not the whole unit
    import threading
    import time

    from factory import worker

    finished, lock, real = [0], threading.Lock(), worker._gate_and_encode

    def slow_gate(image, score, **kw):
        time.sleep(0.005)
        out = real(image, score, **kw)
        with lock:
            finished[0] += 1
        return out

    class Counting(fakes.FakeGenerator):
        made, pending = 0, []

        def generate(self, prompts, negatives, seeds, sampler):
            with lock:
                self.pending.append(self.made - finished[0])
            out = super().generate(prompts, negatives, seeds, sampler)
            self.made += len(out)
            return out

    monkeypatch.setattr(worker, "_gate_and_encode", slow_gate)
    task = make_tasks({"ck": ["pc1"]}, 1, per_unit=24)[0]
    task["sampler"] = dict(SAMPLER, batch_size=3)
    task["image"] = {"format": "png", "encode_threads": 1}
    got = FactoryWorker("w0", "pc1", Counting).run(task)
    assert [s["key"] for s in got["samples"]] == [f"ck_0_{i}" for i in range(24)]
    assert len(Counting.pending) == 8 and max(Counting.pending) <= 2 * 1 + 3 - 1, Counting.pending


def test_png_level_changes_the_effort_not_the_pixels(fakes):
    import io

    import numpy as np
    from PIL import Image

    task = make_tasks({"ck": ["pc1"]}, 1, per_unit=2)[0]
    task["sampler"] = dict(SAMPLER, width=64, height=64)
    default = FactoryWorker("w0", "pc1", fakes.FakeGenerator).run(task)["samples"]
    task["image"] = {"format": "png", "png_level": 1}
    fast = FactoryWorker("w0", "pc1", fakes.FakeGenerator).run(task)["samples"]
    task["image"] = {"format": "png", "png_level": 6}  # PIL's default level, given explicitly: the same bytes
    six = FactoryWorker("w0", "pc1", fakes.FakeGenerator).run(task)["samples"]
    for a, b, c in zip(default, fast, six):
        assert a["image"] == c["image"] and a["image"] != b["image"]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(a["image"]))), np.asarray(Image.open(io.BytesIO(b["image"]))))
    task["image"] = {"format": "png", "png_level": 12}
    with pytest.raises(ValueError, match="png_level=12"):
        FactoryWorker("w0", "pc1", fakes.FakeGenerator).run(task)


def test_sampler_override_reaches_the_scheduler_the_worker_builds(tmp_path):
    """A few-step file (its metadata says Lightning) + a campaign rule -> the unit's task -> the scheduler
    config, steps and cfg the generator uses; no image is generated."""
    from factory import inventory
    from factory.campaign_file import load_campaign
    from factory.planner import plan
    from factory.run import _task
    from factory.worker import SDXLGenerator
    from tests.luna.model_kinds import META, save, tiny_state

    models = tmp_path / "models"
    models.mkdir()
    save(models / "fastMerge.safetensors", tiny_state(0, "base"),
         {**META, "modelspec.title": "Fast Merge Lightning 4-step", "modelspec.usage_hint": "4 steps, cfg 1"})
    camp = tmp_path / "fast.yaml"
    camp.write_text("campaign: fast\njobs:\n  j: {quota: 2, templates: ['a red fox']}\n"
                    "sampler: {steps: 25, cfg: 6.0, scheduler: euler_a, width: 64, height: 64, batch_size: 2}\n"
                    "sampler_overrides:\n"
                    "  - {distillation: few-step, steps: 6, cfg: 1.5, scheduler: euler, timestep_spacing: trailing}\n")
    inv = inventory.merge([inventory.scan_folders([str(models)], "pc1", cache=False)])
    ckpt = inv.checkpoints[0]
    assert ckpt.distillation == "few-step"
    unit = plan(load_campaign(camp), inv.checkpoints).units[0]
    task = _task(unit, ckpt, {})
    assert {k: task["sampler"][k] for k in ("steps", "cfg", "scheduler", "timestep_spacing", "prediction")} == {
        "steps": 6, "cfg": 1.5, "scheduler": "euler", "timestep_spacing": "trailing", "prediction": "epsilon"}
    gen = SDXLGenerator(device="cpu", dtype="float32", threads=1)
    gen.load(ckpt.paths["pc1"])
    gen.configure(task["sampler"])
    cfg = gen.pipe.scheduler.config
    assert type(gen.pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert (cfg.timestep_spacing, cfg.prediction_type) == ("trailing", "epsilon")
    gen.pipe.scheduler.set_timesteps(task["sampler"]["steps"])
    assert len(gen.pipe.scheduler.timesteps) == 6 and int(gen.pipe.scheduler.timesteps[0]) == 999  # trailing
