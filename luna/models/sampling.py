"""The scheduler (and VAE latent statistics) a checkpoint needs, from its prediction type: pure functions.

An SDXL fine-tune trained for v-prediction, zero terminal SNR or the EDM schedule gives wrong
images under SDXL's default epsilon Euler, and nothing fails: the scheduler must follow the
checkpoint. `sampling_plan` turns (the pipeline's scheduler config, the scheduler class a
campaign or the runtime asked for, the inventory's prediction type) into the class and config to
build, or raises UnsupportedSampling naming what cannot be met. `resolve_sampler` applies a
campaign's `sampler_overrides` (per family, checkpoint glob or distillation) and refuses a
few-step distilled checkpoint that no override covers.

    epsilon   the config as it is (prediction_type=epsilon)
    v         prediction_type=v_prediction
    v+ztsnr   v_prediction + rescale_betas_zero_snr + timestep_spacing=trailing (the final step at SNR 0)
    edm       the EDM twin of the scheduler (EDMEuler / EDMDPMSolverMultistep), Playground v2.5's
              sigmas (0.002..80, sigma_data 0.5, Karras), and the VAE's latent mean/std, scaling 0.5
"""
from __future__ import annotations

import fnmatch
import inspect
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

# Playground v2.5 (the EDM SDXL release): its scheduler and VAE latent statistics, as its edm_mean/edm_std keys hold
PLAYGROUND_LATENTS_MEAN = (-1.6574, 1.886, -1.383, 2.5155)
PLAYGROUND_LATENTS_STD = (8.4927, 5.9022, 6.5498, 5.2299)
EDM_CONFIG = {"sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5, "sigma_schedule": "karras", "rho": 7.0,
              "num_train_timesteps": 1000, "prediction_type": "epsilon", "final_sigmas_type": "zero"}
EDM_TWINS = {"EulerDiscreteScheduler": "EDMEulerScheduler", "DPMSolverMultistepScheduler": "EDMDPMSolverMultistepScheduler"}
OVERRIDE_KEYS = ("steps", "cfg", "scheduler", "timestep_spacing")
SELECTOR_KEYS = ("family", "checkpoints", "distillation")


class UnsupportedSampling(ValueError):
    """A checkpoint whose sampling needs cannot be met with the requested settings (the message says why)."""


@dataclass(frozen=True)
class SamplingPlan:
    """What to build: `getattr(diffusers, scheduler_class).from_config(scheduler_config)`, and VAE config changes."""

    scheduler_class: str
    scheduler_config: dict
    vae_config: dict = field(default_factory=dict)  # scaling_factor / latents_mean / latents_std, {} = unchanged


def _accepts(cls_name: str, arg: str) -> bool:
    import diffusers

    return arg in inspect.signature(getattr(diffusers, cls_name).__init__).parameters


def sampling_plan(base_config: Mapping[str, Any], scheduler_class: str, prediction: str,
                  timestep_spacing: str | None = None, latents_mean: Sequence[float] | None = None,
                  latents_std: Sequence[float] | None = None) -> SamplingPlan:
    """The scheduler class and config for a checkpoint of `prediction` type (see the module docstring)."""
    config = {k: v for k, v in dict(base_config).items() if not k.startswith("_")}
    vae: dict = {}
    if prediction == "epsilon":
        config["prediction_type"] = "epsilon"
    elif prediction in ("v", "v+ztsnr"):
        config["prediction_type"] = "v_prediction"
        if prediction == "v+ztsnr":
            if not _accepts(scheduler_class, "rescale_betas_zero_snr"):
                raise UnsupportedSampling(f"{scheduler_class} cannot rescale to zero terminal SNR, which this "
                                          "v+ztsnr checkpoint needs: use scheduler euler, euler_a, ddim, ddpm, dpmpp_2m or unipc")
            config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    elif prediction == "edm":
        twin = EDM_TWINS.get(scheduler_class)
        if twin is None:
            raise UnsupportedSampling(f"{scheduler_class} has no EDM form, which this EDM (Playground v2.5) "
                                      "checkpoint needs: use scheduler euler or dpmpp_2m")
        keep = {k: config[k] for k in ("algorithm_type", "solver_order") if k in config and twin.startswith("EDMDPM")}
        config = {**EDM_CONFIG, **keep}
        scheduler_class = twin
        vae = {"scaling_factor": 0.5, "latents_mean": list(latents_mean or PLAYGROUND_LATENTS_MEAN),
               "latents_std": list(latents_std or PLAYGROUND_LATENTS_STD)}
    else:
        raise UnsupportedSampling(f"prediction type {prediction!r} is not supported (epsilon, v, v+ztsnr, edm)")
    if timestep_spacing:
        if prediction == "edm":
            raise UnsupportedSampling("timestep_spacing does not apply to an EDM checkpoint (its sigmas are Karras)")
        config["timestep_spacing"] = timestep_spacing
    return SamplingPlan(scheduler_class, config, vae)


