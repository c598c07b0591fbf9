"""Campaign engine: syntax, deterministic sampling, weights, quotas, and every user error with its line."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from factory.campaign import (CAMPAIGN_DIR, CampaignError, available_campaigns, load_campaign,
                              parse_template)

REPO = Path(__file__).resolve().parents[2]

# The issue's example, verbatim ("this exact file must work").
ISSUE_YAML = """\
campaign: facial_features
wildcards:
  eyes:
    color: [blue eyes, green eyes, "{amber|hazel} eyes", "{3::grey|violet} eyes"]
    detail: [detailed iris, macro photo of an eye, glowing cyberpunk eyes]
  lighting: [soft studio lighting, dramatic rim light, golden hour]
jobs:
  eyes:
    quota: 24
    templates: ["closeup of __eyes/color__, __eyes/detail__, __lighting__"]
  faces:
    quota: 12
    templates: ["portrait of a person with __eyes/color__, __lighting__"]
negative_prompt: "blurry, lowres"
sampler: {steps: 4, cfg: 5.0, scheduler: euler, width: 64, height: 64, batch_size: 4}
checkpoints: {include: ["*"]}
seed: 1234
"""

EYE_COLORS = {"blue eyes", "green eyes", "amber eyes", "hazel eyes", "grey eyes", "violet eyes"}


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def campaign_with(tmp_path: Path, wildcards: str = "", template: str = "x", quota: int = 10, extra: str = ""):
    body = "campaign: t\n"
    if wildcards:
        body += "wildcards:\n" + textwrap.indent(textwrap.dedent(wildcards), "  ")
    body += f"jobs:\n  j:\n    quota: {quota}\n    templates: [{json.dumps(template)}]\n" + extra
    return load_campaign(write(tmp_path, body))


# --------------------------------------------------------------------------- the issue's file


def test_issue_example_loads_exactly(tmp_path):
    c = load_campaign(write(tmp_path, ISSUE_YAML))
    assert c.name == "facial_features"
    assert {n: j.quota for n, j in c.jobs.items()} == {"eyes": 24, "faces": 12}
    assert sorted(c.wildcards) == ["eyes/color", "eyes/detail", "lighting"]
    s = c.sampler
    assert (s.steps, s.cfg, s.scheduler, s.width, s.height, s.batch_size) == (4, 5.0, "euler", 64, 64, 4)
    assert c.seed.base == 1234 and c.checkpoints.include == ("*",)
    eyes = list(c.samples("eyes"))
    assert [x.index for x in eyes] == list(range(24))
    for x in eyes:
        assert x.category == "facial_features/eyes" and x.negative == "blurry, lowres"
        assert x.prompt.startswith("closeup of ") and "__" not in x.prompt and "{" not in x.prompt
        assert x.choices["eyes/color"] in EYE_COLORS
        assert x.choices["eyes/color"] in x.prompt and x.choices["lighting"] in x.prompt
    assert len(list(c.samples("faces"))) == 12
    # 6 colours (braces expand) x 3 details x 3 lightings, computed arithmetically
    assert c.combinations("eyes") == 54 and c.combinations("faces") == 18


@pytest.mark.parametrize("name", available_campaigns())
def test_shipped_campaigns_load_and_render(name):
    assert {"facial_features", "hands", "backgrounds", "materials"} <= set(available_campaigns())
    c = load_campaign(name)
    assert c.source == CAMPAIGN_DIR / f"{name}.yaml"
    for job in c.jobs:
        prompts = [c.sample(job, i).prompt for i in range(40)]
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


# --------------------------------------------------------------------------- determinism


def test_same_index_same_sample_regardless_of_order(tmp_path):
    c = load_campaign(write(tmp_path, ISSUE_YAML))
    forward = [c.sample("eyes", i) for i in range(24)]
    backward = [c.sample("eyes", i) for i in reversed(range(24))][::-1]
    assert forward == backward == list(c.samples("eyes"))
    again = load_campaign(write(tmp_path, ISSUE_YAML, "again.yaml"))
    assert [again.sample("eyes", i) for i in range(24)] == forward
    # samples differ from each other: prompts vary, seeds are distinct
    assert len({s.prompt for s in forward}) > 10
    assert len({s.seed for s in forward}) == 24


def test_sampling_is_identical_in_a_fresh_process(tmp_path):
    path = write(tmp_path, ISSUE_YAML)
    code = ("import json,sys; from factory.campaign import load_campaign; c=load_campaign(sys.argv[1]); "
            "print(json.dumps([[s.prompt, s.seed, s.choices] for s in c.samples('eyes')]))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True).stdout
    c = load_campaign(path)
    assert json.loads(out) == [[s.prompt, s.seed, s.choices] for s in c.samples("eyes")]


def test_seed_and_name_change_the_draws(tmp_path):
    a = load_campaign(write(tmp_path, ISSUE_YAML))
    b = load_campaign(write(tmp_path, ISSUE_YAML.replace("seed: 1234", "seed: 1235"), "b.yaml"))
    pa = [a.sample("eyes", i).prompt for i in range(24)]
    pb = [b.sample("eyes", i).prompt for i in range(24)]
    assert pa != pb
    assert a.sample("eyes", 0).seed != b.sample("eyes", 0).seed


def test_fixed_seed_mode(tmp_path):
    c = campaign_with(tmp_path, template="{a|b|c}", extra="seed: {base: 7, mode: fixed}\n")
    assert {s.seed for s in c.samples("j")} == {7}
    assert len({s.prompt for s in c.samples("j")}) > 1


# --------------------------------------------------------------------------- weights and syntax


def _binomial_ok(k: int, n: int, p: float, z: float = 5.0) -> bool:
    return abs(k - n * p) <= z * math.sqrt(n * p * (1 - p))


def test_brace_weights_within_binomial_tolerance(tmp_path):
    c = load_campaign(write(tmp_path, ISSUE_YAML))
    n = 3000
    grey = violet = 0
    for i in range(n):
        ch = c.sample("eyes", i).choices
        v = ch.get("{3::grey|violet}")
        grey += v == "grey"
        violet += v == "violet"
    k = grey + violet  # samples that drew the weighted entry: 1/4 of eyes/color's entries
    assert _binomial_ok(k, n, 0.25)
    assert _binomial_ok(grey, k, 0.75), (grey, violet)


def test_entry_and_template_weights(tmp_path):
    c = campaign_with(tmp_path, wildcards="w: ['3::red', blue]\n", template="__w__", quota=2000)
    red = sum(s.prompt == "red" for s in c.samples("j"))
    assert _binomial_ok(red, 2000, 0.75)
    c2 = load_campaign(write(tmp_path, """\
        campaign: t
        jobs:
          j: {quota: 2000, templates: ["1::alpha", "4::beta"]}
        """, "t2.yaml"))
    beta = sum(s.prompt == "beta" for s in c2.samples("j"))
    assert _binomial_ok(beta, 2000, 0.8)
    assert {s.template for s in c2.samples("j", 0, 50)} == {"alpha", "beta"}


def test_zero_weight_is_never_drawn(tmp_path):
    c = campaign_with(tmp_path, template="{0::never|yes}", quota=300)
    assert {s.prompt for s in c.samples("j")} == {"yes"}
    c = campaign_with(tmp_path, wildcards="w: ['0::never', a, '0::nope', b, '0::no']\n", template="__w__", quota=300)
    assert {s.prompt for s in c.samples("j")} == {"a", "b"} and c.combinations("j") == 2


def test_long_lists_draw_every_entry(tmp_path):
    import numpy as np

    (tmp_path / "wc").mkdir()
    (tmp_path / "wc" / "big.txt").write_text("".join(f"item{i}\n" for i in range(2000)))
    c = campaign_with(tmp_path, template="__big__", quota=0, extra="wildcards_dir: wc\n")
    drawn = Counter(c.sample("j", i).prompt for i in range(8000))
    assert set(drawn) <= {f"item{i}" for i in range(2000)} and len(drawn) > 1900
    assert c.sample("j", np.int64(3)) == c.sample("j", 3)


def test_nesting_references_inside_choices_and_globs(tmp_path):
    c = campaign_with(tmp_path, wildcards="""\
        color:
          warm: [red, orange]
          cool: [blue, "{light|dark} __color/warm__"]
        """, template="{a {big|small} __color/cool__|the __color/*__ one}", quota=400)
    prompts = {s.prompt for s in c.samples("j")}
    allowed = set()
    for size in ("big", "small"):
        for cool in ["blue"] + [f"{s} {w}" for s in ("light", "dark") for w in ("red", "orange")]:
            allowed.add(f"a {size} {cool}")
    for any_ in ["red", "orange", "blue"] + [f"{s} {w}" for s in ("light", "dark") for w in ("red", "orange")]:
        allowed.add(f"the {any_} one")
    assert prompts <= allowed and len(prompts) > 10
    # arithmetic count: a {2} x cool(1 + 2*2) = 10, plus glob over warm(2) + cool(5) = 7
    assert c.combinations("j") == 17


def test_pick_several_distinct_options(tmp_path):
    c = campaign_with(tmp_path, wildcards="c: [red, blue, '{light|dark} green']\n",
                      template="{2$$__c__|gold|silver} / {1-3$$ and $$x|y|z} / {-2$$p|q}", quota=300)
    sizes = Counter()
    for smp in c.samples("j"):
        two, many, upto = smp.prompt.split(" / ")
        parts = two.split(", ")
        assert len(parts) == 2 and len(set(parts)) == 2
        assert set(parts) <= {"red", "blue", "light green", "dark green", "gold", "silver"}
        picked = many.split(" and ")
        assert 1 <= len(picked) <= 3 and len(set(picked)) == len(picked) and set(picked) <= {"x", "y", "z"}
        sizes[len(picked)] += 1
        assert 1 <= len(upto.split(", ")) <= 2
    assert set(sizes) == {1, 2, 3}
    # ordered picks: 2! * e2(4, 1, 1) = 18; sum over k of k! * e_k(1, 1, 1) = 3 + 6 + 6 = 15; 2 + 2 = 4
    assert c.combinations("j") == 18 * 15 * 4


def test_pick_more_than_available_is_an_error(tmp_path):
    with pytest.raises(CampaignError, match="asks for 3 of 2 options"):
        campaign_with(tmp_path, template="{3$$a|b}")


def test_escapes_and_literal_underscores(tmp_path):
    c = campaign_with(tmp_path, template=r"a \{literal\} \| pipe, snake_case and __ alone")
    assert c.sample("j", 0).prompt == "a {literal} | pipe, snake_case and __ alone"


def test_choices_record_every_site(tmp_path):
    c = campaign_with(tmp_path, wildcards="w: [x]\n", template="__w__ __w__ {p|q}")
    ch = c.sample("j", 0).choices
    assert ch["w"] == "x" and ch["w#2"] == "x" and ch["{p|q}"] in {"p", "q"}


def test_job_overrides(tmp_path):
    c = load_campaign(write(tmp_path, """\
        campaign: t
        negative_prompt: "blurry, {lowres|jpeg artifacts}"
        sampler: {steps: 10, resolution: 224}
        jobs:
          a: {quota: 3, templates: [x]}
          b: {quota: 3, templates: [y], negative_prompt: "nsfw", sampler: {steps: 30, batch_size: 2}}
        """))
    assert (c.sampler_for("a").steps, c.sampler_for("a").width) == (10, 224)
    sb = c.sampler_for("b")
    assert (sb.steps, sb.batch_size, sb.width, sb.height) == (30, 2, 224, 224)
    assert c.sample("a", 0).negative in {"blurry, lowres", "blurry, jpeg artifacts"}
    assert c.sample("b", 0).negative == "nsfw"


def test_default_resolution_is_336(tmp_path):
    c = campaign_with(tmp_path)
    assert (c.sampler.width, c.sampler.height) == (336, 336)
    assert c.name == "t" and c.sample("j", 0).category == "t/j"


def test_quota_is_exact_and_zero_is_allowed(tmp_path):
    c = campaign_with(tmp_path, template="{a|b}", quota=0)
    assert list(c.samples("j")) == []
    c = campaign_with(tmp_path, template="{a|b}", quota=137)
    assert len(list(c.samples("j"))) == 137 and c.total_quota == 137


def test_astronomical_combinations_are_sampled_not_enumerated(tmp_path):
    lists = "".join(f"w{i}: [" + ", ".join(f"'{{a|b|c}} v{k}'" for k in range(30)) + "]\n" for i in range(40))
    template = " ".join(f"__w{i}__" for i in range(40))
    c = campaign_with(tmp_path, wildcards=lists, template=template, quota=5)
    assert c.combinations("j") >= 10**30  # 90**40, saturated
    prompts = [s.prompt for s in c.samples("j")]
    assert len(prompts) == 5 and all(len(p.split()) == 80 for p in prompts)


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
    seen = {s.choices["animals/snakes"] for s in c.samples("j")} | {s.choices["mood"] for s in c.samples("j")}
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


def test_parse_template_reports_column():
    with pytest.raises(CampaignError, match="column 3"):
        parse_template("a {b|c", "f.yaml", 3, "x")


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


@pytest.mark.parametrize("text", ["a" + " " * 100_000 + "b", "{" + " " * 100_000 + "a}", "{2" + " " * 100_000 + "$$a|b}",
                                  "__" + "a_" * 50_000, "x:" * 50_000 + ":y"])
def test_pathological_strings_parse_in_linear_time(text):
    """Regexes that backtrack would take minutes on these; bounded here by pytest's timeout only."""
    try:
        parse_template(text, "f.yaml", 1, "x")
    except CampaignError:
        pass


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

    path = CAMPAIGN_DIR / "hands.yaml"
    cfg = OmegaConf.create(yaml.safe_load(path.read_text()))
    from_cfg = load_campaign(cfg, source=path)
    from_file = load_campaign("hands")
    assert [from_cfg.sample("fist", i) for i in range(5)] == [from_file.sample("fist", i) for i in range(5)]
