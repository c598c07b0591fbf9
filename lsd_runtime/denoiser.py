"""The denoiser interface: the one call that differs between `luna refine` and the ComfyUI nodes.

The detailer (detailer.detail) and the global refiner (refiner.refine_tiles) do all the pure work
(crop geometry, scaffold slices, conditioning rows, blending) and hand a batch of `DenoiseItem`s
(image at working size, injected noise, conditioning row, seed, SDXL time ids) to a denoiser:

    denoise(items: list[DenoiseItem]) -> list of HxWx3 float32 arrays in [0, 255]

Two implementations:
- `DiffusersDenoiser`: our own img2img loop on a diffusers UNet/VAE (sampler.Sampler), what
  `luna refine` runs.
- `ComfyDenoiser`: ComfyUI's `MODEL` and `VAE` through `comfy.sample.sample`, so a user's LoRAs,
  patches and samplers apply. The batch is one sampler call with the items' noise passed
  explicitly (the only initial noise; ComfyUI's own noise generation is bypassed) and one
  conditioning row per item (ComfyUI applies a conditioning whose batch equals the latent
  batch row by row). `comfy` is imported only when it runs, so the runtime works without it.

Items whose size or time ids differ are denoised in separate sampler calls (SDXL's size
embedding is one per conditioning in ComfyUI).

IP-Adapter: `ComfyDenoiser(ip_adapter=...)` takes any object with `patched(model, embeds [B, D])`
returning a MODEL whose batch item i is conditioned on embedding i (comfyui/ip_adapter.py); each
sampler call gets the clone for its items' `row.image_embed`. (`DiffusersDenoiser` reads the same
rows through the diffusers UNet's loaded IP-Adapter.)
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from lsd_runtime.sampler import DenoiseItem, Sampler, SamplerSettings, sampler_denoiser, tile_tokens


class Denoiser(Protocol):
    def __call__(self, items: list[DenoiseItem]) -> list[np.ndarray]: ...


class DenoiserError(ValueError):
    """Inputs a denoiser cannot run with (names the input)."""


class DiffusersDenoiser:
    """`luna refine`'s denoiser: sampler.Sampler.img2img over a batch (see sampler.py)."""

    def __init__(self, sampler: Sampler, settings: SamplerSettings, negative):
        self.sampler, self.settings, self.negative = sampler, settings, negative
        self._run = sampler_denoiser(sampler, settings, negative)

    def __call__(self, items: list[DenoiseItem]) -> list[np.ndarray]:
        return self._run(items)


# ComfyUI samplers that draw fresh noise every step from one seed per *batch*: with them the
# injected noise would not be the only noise and a crop's result would depend on its batch.
STOCHASTIC_MARKERS = ("ancestral", "sde", "ddpm", "lcm", "seeds_", "sa_solver")


def deterministic(sampler_name: str) -> bool:
    return not any(m in sampler_name for m in STOCHASTIC_MARKERS)