def _matches(rule: Mapping[str, Any], name: str, family: str | None, distillation: str | None) -> bool:
    if "family" in rule and family not in (rule["family"] if isinstance(rule["family"], list) else [rule["family"]]):
        return False
    if "checkpoints" in rule:
        globs = rule["checkpoints"] if isinstance(rule["checkpoints"], list) else [rule["checkpoints"]]
        if not any(fnmatch.fnmatchcase(name, str(g)) for g in globs):
            return False
    if "distillation" in rule and distillation != rule["distillation"]:
        return False
    return True


def check_overrides(rules: Sequence[Mapping[str, Any]] | None, where: str = "sampler_overrides") -> list[dict]:
    """Validate a campaign's sampler_overrides list (each rule: one selector or more, one setting or more)."""
    out = []
    for i, rule in enumerate(rules or []):
        if not isinstance(rule, Mapping):
            raise ValueError(f"{where}[{i}] must be a mapping like {{family: noobai, cfg: 5}}, got {rule!r}")
        unknown = sorted(set(rule) - set(OVERRIDE_KEYS) - set(SELECTOR_KEYS))
        if unknown:
            raise ValueError(f"{where}[{i}]: unknown key(s) {unknown}; selectors {list(SELECTOR_KEYS)}, "
                             f"settings {list(OVERRIDE_KEYS)}")
        if not set(rule) & set(SELECTOR_KEYS):
            raise ValueError(f"{where}[{i}] selects no checkpoint: give family, checkpoints (globs) or distillation")
        if not set(rule) & set(OVERRIDE_KEYS):
            raise ValueError(f"{where}[{i}] changes nothing: give steps, cfg, scheduler or timestep_spacing")
        out.append(dict(rule))
    return out


def resolve_sampler(sampler: Mapping[str, Any], name: str, family: str | None = None,
                    distillation: str | None = "none", overrides: Sequence[Mapping[str, Any]] | None = None) -> dict:
    """The sampler settings for one checkpoint: `sampler` with every matching override applied in order.

    A few-step distilled checkpoint that no override covers is refused (UnsupportedSampling): its
    default 20-30 steps at cfg 5-7 would burn the images, and nothing would fail."""
    out = dict(sampler)
    matched = False
    for rule in overrides or []:
        if _matches(rule, name, family, distillation):
            matched = True
            out.update({k: rule[k] for k in OVERRIDE_KEYS if k in rule})
    if distillation == "few-step" and not matched:
        raise UnsupportedSampling(
            f"checkpoint {name!r} is few-step distilled: add a sampler_overrides rule for it, e.g. "
            "{distillation: few-step, steps: 6, cfg: 1.5, scheduler: euler, timestep_spacing: trailing}")
    return out


def latent_statistics(path) -> tuple[list[float] | None, list[float] | None]:
    """(latents_mean, latents_std) a checkpoint declares: a single file's `edm_mean`/`edm_std` tensors
    (Playground v2.5 stores its VAE latent statistics there) or a diffusers folder's `vae/config.json`;
    (None, None) when it declares none. Reads only those two small tensors."""
    import json
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        try:
            vae = json.loads((path / "vae" / "config.json").read_text())
        except (OSError, ValueError):
            return None, None
        mean, std = vae.get("latents_mean"), vae.get("latents_std")
        return (list(map(float, mean)), list(map(float, std))) if mean and std else (None, None)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        if not {"edm_mean", "edm_std"} <= keys:
            return None, None
        return ([float(v) for v in f.get_tensor("edm_mean").flatten()],
                [float(v) for v in f.get_tensor("edm_std").flatten()])
