"""The own img2img loop: injected noise is the only noise, VAE mode, CFG rows, batching, NaN guard."""
from __future__ import annotations

import pytest
import torch

from lsd_runtime.sampler import CondBatch, SamplerError, SamplerSettings, time_ids, tile_tokens
from luna.models.sdxl import NonFiniteError

B, SIZE = 3, 64


@pytest.fixture(scope="module")
def sampler():
    from lsd_runtime.workflow import tiny_components

    return tiny_components().sampler


@pytest.fixture(scope="module")
def inputs(sampler):
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(B, 3, SIZE, SIZE, generator=g) * 2 - 1)
    noise = torch.randn(B, 4, SIZE // 8, SIZE // 8, generator=g)
    c = sampler.cross_attention_dim
    cond = torch.randn(B, 77, c, generator=g)
    pooled = torch.randn(B, sampler.pooled_dim, generator=g)
    batch = CondBatch(cond, pooled, torch.zeros_like(cond), torch.zeros_like(pooled), time_ids((SIZE, SIZE), batch=B))
    return pixels, noise, batch


def test_injected_noise_is_the_only_noise(sampler, inputs):
    pixels, noise, cond = inputs
    s = SamplerSettings(steps=2, strength=0.5, cfg=3.0)
    torch.manual_seed(1)
    a = sampler.img2img(pixels, noise, cond, s)
    torch.manual_seed(2)  # the global RNG must not matter (no posterior sampling, no fresh noise)
    b = sampler.img2img(pixels, noise, cond, s)
    assert torch.equal(a, b)
    c = sampler.img2img(pixels, noise.flip(-1), cond, s)
    assert not torch.allclose(a, c)


def test_encode_is_the_scaled_posterior_mode(sampler, inputs):
    pixels = inputs[0]
    z = sampler.encode(pixels)
    with torch.no_grad():
        ref = sampler.vae.encode(pixels).latent_dist.mode() * sampler.vae.config.scaling_factor
    torch.testing.assert_close(z, ref)
    assert torch.equal(z, sampler.encode(pixels))


def test_start_latent_is_add_noise_at_the_first_kept_timestep(sampler, inputs, monkeypatch):
    """With strength s the loop starts at timesteps[steps - int(steps*s)] from x0 + sigma * injected noise."""
    from lsd_runtime import sampler as mod

    pixels, noise, cond = inputs
    seen = {}
    real_unet = sampler.unet

    class Spy(torch.nn.Module):
        config = real_unet.config

        def parameters(self, *a, **k):
            return real_unet.parameters(*a, **k)

        def forward(self, x, t, **kw):
            seen.setdefault("x", x.clone())
            seen.setdefault("t", t)
            return real_unet(x, t, **kw)

    monkeypatch.setattr(sampler, "unet", Spy())
    latents = sampler.encode(pixels)
    sampler.denoise(latents, noise, cond, SamplerSettings(steps=10, strength=0.3, cfg=1.0))
    sched = mod.make_scheduler(sampler.scheduler_config, "euler")
    sched.set_timesteps(10)
    assert seen["t"] == sched.timesteps[7]
    sigma = sched.sigmas[7]
    expected = (latents + sigma * noise) / ((sigma**2 + 1) ** 0.5)  # Euler scales the model input
    torch.testing.assert_close(seen["x"], expected.to(seen["x"].dtype), rtol=1e-4, atol=1e-4)


def test_batched_equals_one_by_one_even_with_an_ancestral_sampler(sampler, inputs):
    pixels, noise, cond = inputs
    s = SamplerSettings(steps=4, strength=0.6, cfg=4.0, sampler="euler_a")
    seeds = [11, 12, 13]
    batched = sampler.img2img(pixels, noise, cond, s, seeds=seeds)
    for i in range(B):
        one = sampler.img2img(pixels[i:i + 1], noise[i:i + 1], cond.rows(slice(i, i + 1)), s, seeds=seeds[i:i + 1])
        torch.testing.assert_close(one[0], batched[i], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)


def test_ancestral_sampler_without_seeds_is_refused(sampler, inputs):
    pixels, noise, cond = inputs
    with pytest.raises(SamplerError, match="seed"):
        sampler.img2img(pixels, noise, cond, SamplerSettings(steps=2, strength=1.0, sampler="euler_a"))


def test_repeated_tokens_leave_cross_attention_unchanged(sampler, inputs):
    """Rows of 77 and 154 tokens share a batch by repetition: attention over repeated keys is the same."""
    pixels, noise, cond = inputs
    s = SamplerSettings(steps=2, strength=0.5, cfg=3.0)
    z = sampler.encode(pixels[:1])
    one = cond.rows(slice(0, 1))
    long = CondBatch(tile_tokens(one.cond, 154), one.pooled, one.neg_cond, one.neg_pooled, one.time_ids)
    torch.testing.assert_close(sampler.denoise(z, noise[:1], one, s), sampler.denoise(z, noise[:1], long, s),
                               rtol=1e-4, atol=1e-4)


def test_conditioning_of_another_width_is_a_clear_error(sampler, inputs):
    pixels, noise, cond = inputs
    bad = CondBatch(torch.zeros(B, 77, 2048), torch.zeros(B, 1280), torch.zeros(B, 77, 2048), torch.zeros(B, 1280),
                    cond.time_ids)
    with pytest.raises(SamplerError, match="cross-attention"):
        sampler.img2img(pixels, noise, bad, SamplerSettings(steps=2))
    with pytest.raises(SamplerError, match="rows"):
        sampler.img2img(pixels, noise, cond.rows(slice(0, 2)), SamplerSettings(steps=2))


def test_non_finite_decode_raises_a_clear_error(sampler, inputs, monkeypatch):
    class Out:
        sample = torch.full((1, 3, 8, 8), float("nan"))

    monkeypatch.setattr(sampler.vae, "decode", lambda z: Out())
    with pytest.raises(NonFiniteError, match="NaN"):
        sampler.decode(torch.zeros(1, 4, 1, 1))
