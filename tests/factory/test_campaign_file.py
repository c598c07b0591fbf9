"""The campaign file: shipped campaigns, wildcard folders, and every user error with its file, line and path."""
from __future__ import annotations

import re

import pytest

from factory.campaign_file import CAMPAIGNS_DIR, available_campaigns, load_campaign
from factory.errors import CampaignError
from tests.factory.campaign_texts import campaign_with, write


@pytest.mark.parametrize("name", available_campaigns())
def test_shipped_campaigns_load_and_render(name):
    assert {"facial_features", "hands", "backgrounds", "materials"} <= set(available_campaigns())
    c = load_campaign(name)
    assert c.source == CAMPAIGNS_DIR / f"{name}.yaml"
    for job in c.jobs:
        prompts = [c.draw(job, i).prompt for i in range(40)]
        assert all(p and "__" not in p and not re.search(r"[{}|]", p) for p in prompts), prompts
        assert len(set(prompts)) > 20, f"{name}/{job}: wildcard lists too poor"
        assert c.combinations(job) >= 50


def test_seed_002_campaign_jobs_are_shipped():
    """The four campaigns of seed 002 with its jobs and quotas (facial_features at demo size)."""
    expected = {
        "facial_features_full": {"eyes": 50000, "noses": 20000, "mouths": 30000, "ears": 10000,
                                 "faces_composite": 40000},
        "hands": {"open_palm": 15000, "fist": 10000, "pointing": 10000, "holding_objects": 25000},
        "backgrounds": {"landscapes": 30000, "interiors": 30000, "abstract": 20000, "sky_clouds": 20000},
        "materials": {"fabric": 20000, "metal": 15000, "skin": 25000, "hair": 20000},
    }
    for name, jobs in expected.items():
        c = load_campaign(name)
        assert {n: j.quota for n, j in c.jobs.items()} == jobs
        assert (c.sampler.width, c.sampler.height) == (336, 336)


# --------------------------------------------------------------------------- wildcard folders


def test_wildcards_folder_nested_files(tmp_path):
    wc = tmp_path / "wildcards"
    (wc / "animals" / "big").mkdir(parents=True)
    (wc / "animals" / "snakes.txt").write_text("# snakes\n\ncobra\n2::python\n  viper  \n")
    (wc / "animals" / "big" / "cats.txt").write_text("lion\n{snow|clouded} leopard\n")
    (wc / "mood.txt").write_text("__colors/warm__ and calm\n")
    c = load_campaign(write(tmp_path, """\
        campaign: t
        wildcards_dir: wildcards
        wildcards:
          colors: {warm: [red, amber]}
        jobs:
          j: {quota: 400, templates: ["__animals/snakes__ or __animals/big/cats__, __mood__"]}
        """))
    assert {"animals/snakes", "animals/big/cats", "mood", "colors/warm"} == set(c.wildcards)
    assert [t.text for t in c.wildcards["animals/snakes"]] == ["cobra", "python", "viper"]
    assert c.wildcards["animals/snakes"][1].weight == 2.0
    assert c.wildcards["animals/snakes"][2].line == 5
    seen = {s.choices["animals/snakes"] for s in c.draws("j")} | {s.choices["mood"] for s in c.draws("j")}
    assert {"cobra", "python", "viper", "red and calm", "amber and calm"} <= seen
    assert c.combinations("j") == 3 * 3 * 2


def test_wildcards_folder_errors_name_the_txt_file(tmp_path):
    wc = tmp_path / "wildcards"
    wc.mkdir()
    (wc / "a.txt").write_text("fine\n# comment\n__nope__ here\n")
    body = "campaign: t\nwildcards_dir: wildcards\njobs:\n  j: {quota: 1, templates: ['__a__']}\n"
    with pytest.raises(CampaignError) as e:
        load_campaign(write(tmp_path, body))
    assert e.value.file == str(wc / "a.txt") and e.value.line == 3 and e.value.path == "nope"
    (wc / "a.txt").write_text("# only comments\n\n")
    with pytest.raises(CampaignError, match="empty wildcard list") as e:
        load_campaign(write(tmp_path, body))
    assert e.value.file == str(wc / "a.txt")
    with pytest.raises(CampaignError, match="does not exist") as e:
        load_campaign(write(tmp_path, body.replace("wildcards_dir: wildcards", "wildcards_dir: missing")))
    assert e.value.line == 2


# --------------------------------------------------------------------------- errors


