"""The scheduler: the pure placement choice (no Ray), then the actor pool on the two-node test cluster
with a fake generator (no model)."""
from __future__ import annotations

import functools

import pytest

from factory.errors import FactoryRunError
from factory.scheduler import ActorSpec, Placement, Scheduler, actor_specs
from factory.worker import ray_actor_factory
from luna.cluster import connect
from tests.factory.tasks import make_tasks


# --------------------------------------------------------------------------- the placement choice, pure


def _run_all(placement: Placement, workers: list[str]) -> dict[str, list[str]]:
    """Round-robin over `workers` until no one gets a task: unit ids each worker ran, in order."""
    ran: dict[str, list[str]] = {w: [] for w in workers}
    while True:
        progressed = False
        for w in workers:
            task = placement.next_task(w)
            if task is not None:
                ran[w].append(task["unit_id"])
                progressed = True
        if not progressed:
            return ran


def test_placement_keeps_each_actor_on_one_checkpoint_and_only_on_holding_nodes():
    tasks = make_tasks({"a": ["pc1"], "b": ["pc2"], "c": ["pc1", "pc2"]}, 4)
    placement = Placement(tasks, join_budget=0)
    placement.add_actor("w0", "pc1")
    placement.add_actor("w1", "pc2")
    ran = _run_all(placement, ["w0", "w1"])
    assert sorted(ran["w0"] + ran["w1"]) == sorted(t["unit_id"] for t in tasks)  # each unit exactly once
    assert not [u for u in ran["w0"] if u.startswith("b")] and not [u for u in ran["w1"] if u.startswith("a")]
    for w, units in ran.items():  # a checkpoint's units run back to back: one load per checkpoint switch
        ckpts = [u.split("-")[0] for u in units]
        switches = sum(1 for x, y in zip(ckpts, ckpts[1:]) if x != y)
        assert switches == len(set(ckpts)) - 1, (w, ckpts)
    assert placement.left() == []


def test_placement_joins_a_busy_checkpoint_only_within_the_budget():
    tasks = make_tasks({"a": ["pc1"]}, 6)
    for budget, expect_w1 in ((0, 0), (1, 3)):  # with the budget w1 joins, then both share the queue
        placement = Placement(tasks, join_budget=budget)
        placement.add_actor("w0", "pc1")
        placement.add_actor("w1", "pc1")
        first = placement.next_task("w0")
        assert first["unit_id"] == "a-u0" and placement.loaded["w0"] == "a"
        ran = _run_all(placement, ["w1", "w0"])
        assert len(ran["w1"]) == expect_w1 and len(ran["w1"]) + len(ran["w0"]) == 5
        assert placement.join_budget == 0


def test_placement_requeues_to_the_front_and_stops_after_max_retries():
    tasks = make_tasks({"a": ["pc1", "pc2"]}, 3)
    placement = Placement(tasks, max_retries=1)
    placement.add_actor("w0", "pc1")
    task = placement.next_task("w0")
    placement.requeue(task, "boom")
    assert placement.next_task("w0") is task  # retried before the units behind it
    with pytest.raises(FactoryRunError, match=r"a-u0 failed 2 times; last error: boom"):
        placement.requeue(task, "boom")


def test_placement_lost_node_moves_units_to_other_holders_or_leaves_them():
    tasks = make_tasks({"a": ["pc1", "pc2"], "b": ["pc2"]}, 2)
    placement = Placement(tasks)
    placement.add_actor("w1", "pc2")
    placement.add_actor("w0", "pc1")
    placement.drop_node("pc2")
    placement.remove_actor("w1")
    ran = _run_all(placement, ["w0"])
    assert ran["w0"] == ["a-u0", "a-u1"]
    assert placement.left() == ["b"]  # nobody alive holds b: the scheduler reports it
    placement.unload("w0")
    assert placement.loaded["w0"] is None


# --------------------------------------------------------------------------- actors on the cluster (Ray)


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


def test_placement_on_a_simulated_cluster_finishes_every_unit_near_the_bound():
    """benchmarks/scale_sim.py's virtual-clock cluster: the real planner and Placement, a node lost halfway."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "scale_sim.py"
    spec = importlib.util.spec_from_file_location("luna_scale_sim", path)
    sim = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("luna_scale_sim", sim)  # dataclasses look their module up there
    spec.loader.exec_module(sim)
    nodes = {"pc1": (1, 1.0), "pc2": (2, 0.8)}
    ckpts = sim.checkpoints(6, list(nodes))
    units = sim.plan(sim.campaign(480, 64, 4, 8), ckpts).units
    by_name = {c.name: c for c in ckpts}
    tasks = [sim._task(u, by_name[u.checkpoint], {}) for u in units]
    full = sim.simulate(tasks, nodes, load_s=8.0, inflight=2)
    assert full["units"] == len(tasks) and full["images"] == 480 and not full["left"]
    assert full["loads"] <= len(ckpts) + full["actors"]
    work = 480 * sim.seconds_per_image(tasks[0]["sampler"])
    assert work / 2.6 <= full["makespan"]  # no faster than the total speed allows
    lost = sim.simulate(tasks, nodes, load_s=8.0, inflight=2, lose=("pc2", full["makespan"] / 2))
    assert lost["units"] == len(tasks) and lost["images"] == 480 and lost["requeued"] > 0
    assert lost["alive"] == 1 and lost["makespan"] > full["makespan"]
