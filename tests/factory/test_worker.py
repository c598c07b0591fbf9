"""The actor pool and scheduler on the two-node test cluster, with a fake generator (no model)."""
from __future__ import annotations

import functools

import pytest

from factory import quality
from luna.cluster import connect
from factory.worker import ActorSpec, FactoryRunError, FactoryWorker, Scheduler, actor_specs, ray_actor_factory

SAMPLER = {"steps": 2, "cfg": 5.0, "scheduler": "euler", "width": 16, "height": 16, "batch_size": 2}


def make_tasks(checkpoints: dict[str, list[str]], units_per_ckpt: int, per_unit: int = 2) -> list[dict]:
    tasks = []
    for c, nodes in checkpoints.items():
        for u in range(units_per_ckpt):
            tasks.append({
                "unit_id": f"{c}-u{u}",
                "checkpoint": {"name": c, "paths": {n: f"/models/{n}/{c}.safetensors" for n in nodes}},
                "samples": [{"key": f"{c}_{u}_{i}", "prompt": f"p{i}", "negative": "", "seed": 100 * u + i}
                            for i in range(per_unit)],
                "sampler": SAMPLER, "image": {"format": "png"}, "quality": {"max_attempts": 3},
            })
    return tasks


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


def test_scheduler_places_units_on_holding_nodes_and_bounds_loads(ray_cluster, fakes):
    cluster = connect()
    assert {"pc1", "pc2"} <= set(cluster.nodes)
    ckpts = {"a": ["pc1"], "b": ["pc2"], "c": ["pc1", "pc2"]}
    tasks = make_tasks(ckpts, 3)
    specs = actor_specs(cluster.nodes, ["pc1", "pc2"], {"cpus_per_actor": 1})
    assert [s.node for s in specs] == ["pc1", "pc2"]
    make = ray_actor_factory(cluster, functools.partial(fakes.FakeGenerator))
    results = {}

    def on_result(task, result):
        assert task["unit_id"] not in results
        results[task["unit_id"]] = result

    stats = Scheduler(specs, make, max_retries=1).run(tasks, on_result)
    assert set(results) == {t["unit_id"] for t in tasks}
    for uid, r in results.items():
        assert r["node"] in ckpts[uid.split("-")[0]]
        assert len(r["samples"]) == 2
    assert stats.images == 18 and stats.rejected == 0
    assert stats.loads <= len(ckpts) + len(specs)


def test_dead_actor_unit_is_retried_elsewhere_without_duplicates(ray_cluster, fakes, tmp_path):
    cluster = connect()
    flag = tmp_path / "die"
    flag.write_text("1")
    tasks = make_tasks({"a": ["pc1", "pc2"]}, 6)
    specs = [ActorSpec("w0", "pc1"), ActorSpec("w1", "pc2")]
    make = ray_actor_factory(cluster, functools.partial(fakes.FakeGenerator, die_flag=str(flag)))
    seen = []
    stats = Scheduler(specs, make, max_retries=2, max_actor_restarts=0).run(tasks, lambda t, r: seen.append(r))
    assert stats.actors_died == 1 and stats.retries >= 1
    ids = [r["unit_id"] for r in seen]
    assert sorted(ids) == sorted(t["unit_id"] for t in tasks)  # every unit exactly once
    keys = [s["key"] for r in seen for s in r["samples"]]
    assert len(keys) == len(set(keys)) == 12
    # no replacement actor was allowed: everything after the death ran on the survivor
    assert {r["worker"] for r in seen} <= {"w0", "w1"}
    assert stats.loads <= 1 + len(specs) + stats.retries


def test_actor_specs_fractional_gpus():
    from luna.cluster import NodeInfo

    nodes = {"big": NodeInfo("big", "id", "h", 16, 2.0, True), "cpu": NodeInfo("cpu", "id2", "h2", 4, 0, True)}
    specs = actor_specs(nodes, ["big", "cpu"], {"gpus_per_actor": 0.5, "cpus_per_actor": 2})
    assert [s.node for s in specs].count("big") == 4 and all(s.num_gpus == 0.5 for s in specs if s.node == "big")
    cpu = [s for s in specs if s.node == "cpu"]
    assert len(cpu) == 1 and cpu[0].num_gpus == 0 and cpu[0].num_cpus == 2
    assert len({s.worker for s in specs}) == len(specs)
    with pytest.raises(KeyError):
        actor_specs(nodes, ["nope"], {})


def test_unit_failing_every_retry_stops_the_run_with_its_error(ray_cluster, fakes):
    cluster = connect()
    tasks = make_tasks({"a": ["pc1"]}, 2)
    tasks[1]["samples"][0]["prompt"] = "poison"
    make = ray_actor_factory(cluster, functools.partial(fakes.FakeGenerator, fail_prompts=["poison"]))
    done = []
    with pytest.raises(FactoryRunError, match=r"a-u1 failed 2 times.*cannot render this prompt"):
        Scheduler([ActorSpec("w0", "pc1")], make, max_retries=1).run(tasks, lambda t, r: done.append(t["unit_id"]))
    assert done == ["a-u0"]  # the good unit was delivered before the run stopped


def test_lost_node_gets_no_replacement_and_its_units_move(ray_cluster, fakes):
    import ray

    cluster = connect()
    tasks = make_tasks({"a": ["pc1", "pc2"]}, 6)
    dead: set = set()
    sched = Scheduler([ActorSpec("w0", "pc1"), ActorSpec("w1", "pc2")],
                      ray_actor_factory(cluster, functools.partial(fakes.FakeGenerator, delay_s=0.05)),
                      max_retries=3, node_alive=lambda node: node not in dead)
    seen = []

    def on_result(task, result):
        seen.append(result)
        if not dead:  # "pc2 goes away": its actor dies and the cluster no longer lists the node
            dead.add("pc2")
            victim = next(a for a in sched.actors if a.spec.node == "pc2")
            ray.kill(victim.handle, no_restart=True)

    stats = sched.run(tasks, on_result)
    assert sorted(r["unit_id"] for r in seen) == sorted(t["unit_id"] for t in tasks)
    assert stats.actors_started == 2 and sched.dead_nodes == {"pc2"}  # no replacement on the lost node
    assert {r["worker"] for r in seen} <= {"w0", "w1"} and stats.retries >= 1


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
