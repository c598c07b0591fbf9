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
from factory.planner import WorkUnit, balance, plan, reassign, sample_key

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
    prediction: str = "epsilon"
    distillation: str = "none"


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


# --------------------------------------------------------------------------- sampler_overrides


OVERRIDES = textwrap.dedent("""\
    campaign: fast
    wildcards:
      color: [red, green, blue, amber, teal]
    jobs:
      a: {quota: 12, templates: ["a __color__ cup"]}
    sampler: {steps: 20, cfg: 6.0, width: 64, height: 64, batch_size: 4}
    sampler_overrides:
      - {distillation: few-step, steps: 6, cfg: 1.5, scheduler: euler, timestep_spacing: trailing}
      - {checkpoints: ["*turbo*"], steps: 2, cfg: 1.0}
      - {family: noobai, cfg: 4.5}
    """)


def test_sampler_overrides_are_resolved_per_checkpoint(tmp_path):
    c = load_campaign(campaign_file(tmp_path, OVERRIDES))
    cks = [Ckpt("plain", "fp0"), Ckpt("fastLightning", "fp1", distillation="few-step"),
           Ckpt("sdxl_turbo", "fp2", distillation="few-step"), Ckpt("noob", "fp3", family="noobai")]
    p = plan(c, cks)
    got = {u.checkpoint: u.sampler for u in p.units}
    assert (got["plain"].steps, got["plain"].cfg, got["plain"].timestep_spacing) == (20, 6.0, None)
    assert (got["fastLightning"].steps, got["fastLightning"].cfg, got["fastLightning"].timestep_spacing) == (6, 1.5, "trailing")
    # rules apply in order: the few-step rule, then the turbo glob over it
    assert (got["sdxl_turbo"].steps, got["sdxl_turbo"].cfg, got["sdxl_turbo"].timestep_spacing) == (2, 1.0, "trailing")
    assert (got["noob"].steps, got["noob"].cfg) == (20, 4.5)
    assert len(p) == 12 and not p.skipped
    text = p.format_summary()
    assert "6 steps, cfg 1.5, euler trailing" in text and "2 steps, cfg 1, euler trailing" in text, text
    # the unit id follows the resolved settings; a plan without any override keeps its old ids
    plain_units = [u for u in p.units if u.checkpoint == "plain"]
    assert "timestep_spacing" not in plain_units[0].sampler.to_dict()
    for u in p.units:
        assert WorkUnit.from_dict(json.loads(json.dumps(u.to_dict()))) == u


def test_uncovered_few_step_checkpoint_is_skipped_with_the_reason(tmp_path):
    body = OVERRIDES.split("sampler_overrides:")[0] + "sampler_overrides:\n  - {family: noobai, cfg: 4.5}\n"
    c = load_campaign(campaign_file(tmp_path, body))
    cks = [Ckpt("plain", "fp0"), Ckpt("fastLightning", "fp1", distillation="few-step"),
           Ckpt("vpredZ", "fp2", prediction="v+ztsnr")]
    p = plan(c, cks)
    assert {u.checkpoint for u in p.units} == {"plain", "vpredZ"}  # never run with the defaults
    assert len(p) == 12  # the quota goes to the checkpoints that can run it
    assert "few-step distilled" in p.skipped["fastLightning"] and "sampler_overrides" in p.skipped["fastLightning"]
    assert p.summary()["skipped_checkpoints"] == p.skipped
    assert "skipped checkpoint fastLightning: checkpoint 'fastLightning' is few-step distilled" in p.format_summary()
    # a v+ztsnr checkpoint under a scheduler that cannot rescale to zero terminal SNR: skipped too
    heun = load_campaign(campaign_file(tmp_path, body.replace("batch_size: 4}", "batch_size: 4, scheduler: heun}"),
                                       "heun.yaml"))
    p2 = plan(heun, cks)
    assert {u.checkpoint for u in p2.units} == {"plain"} and "cannot rescale" in p2.skipped["vpredZ"]
    with pytest.raises(CampaignError, match="every selected checkpoint was skipped: fastLightning: .*few-step") as e:
        plan(c, [cks[1]])
    assert e.value.line == 7 and e.value.path == "sampler_overrides"


# --------------------------------------------------------------------------- repeats


REPEATS = textwrap.dedent("""\
    campaign: rep
    wildcards:
      color: [red, green, blue, amber, teal, pink, grey, violet, black, white]
      thing: [cup, ring, scarf, sword, apple, boot, lamp]
    jobs:
      a: {quota: 40, templates: ["a __color__ __thing__"]}
      b: {quota: 14, templates: ["b __color__"], sampler: {batch_size: 3}}
    sampler: {steps: 4, width: 64, height: 64, batch_size: 4}
    repeats: {checkpoints: 2, seeds: 1}
    seed: 5
    """)


