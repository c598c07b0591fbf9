"""The scheduler follows the checkpoint's prediction type; few-step checkpoints need an override."""
from __future__ import annotations

import json

import diffusers
import pytest

from luna.models.configs import SDXL_TINY
from luna.models.sampling import (PLAYGROUND_LATENTS_MEAN, UnsupportedSampling, check_overrides, resolve_sampler,
                                  sampling_plan)

BASE = json.loads((SDXL_TINY / "scheduler" / "scheduler_config.json").read_text())


def _build(plan):
    return getattr(diffusers, plan.scheduler_class).from_config(plan.scheduler_config)


def test_epsilon_keeps_sdxl_defaults():
    plan = sampling_plan(BASE, "EulerDiscreteScheduler", "epsilon")
    assert plan.scheduler_class == "EulerDiscreteScheduler" and plan.vae_config == {}
    assert plan.scheduler_config["prediction_type"] == "epsilon"
    assert plan.scheduler_config["timestep_spacing"] == BASE["timestep_spacing"]


def test_v_prediction_with_zero_terminal_snr():
    plan = sampling_plan(BASE, "EulerDiscreteScheduler", "v+ztsnr")
    sched = _build(plan)
    assert sched.config.prediction_type == "v_prediction"
    assert sched.config.rescale_betas_zero_snr and sched.config.timestep_spacing == "trailing"
    sched.set_timesteps(8)
    assert int(sched.timesteps[0]) == 999  # trailing: the first step starts at the last (pure-noise) timestep
    assert float(sched.alphas_cumprod[-1]) < 1e-6  # zero terminal SNR (diffusers keeps 2**-24 for Euler)
    plain_v = _build(sampling_plan(BASE, "EulerDiscreteScheduler", "v"))
    assert plain_v.config.prediction_type == "v_prediction" and not plain_v.config.rescale_betas_zero_snr


def test_edm_is_playground_schedule_and_latent_statistics():
    plan = sampling_plan(BASE, "DPMSolverMultistepScheduler", "edm")
    sched = _build(plan)
    assert type(sched).__name__ == "EDMDPMSolverMultistepScheduler"
    assert (sched.config.sigma_data, sched.config.sigma_min, sched.config.sigma_max) == (0.5, 0.002, 80.0)
    assert plan.vae_config == {"scaling_factor": 0.5, "latents_mean": list(PLAYGROUND_LATENTS_MEAN),
                               "latents_std": [8.4927, 5.9022, 6.5498, 5.2299]}
    own = sampling_plan(BASE, "EulerDiscreteScheduler", "edm", latents_mean=[0, 1, 2, 3], latents_std=[1, 1, 1, 1])
    assert own.scheduler_class == "EDMEulerScheduler" and own.vae_config["latents_mean"] == [0, 1, 2, 3]


@pytest.mark.parametrize("cls,prediction,words", [
    ("HeunDiscreteScheduler", "v+ztsnr", "zero terminal SNR"),
    ("DDIMScheduler", "edm", "no EDM form"),
    ("EulerDiscreteScheduler", "v-edm", "not supported"),
])
def test_needs_that_cannot_be_met_are_refused(cls, prediction, words):
    with pytest.raises(UnsupportedSampling, match=words):
        sampling_plan(BASE, cls, prediction)


def test_few_step_timestep_spacing_override():
    plan = sampling_plan(BASE, "EulerDiscreteScheduler", "epsilon", timestep_spacing="trailing")
    assert plan.scheduler_config["timestep_spacing"] == "trailing"


RULES = check_overrides([
    {"distillation": "few-step", "steps": 6, "cfg": 1.5, "timestep_spacing": "trailing"},
    {"family": "noobai", "cfg": 4.5},
    {"checkpoints": ["*turbo*"], "steps": 2, "cfg": 1.0},
])
SAMPLER = {"steps": 25, "cfg": 6.0, "scheduler": "euler"}


def test_overrides_by_distillation_family_and_glob_in_order():
    assert resolve_sampler(SAMPLER, "plain") == SAMPLER
    assert resolve_sampler(SAMPLER, "noobV", family="noobai", overrides=RULES) == {**SAMPLER, "cfg": 4.5}
    fast = resolve_sampler(SAMPLER, "fastLightning", distillation="few-step", overrides=RULES)
    assert fast == {**SAMPLER, "steps": 6, "cfg": 1.5, "timestep_spacing": "trailing"}
    turbo = resolve_sampler(SAMPLER, "sdxl_turbo", distillation="few-step", overrides=RULES)
    assert (turbo["steps"], turbo["cfg"]) == (2, 1.0)  # the later rule wins


def test_few_step_without_override_is_refused():
    with pytest.raises(UnsupportedSampling, match="few-step distilled"):
        resolve_sampler(SAMPLER, "fastLightning", distillation="few-step", overrides=[{"family": "x", "cfg": 1}])


@pytest.mark.parametrize("rule,words", [
    ({"cfg": 2}, "selects no checkpoint"), ({"family": "pony"}, "changes nothing"), ({"family": "p", "cgf": 2}, "unknown key"),
])
def test_bad_override_rules(rule, words):
    with pytest.raises(ValueError, match=words):
        check_overrides([rule])
