"""The denoiser interface without ComfyUI: the diffusers implementation, the ComfyUI one's checks, lazy import."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lsd_runtime.conditioning import CondRow
from lsd_runtime.denoiser import ComfyDenoiser, DenoiserError, DiffusersDenoiser, deterministic, stack_rows
from lsd_runtime.sampler import DenoiseItem, SamplerSettings, sampler_denoiser, time_ids

ROOT = Path(__file__).resolve().parents[2]


def test_the_runtime_imports_without_comfyui():
    code = ("import sys, lsd_runtime.api, lsd_runtime.workflow; "
            "print(sorted(m for m in sys.modules if m == 'comfy' or m.startswith('comfy.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_comfy_denoiser_refuses_samplers_that_draw_their_own_noise():
    assert deterministic("euler") and deterministic("dpmpp_2m") and deterministic("uni_pc")
    for name in ("euler_ancestral", "dpmpp_2m_sde", "ddpm", "lcm", "sa_solver"):
        assert not deterministic(name)
        with pytest.raises(DenoiserError, match=f"sampler_name={name!r}"):
            ComfyDenoiser(None, None, [], sampler_name=name)
    with pytest.raises(DenoiserError, match="denoise=1.5"):
        ComfyDenoiser(None, None, [], denoise=1.5)
    with pytest.raises(DenoiserError, match="steps=0"):
        ComfyDenoiser(None, None, [], steps=0)


def test_comfy_denoiser_at_zero_denoise_returns_the_inputs_without_comfyui():
    items = [DenoiseItem(image=np.full((16, 16, 3), 7.25, np.float32), noise=torch.zeros(4, 2, 2), row=None, seed=0)]
    out = ComfyDenoiser(None, None, [], denoise=0.0)(items)
    assert np.array_equal(out[0], items[0].image) and out[0] is not items[0].image


def test_rows_of_different_lengths_share_a_batch():
    rows = [CondRow(torch.randn(77, 8), torch.randn(4), "text", 0.0),
            CondRow(torch.randn(154, 8), torch.randn(4), "vault", 0.5, "concat")]
    cond, pooled = stack_rows(rows)
    assert cond.shape == (2, 154, 8) and pooled.shape == (2, 4)
    assert torch.equal(cond[0, :77], rows[0].cond) and torch.equal(cond[0, 77:], rows[0].cond)
    assert torch.equal(cond[1], rows[1].cond)


def test_diffusers_denoiser_is_luna_refines_loop():
    from lsd_runtime.conditioning import TextSource
    from lsd_runtime.workflow import tiny_components
    from luna.models.tiny import one_thread

    comps = tiny_components(vision=False)
    text = TextSource(comps.encoders, "a red square", None)
    settings = SamplerSettings(steps=2, strength=0.5, cfg=2.0)
    rng = np.random.default_rng(0)
    items = [DenoiseItem(image=(rng.random((64, 64, 3)) * 255).astype(np.float32),
                         noise=torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(i)),
                         row=text.rows([None])[0], seed=i, time_ids=time_ids((64, 64))[0]) for i in range(2)]
    with one_thread():
        a = DiffusersDenoiser(comps.sampler, settings, text.negative_row)(items)
        b = sampler_denoiser(comps.sampler, settings, text.negative_row)(items)
    assert len(a) == 2 and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.allclose(a[0], items[0].image)
