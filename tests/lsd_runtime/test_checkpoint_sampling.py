"""luna refine samples each checkpoint as its prediction type needs (luna.models.sampling, as the factory's worker).

Tiny files in the real single-file layout (tests/luna/model_kinds.py): NoobAI-style v_pred + ztsnr
marker keys, Playground-style edm_mean/edm_std, CosXL-style edm_vpred.*; the runtime loads each
with luna.models.inventory's verdict and builds its scheduler (and the VAE's latent statistics).
"""
from __future__ import annotations

import pytest
import torch

from lsd_runtime.sampler import CondBatch, SamplerError, SamplerSettings, time_ids
from lsd_runtime.workflow import CheckpointRefused, load_components
from tests.luna.model_kinds import META, save, tiny_state

EDM_MEAN = [0.25, -0.5, 0.75, -1.0]  # not Playground's: the test sees that the file's own statistics are used
EDM_STD = [2.0, 3.0, 4.0, 5.0]
SIZE = 64


@pytest.fixture(scope="module")
def base_state():
    return tiny_state(0, "base")


@pytest.fixture(scope="module")
def files(tmp_path_factory, base_state):
    root = tmp_path_factory.mktemp("runtime_kinds")
    vpred = dict(base_state, v_pred=torch.tensor([]), ztsnr=torch.tensor([]))
    edm = dict(base_state, edm_mean=torch.tensor(EDM_MEAN), edm_std=torch.tensor(EDM_STD))
    cosxl = dict(base_state, **{"edm_vpred.sigma_max": torch.tensor(120.0), "edm_vpred.sigma_min": torch.tensor(0.002)})
    return {"plain": save(root / "plainSDXL.safetensors", base_state, META),
            "vpred": save(root / "noobStyleMerge.safetensors", vpred, META),
            "edm": save(root / "pgStyle.safetensors", edm, META),
            "v_edm": save(root / "cosStyle.safetensors", cosxl, META)}


@pytest.fixture(scope="module")
def comps(files):
    torch.set_num_threads(1)
    return {k: load_components(files[k], device="cpu", dtype="float32") for k in ("plain", "vpred", "edm")}


def _inputs(sampler, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(1, 3, SIZE, SIZE, generator=g) * 2 - 1
    noise = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=g)
    cond = torch.randn(1, 77, sampler.cross_attention_dim, generator=g)
    pooled = torch.randn(1, sampler.pooled_dim, generator=g)
    return pixels, noise, CondBatch(cond, pooled, torch.zeros_like(cond), torch.zeros_like(pooled),
                                    time_ids((SIZE, SIZE)))


def _worker_scheduler(path, prediction: str, name: str = "euler"):
    """The scheduler config the factory's worker builds for the same file."""
    from factory.worker import SDXLGenerator

    gen = SDXLGenerator(device="cpu", dtype="float32", threads=1)
    gen.load(str(path))
    gen._set_scheduler(name, prediction)
    return gen.pipe.scheduler, gen.pipe.vae.config


def test_v_prediction_ztsnr_file_gets_the_workers_v_prediction_scheduler(files, comps):
    c = comps["vpred"]
    assert c.sampler.prediction == "v+ztsnr" and c.checkpoint["prediction"] == "v+ztsnr"
    assert "v_pred + ztsnr" in c.checkpoint["prediction_evidence"]
    sched = c.sampler.make_scheduler("euler")
    cfg = sched.config
    assert type(sched).__name__ == "EulerDiscreteScheduler"
    assert (cfg.prediction_type, cfg.rescale_betas_zero_snr, cfg.timestep_spacing) == ("v_prediction", True, "trailing")
    sched.set_timesteps(4)
    assert int(sched.timesteps[0]) == 999  # trailing: the first step starts at the last (SNR 0) timestep
    worker_sched, _ = _worker_scheduler(files["vpred"], "v+ztsnr")
    assert type(worker_sched).__name__ == type(sched).__name__
    assert dict(worker_sched.config) == dict(cfg)
    for name in ("euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_sde"):  # every runtime sampler can rescale
        assert c.sampler.make_scheduler(name).config.rescale_betas_zero_snr is True
    # the same weights sampled as v-prediction and as SDXL's epsilon give different images
    pixels, noise, cond = _inputs(c.sampler)
    s = SamplerSettings(steps=3, strength=0.6, cfg=3.0)
    v_out = c.sampler.img2img(pixels, noise, cond, s)
    eps_out = comps["plain"].sampler.img2img(pixels, noise, cond, s)
    assert torch.isfinite(v_out).all() and not torch.allclose(v_out, eps_out, atol=1e-3)