def stack_rows(rows: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditioning rows (cond [L, C], pooled [P]) -> [B, L*, C], [B, P]; token counts tiled to their lcm."""
    length = int(np.lcm.reduce([int(r.cond.shape[0]) for r in rows]))
    cond = torch.stack([tile_tokens(r.cond[None].float(), length)[0] for r in rows])
    return cond, torch.stack([r.pooled.float() for r in rows])


def _groups(items: list[DenoiseItem]) -> list[list[int]]:
    """Indices of items sharing image size and time ids, in order of first appearance."""
    keys: dict = {}
    for i, it in enumerate(items):
        key = (tuple(np.asarray(it.image).shape), tuple(float(v) for v in it.time_ids))
        keys.setdefault(key, []).append(i)
    return list(keys.values())


class ComfyDenoiser:
    """Denoise through ComfyUI's MODEL/VAE with injected noise and per-item conditioning.

    negative: a ComfyUI CONDITIONING (shared by every item). steps/cfg/sampler_name/scheduler/
    denoise mean what they mean on ComfyUI's KSampler; `sigmas` (optional, a 1-D tensor) replaces
    the scheduler's schedule (tests use it to run diffusers' Euler schedule). `progress(n)` is
    called after each sampler call with the number of items done. `ip_adapter` (optional): see the
    module docstring; every item's row must then carry its crop's `image_embed`.
    """

    def __init__(self, model, vae, negative, *, steps: int = 20, cfg: float = 5.0, sampler_name: str = "euler",
                 scheduler: str = "normal", denoise: float = 0.35, sigmas: torch.Tensor | None = None,
                 progress: Callable[[int], None] | None = None, ip_adapter=None):
        if not deterministic(sampler_name):
            raise DenoiserError(f"sampler_name={sampler_name!r} draws new noise every step from one seed per batch; "
                                "the detailer needs a deterministic sampler (euler, dpmpp_2m, ddim, uni_pc, ...)")
        if int(steps) < 1:
            raise DenoiserError(f"steps={steps}: must be >= 1")
        if not 0.0 <= float(denoise) <= 1.0:
            raise DenoiserError(f"denoise={denoise}: must be in [0, 1]")
        self.model, self.vae, self.negative = model, vae, negative
        self.steps, self.cfg, self.sampler_name, self.scheduler = int(steps), float(cfg), sampler_name, scheduler
        self.denoise, self.sigmas, self.progress = float(denoise), sigmas, progress
        self.ip_adapter = ip_adapter

    def model_for(self, group: list[DenoiseItem]):
        """The MODEL for one sampler call: the user's, or its IP-Adapter clone for these items' embeddings."""
        if self.ip_adapter is None:
            return self.model
        missing = [i for i, it in enumerate(group) if getattr(it.row, "image_embed", None) is None]
        if missing:
            raise DenoiserError(f"an IP-Adapter is set but items {missing} carry no image embedding (wrap the "
                                "conditioning source in conditioning.WithImageEmbeds)")
        return self.ip_adapter.patched(self.model, torch.stack([it.row.image_embed.float() for it in group]))

    def positive(self, rows, item: DenoiseItem) -> list:
        """One ComfyUI conditioning entry whose batch is the items: row i conditions latent i."""
        cond, pooled = stack_rows(rows)
        oh, ow, ct, cl, th, tw = (int(round(float(v))) for v in item.time_ids)
        return [[cond, {"pooled_output": pooled, "height": oh, "width": ow, "crop_h": ct, "crop_w": cl,
                        "target_height": th, "target_width": tw}]]

    def encode(self, images: list[np.ndarray]) -> torch.Tensor:
        pixels = torch.from_numpy(np.stack([np.asarray(im, np.float32) for im in images])) / 255.0
        return self.vae.encode(pixels.clamp(0, 1)[..., :3])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        out = self.vae.decode(latents)
        if out.ndim == 5:  # video VAEs return [B, T, H, W, C]
            out = out.reshape(-1, *out.shape[-3:])
        if not torch.isfinite(out).all():
            raise DenoiserError("the VAE decoded NaN/inf (an fp16 SDXL VAE overflowing? use an fp16-fix VAE or "
                                "run the VAE in fp32 with --fp32-vae)")
        return out

    @torch.no_grad()
    def __call__(self, items: list[DenoiseItem]) -> list[np.ndarray]:
        if not items:
            return []
        if self.denoise == 0.0:  # no steps at all: the input, not a VAE round trip
            return [np.asarray(it.image, np.float32).copy() for it in items]
        import comfy.sample  # only here: the runtime works without ComfyUI

        out: list = [None] * len(items)
        for idx in _groups(items):
            group = [items[i] for i in idx]
            latent = self.encode([it.image for it in group])
            noise = torch.stack([it.noise.float() for it in group])
            if tuple(noise.shape) != tuple(latent.shape):
                raise DenoiserError(f"injected noise {tuple(noise.shape)} does not match the latents "
                                    f"{tuple(latent.shape)} (a scaffold with another channel count?)")
            samples = comfy.sample.sample(
                self.model_for(group), noise, self.steps, self.cfg, self.sampler_name, self.scheduler,
                self.positive([it.row for it in group], group[0]), self.negative, latent,
                denoise=self.denoise, sigmas=self.sigmas, disable_pbar=True, seed=int(group[0].seed))
            pixels = self.decode(samples).detach().float().cpu().clamp(0, 1) * 255.0
            for j, i in enumerate(idx):
                out[i] = pixels[j].numpy()
            if self.progress is not None:
                self.progress(len(group))
        return out
