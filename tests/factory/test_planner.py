"""Planner: balanced quotas, checkpoint-contiguous units, stable content ids, selection errors."""
from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from factory.campaign_file import load_campaign
from factory.errors import CampaignError
from factory.planner import WorkUnit, balance, plan, sample_key

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Ckpt:
    """Duck-typed stand-in for factory.inventory.CheckpointInfo."""
    name: str
    fingerprint: str
    te_fingerprint: str = "te-base"
    family: str = "sdxl"
    tags: list = field(default_factory=list)
    nodes: list = field(default_factory=lambda: ["pc1"])


def ckpts(n: int, **kw) -> list[Ckpt]:
    return [Ckpt(f"model_{i:02d}", f"fp{i:02d}", **kw) for i in range(n)]


def campaign_file(tmp_path: Path, body: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


MULTI = textwrap.dedent("""\
    campaign: multi
    wildcards:
      color: [red, green, blue, "{3::grey|violet}", amber, teal, pink]
      thing: [cup, ring, scarf, sword, apple]
    jobs:
      a: {quota: 24, templates: ["a __color__ __thing__"]}
      b: {quota: 13, templates: ["b __color__"], sampler: {batch_size: 3}}
      c: {quota: 2, templates: ["c __thing__"]}
    sampler: {steps: 4, width: 64, height: 64, batch_size: 4}
    checkpoints: {include: ["*"]}
    seed: 99
    """)


def switches(units) -> int:
    return sum(1 for i, u in enumerate(units) if i == 0 or u.fingerprint != units[i - 1].fingerprint)


# --------------------------------------------------------------------------- balancing


def test_balance_examples_and_properties():
    assert balance(24, 5) == [5, 5, 5, 5, 4]
    assert balance(12, 5, offset=4) == [3, 2, 2, 2, 3]
    for q in range(0, 60, 7):
        for n in range(1, 9):
            for off in range(n):
                b = balance(q, n, off)
                assert sum(b) == q and max(b) - min(b) <= 1 and len(b) == n


# --------------------------------------------------------------------------- plan properties


@pytest.mark.parametrize("n_ckpt", [1, 2, 5, 7])
def test_plan_covers_every_index_once_in_contiguous_checkpoint_blocks(tmp_path, n_ckpt):
    c = load_campaign(campaign_file(tmp_path, MULTI))
    p = plan(c, ckpts(n_ckpt))
    assert len(p) == c.total_quota == 39
    for job in c.jobs.values():
        idx = [s.index for u in p.units if u.job == job.name for s in u.samples]
        assert sorted(idx) == list(range(job.quota)), job.name  # each index exactly once
        per_ckpt = Counter(u.checkpoint for u in p.units if u.job == job.name for _ in u.samples)
        counts = sorted(per_ckpt.values())
        assert sum(counts) == job.quota
        if job.quota >= n_ckpt:  # balanced over every checkpoint
            assert len(per_ckpt) == n_ckpt and counts[-1] - counts[0] <= 1
    # all units of a checkpoint are contiguous: one pipeline load each
    order = [u.checkpoint for u in p.units]
    firsts = [o for i, o in enumerate(order) if i == 0 or o != order[i - 1]]
    assert len(firsts) == len(set(firsts)) == n_ckpt
    assert switches(p.units) == n_ckpt == p.summary()["checkpoint_loads"]
    for u in p.units:
        assert 1 <= len(u.samples) <= c.sampler_for(u.job).batch_size
        assert u.category == f"multi/{u.job}" and u.sampler == c.sampler_for(u.job)
        # a unit holds exactly the campaign's samples for its indices
        for s in u.samples:
            ref = c.draw(u.job, s.index)
            assert (s.prompt, s.negative, s.seed, s.choices) == (ref.prompt, ref.negative, ref.seed, ref.choices)


def test_plan_of_the_issue_example_over_five_checkpoints():
    c = load_campaign("facial_features")
    p = plan(c, ckpts(5))
    s = p.summary()
    assert s["total_images"] == len(p) == 36
    assert s["jobs"] == {"eyes": 24, "faces": 12}
    assert sorted(s["per_job_checkpoint"]["eyes"].values()) == [4, 5, 5, 5, 5]
    assert sum(s["checkpoints"].values()) == 36 and len(s["checkpoints"]) == 5
    prompts = [x.prompt for u in p.units for x in u.samples]
    assert s["unique_prompts"] == len(set(prompts))
    for name in s["checkpoints"]:
        units = p.units_for_checkpoint(name)
        assert units and all(u.checkpoint == name for u in units)
        assert sum(len(u) for u in units) == s["checkpoints"][name]


def test_quota_smaller_than_checkpoint_count(tmp_path):
    c = load_campaign(campaign_file(tmp_path, MULTI))
    p = plan(c, ckpts(7))
    used = {u.checkpoint for u in p.units if u.job == "c"}
    assert len(used) == 2  # 2 images: two checkpoints, one each
    # the remainders of successive jobs go to different checkpoints, so totals stay balanced
    totals = sorted(p.summary()["checkpoints"].values())
    assert totals[-1] - totals[0] <= 1


def test_keys_are_unique_dot_free_and_stable(tmp_path):
    c = load_campaign(campaign_file(tmp_path, MULTI))
    keys = [s.key for u in plan(c, ckpts(3)).units for s in u.samples]
    assert len(set(keys)) == len(keys) == 39
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", k) for k in keys)
    assert keys == [s.key for u in plan(c, ckpts(3)).units for s in u.samples]
    assert sample_key("my camp", "j.k", 7) == "my-camp_j-k_000007"


# --------------------------------------------------------------------------- unit ids


def test_unit_ids_are_stable_across_runs_and_processes(tmp_path):
    path = campaign_file(tmp_path, MULTI)
    ids = [u.id for u in plan(load_campaign(path), ckpts(3)).units]
    assert len(set(ids)) == len(ids)
    assert ids == [u.id for u in plan(load_campaign(path), ckpts(3)).units]
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_planner import ckpts
        from factory.campaign_file import load_campaign
        from factory.planner import plan
        print(json.dumps([u.id for u in plan(load_campaign(sys.argv[1]), ckpts(3)).units]))
    """)
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": "4242", "PATH": "/usr/bin:/bin"}).stdout
    assert json.loads(out) == ids


@pytest.mark.parametrize("change", ["fingerprint", "te_fingerprint", "seed", "steps", "wildcards", "negative"])
def test_unit_ids_change_with_content(tmp_path, change):
    base = plan(load_campaign(campaign_file(tmp_path, MULTI)), ckpts(3))
    body, cks = MULTI, ckpts(3)
    if change == "fingerprint":
        cks[0].fingerprint = "other"
    elif change == "te_fingerprint":
        cks[0].te_fingerprint = "pony-te"
    elif change == "seed":
        body = body.replace("seed: 99", "seed: 100")
    elif change == "steps":
        body = body.replace("steps: 4", "steps: 5")
    elif change == "wildcards":
        body = body.replace("thing: [cup,", "thing: [mug,")
    elif change == "negative":
        body = body.replace("seed: 99", "seed: 99\nnegative_prompt: lowres")
    other = plan(load_campaign(campaign_file(tmp_path, body, "other.yaml")), cks)
    changed = {u.id for u in base.units} - {u.id for u in other.units}
    if change in ("fingerprint", "te_fingerprint"):
        # only the units of the changed checkpoint (model_00) get new ids
        assert changed == {u.id for u in base.units_for_checkpoint("model_00")}
    elif change == "wildcards":
        moved = {u.id for u in base.units if any("cup" in s.prompt for s in u.samples)}
        assert moved and moved <= changed and len(changed) < len(base.units)
    else:
        assert changed == {u.id for u in base.units}


# --------------------------------------------------------------------------- selection


def test_selection_by_globs_tags_and_families(tmp_path):
    body = MULTI.replace('checkpoints: {include: ["*"]}',
                         'checkpoints: {include: ["real*", "anime*"], exclude: ["*_old"], tags: [photo, anime]}')
    c = load_campaign(campaign_file(tmp_path, body))
    inv = [Ckpt("realvis", "f1", tags=["photo"]), Ckpt("realvis_old", "f2", tags=["photo"]),
           Ckpt("anime_x", "f3", tags=["anime"]), Ckpt("anime_y", "f4", tags=[]),
           Ckpt("juggernaut", "f5", tags=["photo"])]
    p = plan(c, inv)
    assert [x.name for x in p.checkpoints] == ["anime_x", "realvis"]
    assert {u.checkpoint for u in p.units} == {"anime_x", "realvis"}
    fam = MULTI.replace('checkpoints: {include: ["*"]}', "checkpoints: {families: [pony]}")
    c2 = load_campaign(campaign_file(tmp_path, fam, "fam.yaml"))
    inv2 = [Ckpt("a", "f1", family="sdxl"), Ckpt("b", "f2", family="pony")]
    assert [x.name for x in plan(c2, inv2).checkpoints] == ["b"]


def test_no_checkpoint_matched_lists_what_is_available(tmp_path):
    body = MULTI.replace('checkpoints: {include: ["*"]}', 'checkpoints:\n  include: ["pony*"]')
    path = campaign_file(tmp_path, body)
    c = load_campaign(path)
    with pytest.raises(CampaignError) as e:
        plan(c, ckpts(3))
    msg = str(e.value)
    assert "no checkpoint matched" in msg and "pony*" in msg
    assert all(f"model_{i:02d}" in msg for i in range(3))
    assert e.value.file == str(path) and e.value.line == 10 and e.value.path == "checkpoints"
    with pytest.raises(CampaignError, match="inventory is empty"):
        plan(c, [])


def test_same_file_under_two_names_is_generated_once(tmp_path):
    c = load_campaign(campaign_file(tmp_path, MULTI))
    p = plan(c, [Ckpt("a", "same"), Ckpt("b", "same"), Ckpt("c", "other")])
    assert [x.name for x in p.checkpoints] == ["a", "c"] and p.notes
    assert len(p) == c.total_quota


# --------------------------------------------------------------------------- units as data


def test_work_units_pickle_and_round_trip_json(tmp_path):
    c = load_campaign(campaign_file(tmp_path, MULTI))
    units = plan(c, ckpts(2, nodes=["pc1", "pc2"])).units
    for u in units:
        assert pickle.loads(pickle.dumps(u)) == u
        d = json.loads(json.dumps(u.to_dict()))
        assert WorkUnit.from_dict(d) == u
        assert d["nodes"] == ["pc1", "pc2"] and d["sampler"]["width"] == 64
        assert set(d["samples"][0]) >= {"index", "key", "prompt", "negative", "seed", "template", "choices"}


def test_summary_estimate_and_text(tmp_path):
    c = load_campaign(campaign_file(tmp_path, MULTI))
    p = plan(c, ckpts(3), seconds_per_image=2.0, workers=2)
    s = p.summary()
    # images x seconds per image, plus one ~10 s load per checkpoint, over the workers
    assert s["estimated_seconds"] == pytest.approx((39 * 2.0 + 3 * 10.0) / 2)
    assert s["seconds_per_image_measured"] and s["units"] == len(p.units)
    assert p.remaining([u.id for u in p.units[:4]]) == p.units[4:]
    text = p.format_summary()
    for fragment in ("39 images", "multi/a", "multi/b", "model_00", "unique prompts", "estimated time", "54.0s"):
        assert fragment in text, text
    assert plan(c, ckpts(3)).summary()["estimated_seconds"] > 0  # default rough estimate
