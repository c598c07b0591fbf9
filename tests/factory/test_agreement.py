"""The optional image-prompt agreement check of the quality gate, with the tiny preset's open_clip tower
(it has a text side): rejections that name the score and threshold, recorded scores, off by default."""
from __future__ import annotations

import functools
import re
from collections import Counter

import pytest
import torch

from factory import quality
from factory.run import FactoryError, quality_config
from factory.worker import FactoryWorker
from luna.models import vision
from tests.factory.tasks import SAMPLER, make_tasks

TINY = {"vision": "tiny", "device": "cpu"}


def _task(agreement=None, per_unit=3):
    task = make_tasks({"ck": ["pc1"]}, 1, per_unit=per_unit)[0]
    if agreement is not None:
        task["quality"] = {"max_attempts": 3, "agreement": agreement}
    return task


def test_scorer_is_the_cosine_of_the_towers_image_and_text_embeddings(fakes):
    scorer = quality.AgreementScorer(quality.AgreementConfig(vision="tiny", min_score=0.0, device="cpu", batch_size=2))
    images = fakes.FakeGenerator().generate(["a", "b", "c"], [""] * 3, [1, 2, 3], SAMPLER)
    prompts = ["a red fox", "a blue car", "a green tree"]
    got = scorer.score(images, prompts)
    tower = vision.load_vision("tiny")
    from PIL import Image

    emb = vision.embed(tower, [Image.fromarray((im * 255 + 0.5).astype("uint8")) for im in images]).embed
    text = vision.TextSide(tower)(prompts)
    want = (torch.nn.functional.normalize(emb, dim=-1) * text).sum(-1).tolist()
    assert got == pytest.approx(want, abs=1e-5)
    assert len(set(round(v, 6) for v in got)) == 3 and all(-1.0 <= v <= 1.0 for v in got)


def test_unreachable_min_score_rejects_every_image_and_the_guard_counts_them(fakes):
    w = FactoryWorker("w0", "pc1", fakes.FakeGenerator)
    r = w.run(_task({**TINY, "min_score": 1.0}))  # a cosine of exactly 1 is out of reach for noise images
    assert r["samples"] == [] and len(r["rejected"]) == 3
    pattern = re.compile(r"agreement -?\d\.\d{4} < min_score 1\.0000")
    for rej in r["rejected"]:
        assert len(rej["reasons"]) == 3  # every attempt (derived seeds) was scored and failed
        assert all(len(a) == 1 and pattern.fullmatch(a[0]) for a in rej["reasons"]), rej["reasons"]
    assert quality.gate_counts(r) == (9, 9, Counter(agreement=9))
    guard = quality.PoisonGuard(0.2, 1)
    assert guard.observe("ck", r)
    assert "agreement 9" in guard.health["ck"].reason


def test_low_min_score_passes_and_records_the_score_and_the_tower_loads_once(fakes):
    w = FactoryWorker("w0", "pc1", fakes.FakeGenerator)
    task = _task({**TINY, "min_score": -1.0})
    r = w.run(task)
    assert r["rejected"] == [] and len(r["samples"]) == 3
    scorer = w._scorer[1]
    images = fakes.FakeGenerator().generate([], [], [s["seed"] for s in task["samples"]], task["sampler"])
    want = scorer.score(images, [s["prompt"] for s in task["samples"]])
    for s, v in zip(r["samples"], want):
        assert s["seed"] == next(x["seed"] for x in task["samples"] if x["key"] == s["key"])
        assert s["quality"] == {"passed": True, "attempts": 1, "rejected_attempts": [], "agreement": round(v, 4)}
    w.run(task)
    assert w._scorer[1] is scorer  # one tower per actor while the settings stay


def test_a_black_image_fails_on_pixels_before_agreement(fakes):
    gen = functools.partial(fakes.FakeGenerator, black_seeds=[1])
    w = FactoryWorker("w0", "pc1", gen)
    task = _task({**TINY, "min_score": -1.0}, per_unit=2)
    task["samples"][1]["seed"] = 1
    r = w.run(task)
    kept = {s["key"]: s for s in r["samples"]}
    assert kept["ck_0_1"]["quality"]["rejected_attempts"] == [["black"]]
    assert "agreement" in kept["ck_0_1"]["quality"]


def test_off_by_default_leaves_the_metadata_unchanged(fakes):
    assert not quality.QualityConfig.from_cfg({}).agreement.active
    w = FactoryWorker("w0", "pc1", fakes.FakeGenerator)
    r = w.run(_task())
    assert [set(s["quality"]) for s in r["samples"]] == [{"passed", "attempts", "rejected_attempts"}] * 3
    assert w._scorer is None
    r = w.run(_task({"vision": None, "min_score": None}))  # the conf file's nulls
    assert w._scorer is None and all("agreement" not in s["quality"] for s in r["samples"])


def test_agreement_settings_are_checked():
    with pytest.raises(FactoryError, match=r"quality\.agreement\.vision is set but quality\.agreement\.min_score"):
        quality_config({"quality": {"agreement": {"vision": "tiny"}}})
    with pytest.raises(FactoryError, match=r"quality\.agreement\.min_score is set but quality\.agreement\.vision"):
        quality_config({"quality": {"agreement": {"min_score": 0.2}}})
    with pytest.raises(FactoryError, match=r"min_score is a cosine in \[-1, 1\], got 1\.5"):
        quality_config({"quality": {"agreement": {"vision": "tiny", "min_score": 1.5}}})
    with pytest.raises(FactoryError, match=r"unknown key\(s\) \['threshold'\]"):
        quality_config({"quality": {"agreement": {"threshold": 0.2}}})


def test_a_vision_only_tower_is_refused_naming_the_setting(tmp_path):
    from safetensors.torch import save_file

    tower = vision.load_vision("tiny")
    path = tmp_path / "visual.safetensors"
    save_file({k: v.contiguous() for k, v in tower.model.state_dict().items() if k.startswith("visual.")}, path)
    cfg = quality.AgreementConfig(vision="tiny", weights=str(path), min_score=0.1, device="cpu")
    with pytest.raises(ValueError, match=r"quality\.agreement\.vision='tiny'.*no text side.*full open_clip"):
        quality.AgreementScorer(cfg)