ERRORS = {
    # name: (yaml, expected line, expected path, message fragment)
    "undefined": ("campaign: t\nwildcards:\n  a: [red]\njobs:\n  j:\n    quota: 1\n"
                  "    templates: ['__a__ __eyes/colour__']\n", 7, "eyes/colour", "undefined wildcard"),
    "undefined_in_entry": ("campaign: t\nwildcards:\n  a: [red,\n      '__b__']\njobs:\n"
                           "  j: {quota: 1, templates: ['__a__']}\n", 4, "b", "undefined wildcard"),
    "cycle": ("campaign: t\nwildcards:\n  a: [red, '__b__']\n  b: [x, '__c__']\n  c: ['__a__ and more']\n"
              "  d: ['__c__']\njobs:\n  j: {quota: 1, templates: ['__d__']}\n", None, None, "reference cycle"),
    "self_cycle": ("campaign: t\nwildcards:\n  a: [red, 'big __a__']\njobs:\n  j: {quota: 1, templates: ['__a__']}\n",
                   3, "a", "reference cycle __a__ -> __a__"),
    "empty_list": ("campaign: t\nwildcards:\n  eyes:\n    color: []\njobs:\n  j: {quota: 1, templates: [x]}\n",
                   4, "eyes/color", "empty wildcard list"),
    "empty_null": ("campaign: t\nwildcards:\n  eyes:\n    color:\njobs:\n  j: {quota: 1, templates: [x]}\n",
                   4, "eyes/color", "empty wildcard list"),
    "unbalanced_open": ("campaign: t\nwildcards:\n  a: ['{red|blue']\njobs:\n  j: {quota: 1, templates: ['__a__']}\n",
                        3, "a", "unbalanced '{'"),
    "unbalanced_close": ("campaign: t\njobs:\n  j:\n    quota: 1\n    templates: ['red}']\n",
                         5, "jobs/j/templates", "unbalanced '}'"),
    "empty_option": ("campaign: t\njobs:\n  j:\n    quota: 1\n    templates: ['{red||blue}']\n",
                     5, "jobs/j/templates", "empty option"),
    "empty_braces": ("campaign: t\njobs:\n  j:\n    quota: 1\n    templates: ['a {} b']\n",
                     5, "jobs/j/templates", "empty option"),
    "bad_weight": ("campaign: t\njobs:\n  j:\n    quota: 1\n    templates: ['{x::red|blue}']\n",
                   5, "jobs/j/templates", "bad weight 'x'"),
    "negative_weight": ("campaign: t\nwildcards:\n  a: ['-1::red']\njobs:\n  j: {quota: 1, templates: ['__a__']}\n",
                        3, "a", "bad weight '-1'"),
    "all_zero": ("campaign: t\njobs:\n  j:\n    quota: 1\n    templates: ['{0::a|0::b}']\n",
                 5, "jobs/j/templates", "all weights are zero"),
    "unterminated_ref": ("campaign: t\nwildcards:\n  a: [x]\njobs:\n  j:\n    quota: 1\n"
                         "    templates: ['__a, red']\n", 7, "jobs/j/templates", "unterminated wildcard reference"),
    "group_ref": ("campaign: t\nwildcards:\n  eyes: {color: [blue]}\njobs:\n  j:\n    quota: 1\n"
                  "    templates: ['__eyes__']\n", 7, "eyes", "is a group"),
    "malformed_yaml": ("campaign: t\njobs:\n  j:\n    quota: 1\n   templates: [x]\n", 5, None, "malformed YAML"),
    "unclosed_flow": ("campaign: t\njobs: {j: {quota: 1, templates: [x]}\nseed: 3\n", None, None, "malformed YAML"),
    "missing_quota": ("campaign: t\njobs:\n  j:\n    templates: [x]\n", 3, "jobs/j", "missing quota"),
    "negative_quota": ("campaign: t\njobs:\n  j:\n    quota: -5\n    templates: [x]\n",
                       4, "jobs/j/quota", "must be >= 0"),
    "string_quota": ("campaign: t\njobs:\n  j:\n    quota: lots\n    templates: [x]\n",
                     4, "jobs/j/quota", "expected an integer"),
    "typo_quotas": ("campaign: t\njobs:\n  j:\n    quotas: 5\n    templates: [x]\n",
                    4, "jobs/j", "unknown key 'quotas' (did you mean 'quota'?)"),
    "typo_top": ("campaign: t\nwildcard:\n  a: [x]\njobs:\n  j: {quota: 1, templates: [x]}\n",
                 2, None, "did you mean 'wildcards'"),
    "typo_sampler": ("campaign: t\nsampler:\n  step: 3\njobs:\n  j: {quota: 1, templates: [x]}\n",
                     3, "sampler", "did you mean 'steps'"),
    "bad_scheduler": ("campaign: t\nsampler: {scheduler: eulerr}\njobs:\n  j: {quota: 1, templates: [x]}\n",
                      2, "sampler/scheduler", "unknown scheduler"),
    "bad_size": ("campaign: t\nsampler:\n  width: 330\njobs:\n  j: {quota: 1, templates: [x]}\n",
                 3, "sampler/width", "multiple of 8"),
    "duplicate_job": ("campaign: t\njobs:\n  j: {quota: 1, templates: [x]}\n  j: {quota: 2, templates: [y]}\n",
                      4, None, "duplicate key 'j'"),
    "no_jobs": ("campaign: t\nwildcards: {a: [x]}\n", None, "jobs", "needs 'jobs'"),
    "bad_name": ("campaign: my-faces\njobs:\n  j: {quota: 1, templates: [x]}\n", 1, "campaign", "campaign name"),
    "bad_job_name": ("campaign: t\njobs:\n  my.job: {quota: 1, templates: [x]}\n", 3, "jobs/my.job", "job name"),
    "bad_seed": ("campaign: t\njobs:\n  j: {quota: 1, templates: [x]}\nseed: {base: 1, mode: chaos}\n",
                 4, "seed/mode", "unknown seed mode"),
    "not_a_mapping": ("- just\n- a list\n", 1, None, "mapping at the top level"),
    "empty_file": ("", 1, None, "empty"),
    "huge_quota": ("campaign: t\njobs:\n  j:\n    quota: 1000000000\n    templates: [x]\n",
                   4, "jobs/j/quota", "split it into jobs"),
    "huge_seed": ("campaign: t\njobs:\n  j: {quota: 1, templates: [x]}\nseed: 99999999999999999999\n",
                  4, "seed", "below 2**63"),
    "python_tag": ("campaign: t\njobs: !!python/object:os.system {}\n", 2, None, "malformed YAML"),
    "two_documents": ("campaign: t\n---\ncampaign: u\n", 2, None, "malformed YAML"),
    "empty_template": ("campaign: t\njobs:\n  j: {quota: 1, templates: ['  ']}\n", 3, "jobs/j/templates", "empty"),
    # sampler_overrides rules (applied per checkpoint by the planner)
    "override_typo": ("campaign: t\njobs:\n  j: {quota: 1, templates: [x]}\nsampler_overrides:\n"
                      "  - {distillation: few-step, steps: 6}\n  - {family: noobai, cgf: 4.5}\n",
                      6, "sampler_overrides[1]", "unknown key 'cgf' (did you mean 'cfg'?)"),
    "override_no_selector": ("campaign: t\njobs:\n  j: {quota: 1, templates: [x]}\nsampler_overrides:\n"
                             "  - steps: 6\n    cfg: 1.5\n", 5, "sampler_overrides[0]", "selects no checkpoint"),
    "override_no_setting": ("campaign: t\njobs:\n  j: {quota: 1, templates: [x]}\nsampler_overrides:\n"
                            "  - {checkpoints: ['*turbo*']}\n", 5, "sampler_overrides[0]", "changes nothing"),
    "override_bad_steps": ("campaign: t\njobs:\n  j: {quota: 1, templates: [x]}\nsampler_overrides:\n"
                           "  - distillation: few-step\n    steps: 0\n", 6, "sampler_overrides[0]/steps", "must be >= 1"),
    "override_bad_scheduler": ("campaign: t\njobs:\n  j: {quota: 1, templates: [x]}\nsampler_overrides:\n"
                               "  - {family: pony, scheduler: lcm}\n", 5, "sampler_overrides[0]/scheduler",
                               "unknown scheduler 'lcm'"),
    "override_bad_spacing": ("campaign: t\njobs:\n  j: {quota: 1, templates: [x]}\nsampler_overrides:\n"
                             "  - {family: pony, timestep_spacing: trailng}\n", 5,
                             "sampler_overrides[0]/timestep_spacing", "did you mean 'trailing'"),
    "override_bad_distillation": ("campaign: t\njobs:\n  j: {quota: 1, templates: [x]}\nsampler_overrides:\n"
                                  "  - {distillation: lightning, steps: 4}\n", 5,
                                  "sampler_overrides[0]/distillation", "one of none, few-step"),
    "override_not_a_list": ("campaign: t\njobs:\n  j: {quota: 1, templates: [x]}\nsampler_overrides: {steps: 6}\n",
                            4, "sampler_overrides", "expected a list of rules"),
    "override_rule_not_mapping": ("campaign: t\njobs:\n  j: {quota: 1, templates: [x]}\nsampler_overrides:\n"
                                  "  - few-step\n", 5, "sampler_overrides[0]", "a rule is a mapping"),
    # repeats: each prompt on K checkpoints x S seeds
    "repeats_zero": ("campaign: t\njobs:\n  j: {quota: 4, templates: [x]}\nrepeats: {checkpoints: 0}\n",
                     4, "repeats/checkpoints", "must be >= 1"),
    "repeats_typo": ("campaign: t\njobs:\n  j: {quota: 4, templates: [x]}\nrepeats:\n  checkpoint: 2\n",
                     5, "repeats", "did you mean 'checkpoints'"),
    "repeats_quota": ("campaign: t\njobs:\n  j:\n    quota: 10\n    templates: [x]\nrepeats: {checkpoints: 3}\n",
                      4, "jobs/j/quota", "not a multiple of repeats"),
}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_bad_campaign_errors_name_file_line_and_path(tmp_path, name):
    text, line, path, fragment = ERRORS[name]
    p = write(tmp_path, text, f"{name}.yaml")
    with pytest.raises(CampaignError) as e:
        load_campaign(p)
    err = e.value
    msg = str(err)
    assert isinstance(err, ValueError)
    assert fragment in msg, msg
    assert err.file == str(p) and msg.startswith(str(p)), msg
    if line is not None:
        assert err.line == line and f"{p}:{line}" in msg, msg
    if path is not None:
        assert err.path == path and path in msg, msg


