"""The poison guard in the driver, without Ray: the real plan, placement, actor body (FactoryWorker with a
fake generator), guard and shard writer, driven by the same loop as the scheduler (one unit in flight per
actor); a checkpoint whose generator only makes flat images is stopped and the other fills the quota."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from factory import shards
from factory.campaign_file import load_campaign
from factory.errors import FactoryError
from factory.inventory import CheckpointInfo
from factory.planner import plan
from factory.run import RunReport, ShardSink, _task, prepare_units, record_path
from factory.scheduler import Placement
from factory.worker import FactoryWorker

CAMPAIGN = """\
campaign: guard
wildcards:
  color: [blue eyes, green eyes, amber eyes, grey eyes]
  light: [soft light, rim light, golden hour]
jobs:
  eyes: {quota: 12, templates: ["closeup of __color__, __light__"]}
  faces: {quota: 8, templates: ["portrait with __color__"]}
sampler: {steps: 2, width: 16, height: 16, batch_size: 2}
seed: 7
"""
CFG = {"image": {"format": "png", "encode_threads": 0},
       "quality": {"max_attempts": 2, "poison_rate": 0.2, "poison_window": 2}}


def _ckpts() -> dict:
    base = CheckpointInfo(name="good-base", paths={"pc1": "/models/good-base.safetensors"}, fingerprint="fp-good",
                          te_fingerprint="te-base", family="base", tags=[], format="single_file")
    pony = CheckpointInfo(name="flat-pony", paths={"pc2": "/models/flat-pony.safetensors"}, fingerprint="fp-flat",
                          te_fingerprint="te-pony", family="pony", tags=[], format="single_file")
    return {c.name: c for c in (base, pony)}


def _setup(tmp_path: Path):
    """(checkpoints, the guard campaign's plan, an output folder with its shards/ folder)."""
    camp = tmp_path / "guard.yaml"
    camp.write_text(CAMPAIGN)
    ckpts = _ckpts()
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    return ckpts, plan(load_campaign(camp), list(ckpts.values())), out


def _drive(pending, watch, ckpts, out: Path, gen, cfg: dict = CFG) -> RunReport:
    """What Scheduler.run does with one unit in flight per actor: next task, run, sink, guard."""
    index = shards.scan(out / "shards", "guard")
    sink = ShardSink(out / "shards", "guard", watch.units, index.next_seq, watch.report)
    placement = Placement([_task(u, ckpts[u.checkpoint], cfg) for u in pending], join_budget=0)
    actors = {"w0": FactoryWorker("w0", "pc1", gen), "w1": FactoryWorker("w1", "pc2", gen)}
    for w, a in actors.items():
        placement.add_actor(w, a.node)
    watch.ran = []
    while True:
        progressed = False
        for w, actor in actors.items():
            task = placement.next_task(w)
            if task is None:
                continue
            progressed = True
            result = actor.run(task)
            watch.ran.append(task["checkpoint"]["name"])
            sink(task, result)
            placement.add(watch(task, result, placement.drop))
        if not progressed:
            break
    sink.flush()
    return watch.report


def test_flat_checkpoint_is_stopped_and_the_other_fills_the_quota(tmp_path, fakes):
    ckpts, the_plan, out = _setup(tmp_path)
    assert {u.checkpoint for u in the_plan.units} == {"good-base", "flat-pony"} and len(the_plan) == 20
    gen = functools.partial(fakes.FakeGenerator, flat_paths=["flat-pony"])
    lines: list[str] = []
    report = RunReport(campaign="guard")
    index = shards.scan(out / "shards", "guard")
    pending, watch = prepare_units(the_plan, ckpts, index, out, CFG, report, lines.append)
    _drive(pending, watch, ckpts, out, gen)

    metas = [json.loads(s["json"]) for t in shards.complete_shards(out / "shards", "guard") for s in shards.read_shard(t)]
    keys = [m["key"] for m in metas]
    assert len(keys) == 20 and len(set(keys)) == 20  # the whole quota, each key once
    assert set(keys) == {s.key for u in the_plan.units for s in u.samples}
    assert {m["checkpoint"] for m in metas} == {"good-base"}  # no flat image kept
    # stopped after its window of 2 units; its 3 queued units never ran
    assert watch.ran.count("flat-pony") == 2 and len(the_plan.units_for_checkpoint("flat-pony")) == 5
    assert list(report.poisoned) == ["flat-pony"] and report.moved_samples == 10 and report.unrendered == 0
    assert any(line.startswith("stopped checkpoint flat-pony: 8 of 8 images failed the quality gate (flat 8) over "
                               "its first 2 unit(s): 100% > quality.poison_rate 20%") for line in lines), lines
    record = json.loads(record_path(out, "guard").read_text())
    assert set(record["poisoned"]) == {"flat-pony"} and record["poisoned"]["flat-pony"]["fingerprint"] == "fp-flat"
    assert record["poisoned"]["flat-pony"]["rate"] == 1.0
    assert sum(len(u["samples"]) for u in record["moved_units"]) == 10
    assert {u["checkpoint"] for u in record["moved_units"]} == {"good-base"}

    # a rerun: the checkpoint stays stopped, every unit is done, nothing is moved twice
    lines.clear()
    again = RunReport(campaign="guard")
    pending2, watch2 = prepare_units(the_plan, ckpts, shards.scan(out / "shards", "guard"), out, CFG, again,
                                     lines.append)
    assert pending2 == [] and list(again.poisoned) == ["flat-pony"]
    assert any("stopped by the poison guard in an earlier run" in line for line in lines)
    assert len(json.loads(record_path(out, "guard").read_text())["moved_units"]) == len(record["moved_units"])


def test_killed_before_the_moved_units_ran_resumes_them(tmp_path, fakes):
    """The record holds the moved units: a driver killed right after the stop resumes them, not the flat ones."""
    ckpts, the_plan, out = _setup(tmp_path)
    gen = functools.partial(fakes.FakeGenerator, flat_paths=["flat-pony"])
    report = RunReport(campaign="guard")
    pending, watch = prepare_units(the_plan, ckpts, shards.scan(out / "shards", "guard"), out, CFG, report,
                                   lambda line: None)
    # only the flat checkpoint's first two units run (and are written), then the driver "dies"
    sink = ShardSink(out / "shards", "guard", watch.units, 0, report)
    actor = FactoryWorker("w1", "pc2", gen)
    for u in the_plan.units_for_checkpoint("flat-pony")[:2]:
        task = _task(u, ckpts[u.checkpoint], CFG)
        result = actor.run(task)
        sink(task, result)
        watch(task, result, lambda name: [])  # queue not known here: the dropped units are moved on the rerun
    assert list(report.poisoned) == ["flat-pony"]
    report2 = RunReport(campaign="guard")
    pending2, watch2 = prepare_units(the_plan, ckpts, shards.scan(out / "shards", "guard"), out, CFG, report2,
                                     lambda line: None)
    assert {u.checkpoint for u in pending2} == {"good-base"}
    _drive(pending2, watch2, ckpts, out, gen)
    keys = [json.loads(s["json"])["key"] for t in shards.complete_shards(out / "shards", "guard")
            for s in shards.read_shard(t)]
    assert sorted(keys) == sorted({s.key for u in the_plan.units for s in u.samples})


def _run_with(tmp_path, fakes, agreement) -> tuple[RunReport, list[dict], list[str]]:
    tmp_path.mkdir()
    ckpts, the_plan, out = _setup(tmp_path)
    cfg = {**CFG, "quality": {**CFG["quality"], "agreement": agreement}}
    lines: list[str] = []
    report = RunReport(campaign="guard")
    pending, watch = prepare_units(the_plan, ckpts, shards.scan(out / "shards", "guard"), out, cfg, report,
                                   lines.append)
    _drive(pending, watch, ckpts, out, fakes.FakeGenerator, cfg)
    metas = [json.loads(s["json"]) for t in shards.complete_shards(out / "shards", "guard") for s in shards.read_shard(t)]
    return report, metas, lines


def test_agreement_below_min_score_stops_checkpoints_and_scores_reach_the_metadata(tmp_path, fakes):
    """The tiny preset's tower (it has a text side) as the agreement tower, through the driver's task dicts."""
    report, metas, lines = _run_with(tmp_path / "low", fakes, {"vision": "tiny", "min_score": -1.0, "device": "cpu"})
    assert len(metas) == 20 and not report.poisoned and report.rejected == 0
    assert all(-1.0 <= m["quality"]["agreement"] <= 1.0 for m in metas)
    assert len({m["quality"]["agreement"] for m in metas}) > 1  # a score per image, not a constant

    report, metas, lines = _run_with(tmp_path / "high", fakes, {"vision": "tiny", "min_score": 1.0, "device": "cpu"})
    assert metas == [] and set(report.poisoned) == {"good-base", "flat-pony"}
    assert set(report.rejected_reasons) == {"agreement"}  # counted by kind, not by score
    assert any(line.startswith("stopped checkpoint good-base: 8 of 8 images failed the quality gate (agreement 8)")
               for line in lines), lines


def test_deleting_the_record_after_a_stop_renders_nothing_twice(tmp_path, fakes):
    """docs/factory.md: delete the record to give a stopped checkpoint another chance; what the healthy
    checkpoint already rendered for it stays, so the rerun has nothing left and refuses nothing."""
    ckpts, the_plan, out = _setup(tmp_path)
    gen = functools.partial(fakes.FakeGenerator, flat_paths=["flat-pony"])
    pending, watch = prepare_units(the_plan, ckpts, shards.scan(out / "shards", "guard"), out, CFG,
                                   RunReport(campaign="guard"), lambda line: None)
    _drive(pending, watch, ckpts, out, gen)
    record_path(out, "guard").unlink()
    lines: list[str] = []
    again = RunReport(campaign="guard")
    pending2, _ = prepare_units(the_plan, ckpts, shards.scan(out / "shards", "guard"), out, CFG, again, lines.append)
    assert pending2 == [] and not again.poisoned and again.skipped_units == len(the_plan.units)
    assert any("changed since their samples were rendered" in line for line in lines), lines


def _plan_of(tmp_path: Path, text: str, ckpts: dict):
    camp = tmp_path / "edited.yaml"
    camp.write_text(text)
    return plan(load_campaign(camp), list(ckpts.values()))


def test_editing_a_list_after_a_partial_run_resumes_the_rest(tmp_path, fakes):
    ckpts, the_plan, out = _setup(tmp_path)
    pending, watch = prepare_units(the_plan, ckpts, shards.scan(out / "shards", "guard"), out, CFG,
                                   RunReport(campaign="guard"), lambda line: None)
    _drive(pending[:3], watch, ckpts, out, fakes.FakeGenerator)  # interrupted after three units
    first = {json.loads(s["json"])["key"]: json.loads(s["json"])["prompt"]
             for t in shards.complete_shards(out / "shards", "guard") for s in shards.read_shard(t)}
    edited = _plan_of(tmp_path, CAMPAIGN.replace("amber eyes", "hazel eyes"), ckpts)
    assert {u.id for u in edited.units[:3]} != {u.id for u in the_plan.units[:3]}  # their prompts changed
    pending2, watch2 = prepare_units(edited, ckpts, shards.scan(out / "shards", "guard"), out, CFG,
                                     RunReport(campaign="guard"), lambda line: None)
    assert {s.key for u in pending2 for s in u.samples} == {s.key for u in edited.units for s in u.samples} - set(first)
    _drive(pending2, watch2, ckpts, out, fakes.FakeGenerator)
    metas = [json.loads(s["json"]) for t in shards.complete_shards(out / "shards", "guard") for s in shards.read_shard(t)]
    keys = [m["key"] for m in metas]
    assert len(keys) == 20 and len(set(keys)) == 20  # the whole quota, each key once
    assert {m["key"]: m["prompt"] for m in metas if m["key"] in first} == first  # rendered samples are kept


def test_units_cut_differently_from_the_shards_are_refused_with_the_cause(tmp_path, fakes):
    ckpts, the_plan, out = _setup(tmp_path)
    pending, watch = prepare_units(the_plan, ckpts, shards.scan(out / "shards", "guard"), out, CFG,
                                   RunReport(campaign="guard"), lambda line: None)
    _drive(pending[:1], watch, ckpts, out, fakes.FakeGenerator)  # one unit of 2 samples
    regrouped = _plan_of(tmp_path, CAMPAIGN.replace("batch_size: 2", "batch_size: 3"), ckpts)
    with pytest.raises(FactoryError, match=r"partly in .*shards already .*: 2 of its 3 keys, .*cuts the samples into "
                                           r"units differently .*batch_size"):
        prepare_units(regrouped, ckpts, shards.scan(out / "shards", "guard"), out, CFG, RunReport(campaign="guard"),
                      lambda line: None)