def test_epsilon_file_keeps_the_sdxl_scheduler(comps):
    c = comps["plain"]
    assert c.sampler.prediction == "epsilon"
    cfg = c.sampler.make_scheduler("euler").config
    assert (cfg.prediction_type, cfg.rescale_betas_zero_snr, cfg.timestep_spacing) == ("epsilon", False, "leading")
    assert c.sampler.vae.config.scaling_factor == pytest.approx(0.13025)
    assert c.sampler.vae.config.get("latents_mean") is None


def test_edm_file_gets_the_edm_schedule_and_its_own_latent_statistics(files, comps):
    c = comps["edm"]
    assert c.sampler.prediction == "edm"
    sched = c.sampler.make_scheduler("euler")
    cfg = sched.config
    assert type(sched).__name__ == "EDMEulerScheduler"
    assert (cfg.sigma_min, cfg.sigma_max, cfg.sigma_data, cfg.sigma_schedule) == (0.002, 80.0, 0.5, "karras")
    assert type(c.sampler.make_scheduler("dpmpp_2m")).__name__ == "EDMDPMSolverMultistepScheduler"
    assert c.sampler.make_scheduler("dpmpp_2m_sde").config.algorithm_type == "sde-dpmsolver++"
    vae = c.sampler.vae.config
    assert vae.scaling_factor == 0.5
    assert list(vae.latents_mean) == pytest.approx(EDM_MEAN) and list(vae.latents_std) == pytest.approx(EDM_STD)
    worker_sched, worker_vae = _worker_scheduler(files["edm"], "edm")
    assert type(worker_sched).__name__ == "EDMEulerScheduler" and dict(worker_sched.config) == dict(cfg)
    # the factory's worker uses the file's own latent statistics too, not Playground's defaults
    assert worker_vae.scaling_factor == 0.5
    assert list(worker_vae.latents_mean) == pytest.approx(EDM_MEAN) and list(worker_vae.latents_std) == pytest.approx(EDM_STD)
    # latents as diffusers' SDXL pipelines scale them: (z - mean) * sf / std, and decode inverts it
    pixels, noise, cond = _inputs(c.sampler, 1)
    with torch.no_grad():
        z = c.sampler.vae.encode(pixels).latent_dist.mode()
        mean, std = torch.tensor(EDM_MEAN).view(1, 4, 1, 1), torch.tensor(EDM_STD).view(1, 4, 1, 1)
        torch.testing.assert_close(c.sampler.encode(pixels), (z - mean) * 0.5 / std, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c.sampler.decode(c.sampler.encode(pixels)),
                                   c.sampler.vae.decode(z).sample.clamp(-1, 1), rtol=1e-4, atol=1e-4)
    out = c.sampler.img2img(pixels, noise, cond, SamplerSettings(steps=3, strength=0.5, cfg=3.0))
    assert out.shape == pixels.shape and torch.isfinite(out).all()


def test_edm_file_with_a_sampler_that_has_no_edm_form_is_refused_before_any_work(comps):
    from lsd_runtime.workflow import RefineSettings, refine

    c = comps["edm"]
    with pytest.raises(SamplerError, match="euler_a.*no EDM form"):
        c.sampler.make_scheduler("euler_a")
    settings = RefineSettings()
    settings.detail.sampler = "euler_a"
    with pytest.raises(SamplerError, match="no EDM form"):
        refine(None, "a face", components=c, settings=settings)  # refused before the image is even looked at


def test_checkpoints_the_runtime_cannot_sample_are_refused_with_the_reason(files, tmp_path):
    with pytest.raises(CheckpointRefused, match=r"cosStyle.*v-edm.*no sampler here supports it"):
        load_components(files["v_edm"], device="cpu", dtype="float32")
    with pytest.raises(CheckpointRefused, match="no such file"):
        load_components(tmp_path / "gone.safetensors", device="cpu", dtype="float32")


def test_refine_record_names_the_prediction_type_and_its_evidence(comps):
    import numpy as np

    from lsd_runtime.workflow import RefineSettings, refine

    settings = RefineSettings()
    settings.refine.enabled = False
    img = np.full((SIZE, SIZE, 3), 128, np.uint8)
    result = refine(img, "a face", components=comps["vpred"], detections=[], settings=settings)
    facts = result.record["checkpoint_facts"]
    assert facts["prediction"] == "v+ztsnr" and "ztsnr" in facts["prediction_evidence"]