def test_cycle_error_names_the_whole_cycle(tmp_path):
    p = write(tmp_path, ERRORS["cycle"][0])
    with pytest.raises(CampaignError) as e:
        load_campaign(p)
    msg = str(e.value)
    for w in ("__a__", "__b__", "__c__"):
        assert w in msg
    assert e.value.line in (3, 4, 5) and e.value.path in ("a", "b", "c")


def test_unknown_campaign_name_lists_the_shipped_ones():
    with pytest.raises(CampaignError) as e:
        load_campaign("no_such_campaign")
    assert "facial_features" in str(e.value) and "hands" in str(e.value)


# --------------------------------------------------------------------------- hostile input, bounded


@pytest.mark.parametrize("shape", ["flow", "block", "braces"])
def test_ten_thousand_deep_nesting_fails_fast(tmp_path, shape):
    if shape == "flow":
        text = "campaign: t\njobs: " + "[" * 10000 + "]" * 10000 + "\n"
    elif shape == "block":
        # block nesting needs indentation: 10,000 levels would be 50 MB (refused by size), so 2,000
        text = "campaign: t\nwildcards:\n" + "".join(" " * (i + 1) + f"k{i}:\n" for i in range(2000)) + "jobs: {}\n"
    else:
        text = "campaign: t\njobs:\n  j: {quota: 1, templates: ['" + "{a|" * 10000 + "b" + "}" * 10000 + "']}\n"
    with pytest.raises(CampaignError, match="nested deeper") as e:
        load_campaign(write(tmp_path, text))
    assert e.value.line is not None


