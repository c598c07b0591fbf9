"""The campaign model: deterministic counter-based draws, weights, quotas, per-job settings."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from factory.campaign_file import load_campaign
from tests.factory.campaign_texts import EYE_COLORS, ISSUE_YAML, binomial_ok, campaign_with, write

REPO = Path(__file__).resolve().parents[2]


def test_issue_example_loads_exactly(tmp_path):
    c = load_campaign(write(tmp_path, ISSUE_YAML))
    assert c.name == "facial_features"
    assert {n: j.quota for n, j in c.jobs.items()} == {"eyes": 24, "faces": 12}
    assert sorted(c.wildcards) == ["eyes/color", "eyes/detail", "lighting"]
    s = c.sampler
    assert (s.steps, s.cfg, s.scheduler, s.width, s.height, s.batch_size) == (4, 5.0, "euler", 64, 64, 4)
    assert c.seed.base == 1234 and c.checkpoints.include == ("*",)
    eyes = list(c.draws("eyes"))
    assert [x.index for x in eyes] == list(range(24))
    for x in eyes:
        assert x.category == "facial_features/eyes" and x.negative == "blurry, lowres"
        assert x.prompt.startswith("closeup of ") and "__" not in x.prompt and "{" not in x.prompt
        assert x.choices["eyes/color"] in EYE_COLORS
        assert x.choices["eyes/color"] in x.prompt and x.choices["lighting"] in x.prompt
    assert len(list(c.draws("faces"))) == 12
    # 6 colours (braces expand) x 3 details x 3 lightings, computed arithmetically
    assert c.combinations("eyes") == 54 and c.combinations("faces") == 18


# --------------------------------------------------------------------------- determinism


def test_same_index_same_sample_regardless_of_order(tmp_path):
    c = load_campaign(write(tmp_path, ISSUE_YAML))
    forward = [c.draw("eyes", i) for i in range(24)]
    backward = [c.draw("eyes", i) for i in reversed(range(24))][::-1]
    assert forward == backward == list(c.draws("eyes"))
    again = load_campaign(write(tmp_path, ISSUE_YAML, "again.yaml"))
    assert [again.draw("eyes", i) for i in range(24)] == forward
    # samples differ from each other: prompts vary, seeds are distinct
    assert len({s.prompt for s in forward}) > 10
    assert len({s.seed for s in forward}) == 24


def test_sampling_is_identical_in_a_fresh_process(tmp_path):
    path = write(tmp_path, ISSUE_YAML)
    code = ("import json,sys; from factory.campaign_file import load_campaign; c=load_campaign(sys.argv[1]); "
            "print(json.dumps([[s.prompt, s.seed, s.choices] for s in c.draws('eyes')]))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True).stdout
    c = load_campaign(path)
    assert json.loads(out) == [[s.prompt, s.seed, s.choices] for s in c.draws("eyes")]


def test_seed_and_name_change_the_draws(tmp_path):
    a = load_campaign(write(tmp_path, ISSUE_YAML))
    b = load_campaign(write(tmp_path, ISSUE_YAML.replace("seed: 1234", "seed: 1235"), "b.yaml"))
    pa = [a.draw("eyes", i).prompt for i in range(24)]
    pb = [b.draw("eyes", i).prompt for i in range(24)]
    assert pa != pb
    assert a.draw("eyes", 0).seed != b.draw("eyes", 0).seed


def test_fixed_seed_mode(tmp_path):
    c = campaign_with(tmp_path, template="{a|b|c}", extra="seed: {base: 7, mode: fixed}\n")
    assert {s.seed for s in c.draws("j")} == {7}
    assert len({s.prompt for s in c.draws("j")}) > 1


# --------------------------------------------------------------------------- weights, quotas, per-job settings


def test_entry_and_template_weights(tmp_path):
    c = campaign_with(tmp_path, wildcards="w: ['3::red', blue]\n", template="__w__", quota=2000)
    red = sum(s.prompt == "red" for s in c.draws("j"))
    assert binomial_ok(red, 2000, 0.75)
    c2 = load_campaign(write(tmp_path, """\
        campaign: t
        jobs:
          j: {quota: 2000, templates: ["1::alpha", "4::beta"]}
        """, "t2.yaml"))
    beta = sum(s.prompt == "beta" for s in c2.draws("j"))
    assert binomial_ok(beta, 2000, 0.8)
    assert {s.template for s in c2.draws("j", 0, 50)} == {"alpha", "beta"}


def test_zero_weight_is_never_drawn(tmp_path):
    c = campaign_with(tmp_path, template="{0::never|yes}", quota=300)
    assert {s.prompt for s in c.draws("j")} == {"yes"}
    c = campaign_with(tmp_path, wildcards="w: ['0::never', a, '0::nope', b, '0::no']\n", template="__w__", quota=300)
    assert {s.prompt for s in c.draws("j")} == {"a", "b"} and c.combinations("j") == 2


def test_long_lists_draw_every_entry(tmp_path):
    import numpy as np

    (tmp_path / "wc").mkdir()
    (tmp_path / "wc" / "big.txt").write_text("".join(f"item{i}\n" for i in range(2000)))
    c = campaign_with(tmp_path, template="__big__", quota=0, extra="wildcards_dir: wc\n")
    drawn = Counter(c.draw("j", i).prompt for i in range(8000))
    assert set(drawn) <= {f"item{i}" for i in range(2000)} and len(drawn) > 1900
    assert c.draw("j", np.int64(3)) == c.draw("j", 3)


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
    assert c.draw("a", 0).negative in {"blurry, lowres", "blurry, jpeg artifacts"}
    assert c.draw("b", 0).negative == "nsfw"


def test_default_resolution_is_336(tmp_path):
    c = campaign_with(tmp_path)
    assert (c.sampler.width, c.sampler.height) == (336, 336)
    assert c.name == "t" and c.draw("j", 0).category == "t/j"


def test_quota_is_exact_and_zero_is_allowed(tmp_path):
    c = campaign_with(tmp_path, template="{a|b}", quota=0)
    assert list(c.draws("j")) == []
    c = campaign_with(tmp_path, template="{a|b}", quota=137)
    assert len(list(c.draws("j"))) == 137 and c.total_quota == 137


def test_zero_weight_templates_add_no_combinations():
    from factory.campaign_file import campaign_from_dict

    c = campaign_from_dict({"campaign": "t", "wildcards": {"c": ["red", "0::blue", "green"]},
                            "jobs": {"j": {"quota": 200, "templates": ["0::never {a|b|c|d}", "x __c__"]}}})
    assert {s.prompt for s in c.draws("j")} == {"x red", "x green"}
    assert c.combinations("j") == 2