def test_repeats_render_each_prompt_on_k_checkpoints_of_other_families(tmp_path):
    c = load_campaign(campaign_file(tmp_path, REPEATS))
    cks = [Ckpt("base_a", "fp0", te_fingerprint="te-base", family="base"),
           Ckpt("base_b", "fp1", te_fingerprint="te-base", family="base"),
           Ckpt("pony_a", "fp2", te_fingerprint="te-pony", family="pony")]
    p = plan(c, cks)
    assert len(p) == 54 and Counter(u.job for u in p.units for _ in u.samples) == {"a": 40, "b": 14}
    family = {ck.name: ck.family for ck in cks}
    per_prompt: dict = {}
    for u in p.units:
        for s in u.samples:
            per_prompt.setdefault((u.job, s.prompt_index), []).append((u.checkpoint, s))
    assert len(per_prompt) == 20 + 7  # quota / (2 checkpoints x 1 seed) prompts per job
    for (job, pi), rows in per_prompt.items():
        names = [n for n, _ in rows]
        assert len(names) == 2 and len(set(names)) == 2  # exactly two different checkpoints
        assert {family[n] for n in names} == {"base", "pony"}  # and two families
        assert len({s.prompt for _, s in rows}) == 1 and len({s.seed for _, s in rows}) == 1
        assert rows[0][1].prompt == c.draw(job, pi).prompt
    keys = [s.key for u in p.units for s in u.samples]
    assert len(set(keys)) == len(keys) == 54
    # the only pony checkpoint renders every prompt; the two base ones share the other half
    assert p.summary()["checkpoints"] == {"base_a": 14, "base_b": 13, "pony_a": 27}
    s = p.summary()
    assert s["unique_prompts"] <= 27 and s["replication"]["a"] == {
        "prompts": 20, "checkpoints_per_prompt": (2, 2), "families_per_prompt": (2, 2)}
    text = p.format_summary()
    assert ("repeats rep/a: 20 prompts x 2 checkpoints x 1 seeds = 40 images; checkpoints per prompt 2, "
            "text-encoder families per prompt 2") in text, text
    # storage: one conditioning per (prompt, text encoders): 2 per prompt here (two families)
    st = s["storage"]
    assert st["conditionings"] == len({(x.prompt, u.te_fingerprint) for u in p.units for x in u.samples}) <= 54
    assert st["bytes"] < st["bytes_one_image_per_prompt"] or st["conditionings"] == 54
    assert "storage estimate" in text and "at one image per prompt" in text
    # units stay checkpoint-contiguous and within batch_size
    assert switches(p.units) == 3 and all(len(u) <= u.sampler.batch_size for u in p.units)


def test_repeats_seeds_and_one_family(tmp_path):
    body = REPEATS.replace("repeats: {checkpoints: 2, seeds: 1}", "repeats: {checkpoints: 2, seeds: 2}").replace(
        "quota: 14", "quota: 12")
    c = load_campaign(campaign_file(tmp_path, body))
    p = plan(c, ckpts(3))  # one family: spread by load only
    per_prompt: dict = {}
    for u in p.units:
        for s in u.samples:
            per_prompt.setdefault((u.job, s.prompt_index), []).append((u.checkpoint, s.seed_index, s.seed))
    assert len(per_prompt) == 10 + 3
    for (job, pi), rows in per_prompt.items():
        # two checkpoints, each with the prompt's same two seeds (0 = the draw's own, 1 = derived)
        assert set(Counter(n for n, _, _ in rows).values()) == {2} and len({n for n, _, _ in rows}) == 2
        assert len({seed for _, _, seed in rows}) == 2
        assert {seed for _, si, seed in rows if si == 0} == {c.draw(job, pi).seed}
    counts = p.summary()["checkpoints"]
    assert sum(counts.values()) == 52 and max(counts.values()) - min(counts.values()) <= 2  # balanced by load
    assert p.summary()["replication"]["b"]["families_per_prompt"] == (1, 1)
    with pytest.raises(CampaignError, match="repeats.checkpoints=2 .* only 1 can be used") as e:
        plan(c, ckpts(1))
    assert e.value.line == 9


def test_reassign_moves_samples_to_healthy_checkpoints(tmp_path):
    c = load_campaign(campaign_file(tmp_path, REPEATS))
    cks = [Ckpt("base_a", "fp0", te_fingerprint="te-base", family="base"),
           Ckpt("base_b", "fp1", te_fingerprint="te-base", family="base"),
           Ckpt("pony_a", "fp2", te_fingerprint="te-pony", family="pony")]
    p = plan(c, cks)
    moved = {}
    for u in p.units_for_checkpoint("base_a"):
        moved.setdefault(u.job, []).extend(u.samples)
    units = reassign(p, moved, {"base_a"})
    assert sorted(s.key for u in units for s in u.samples) == sorted(s.key for ss in moved.values() for s in ss)
    # the pony checkpoint already renders each of these prompts: they go to the other base one
    assert {u.checkpoint for u in units} == {"base_b"}
    assert reassign(p, moved, {"base_a"}) == units  # deterministic: same ids
    assert reassign(p, moved, {"base_a", "base_b", "pony_a"}) == []