def test_oversized_file_is_refused_before_parsing(tmp_path):
    p = tmp_path / "big.yaml"
    p.write_text("campaign: t\n# " + "x" * (5 * 1024 * 1024) + "\n")
    with pytest.raises(CampaignError, match="larger than"):
        load_campaign(p)


def test_long_reference_chain_is_an_error_not_a_recursion_crash(tmp_path):
    lists = "".join(f"w{i}: ['__w{i + 1}__']\n" for i in range(2000)) + "w2000: [end]\n"
    with pytest.raises(CampaignError, match="nested deeper"):
        campaign_with(tmp_path, wildcards=lists, template="__w0__")


def test_exponential_expansion_is_refused(tmp_path):
    lists = "".join(f"w{i}: ['__w{i + 1}__ __w{i + 1}__']\n" for i in range(40)) + "w40: [x]\n"
    with pytest.raises(CampaignError, match="expand more than"):
        campaign_with(tmp_path, wildcards=lists, template="__w0__")


def test_yaml_alias_bomb_is_refused(tmp_path):
    lines = ["campaign: t", "wildcards:", "  l0: &l0 {a: [lol], b: [lol]}"]
    lines += [f"  l{i}: &l{i} {{a: *l{i - 1}, b: *l{i - 1}}}" for i in range(1, 40)]
    lines += ["jobs:", "  j: {quota: 1, templates: [x]}"]
    with pytest.raises(CampaignError, match="more than"):
        load_campaign(write(tmp_path, "\n".join(lines) + "\n"))


def test_mapping_input_for_hydra_configs():
    import yaml
    from omegaconf import OmegaConf

    path = CAMPAIGNS_DIR / "hands.yaml"
    cfg = OmegaConf.create(yaml.safe_load(path.read_text()))
    from_cfg = load_campaign(cfg, source=path)
    from_file = load_campaign("hands")
    assert [from_cfg.draw("fist", i) for i in range(5)] == [from_file.draw("fist", i) for i in range(5)]


def test_loading_and_planning_import_no_generation_stack():
    """The campaign file, its model and the planner are pure: validating a campaign (scheduler names
    included) loads neither diffusers, torch nor Ray, nor the worker module."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; from factory.campaign_file import load_campaign; from factory.planner import plan; "
            "c = load_campaign('hands'); c.draw('fist', 0); "
            "print(sorted(m for m in ('diffusers', 'torch', 'ray', 'factory.worker') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"
