"""Our own SDXL img2img loop on the diffusers UNet and scheduler: the injected noise is the only noise.

Why not StableDiffusionXLImg2ImgPipeline: its `latents` argument changed meaning across versions
and its VAE encode samples the posterior with its own generator (DESIGN.md §3). Here:

    x0 = scaling_factor * vae.encode(pixels).latent_dist.mode()          (never sample; EDM: (z - mean) * sf / std)
    timesteps = scheduler.timesteps[t_start:]  (t_start from strength, as diffusers' get_timesteps)
    x = scheduler.add_noise(x0, injected_noise, timesteps[0])            (the only initial noise)
    for t: eps = unet([x, x], t, [neg; pos], text_embeds=[neg_pooled; pooled], time_ids)  -> CFG -> step
    pixels = vae.decode(x / scaling_factor)  in fp32, isfinite-checked

Every batch row has its own conditioning, pooled vector, time ids, optional IP-Adapter image
embedding and (for ancestral / SDE samplers) its own seeded generator, so a row's result does
not depend on which other rows share its batch.

The scheduler follows the checkpoint's prediction type (`prediction`: epsilon, v, v+ztsnr, edm,
from luna.models.inventory), built by luna.models.sampling exactly as the factory's worker builds
it: v-prediction, zero-terminal-SNR rescaling with trailing timesteps, or the EDM twin with the
VAE's latent statistics. `prediction=None` keeps the pipeline's scheduler config as it is.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np
import torch

from luna.models.sdxl import NonFiniteError

# name -> (scheduler class name, extra config, draws fresh noise each step)
SAMPLERS: dict[str, tuple[str, dict, bool]] = {
    "euler": ("EulerDiscreteScheduler", {}, False),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, True),
    "ddim": ("DDIMScheduler", {}, False),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, False),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, True),
}


class SamplerError(ValueError):
    """Settings or inputs the sampler cannot run with (names the setting)."""


@dataclass
class SamplerSettings:
    steps: int = 20
    strength: float = 0.35
    cfg: float = 5.0
    sampler: str = "euler"

    def check(self) -> None:
        if self.sampler not in SAMPLERS:
            raise SamplerError(f"sampler={self.sampler!r}: choose one of {sorted(SAMPLERS)}")
        if int(self.steps) < 1:
            raise SamplerError(f"steps={self.steps}: must be >= 1")
        if not 0.0 <= float(self.strength) <= 1.0:
            raise SamplerError(f"strength={self.strength}: must be in [0, 1]")

    @property
    def stochastic(self) -> bool:
        return SAMPLERS[self.sampler][2]


@dataclass
class CondBatch:
    """One conditioning row per batch item (CFG negative rows included)."""

    cond: torch.Tensor  # [B, L, C]
    pooled: torch.Tensor  # [B, P]
    neg_cond: torch.Tensor  # [B, L', C]
    neg_pooled: torch.Tensor  # [B, P]
    time_ids: torch.Tensor  # [B, 6]: original (h, w), crop (top, left), target (h, w)
    image_embeds: torch.Tensor | None = None  # [B, D] IP-Adapter embeddings, one distinct row per item
    neg_image_embeds: torch.Tensor | None = None  # [B, D]; zeros when None

    def __len__(self) -> int:
        return int(self.cond.shape[0])

    def rows(self, idx) -> "CondBatch":
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return CondBatch(self.cond[idx], self.pooled[idx], self.neg_cond[idx], self.neg_pooled[idx],
                         self.time_ids[idx], pick(self.image_embeds), pick(self.neg_image_embeds))


def tile_tokens(t: torch.Tensor, length: int) -> torch.Tensor:
    """Repeat a [B, L, C] token sequence to `length` (a multiple of L).

    Cross-attention over a sequence repeated n times equals attention over the sequence itself
    (every key and value appears n times: the softmax weights split evenly), so rows of
    77 and 154 tokens can share a batch.
    """
    n, rem = divmod(length, t.shape[1])
    if rem:
        raise SamplerError(f"cannot batch token sequences of {t.shape[1]} and {length} tokens")
    return t if n == 1 else t.repeat(1, n, 1)


def time_ids(original_hw, crop_tl=(0, 0), target_hw=None, batch: int = 1) -> torch.Tensor:
    """SDXL micro-conditioning rows [B, 6]."""
    target_hw = target_hw or original_hw
    return torch.tensor([[*original_hw, *crop_tl, *target_hw]], dtype=torch.float32).repeat(batch, 1)


def scheduler_plan(base_config, name: str, prediction: str | None = None, latents_mean=None, latents_std=None):
    """The luna.models.sampling plan of sampler `name` for a checkpoint of `prediction` type (None: the
    config as it is); SamplerError naming the sampler when the checkpoint cannot be sampled with it."""
    from luna.models.sampling import SamplingPlan, UnsupportedSampling, sampling_plan

    if name not in SAMPLERS:
        raise SamplerError(f"sampler={name!r}: choose one of {sorted(SAMPLERS)}")
    cls_name, extra, _ = SAMPLERS[name]
    config = {**dict(base_config), **extra}
    if prediction is None:
        return SamplingPlan(cls_name, config)
    try:
        return sampling_plan(config, cls_name, prediction, latents_mean=latents_mean, latents_std=latents_std)
    except UnsupportedSampling as e:
        raise SamplerError(f"sampler={name!r}: {e}") from None


def make_scheduler(base_config, name: str, prediction: str | None = None, latents_mean=None, latents_std=None):
    import diffusers

    plan = scheduler_plan(base_config, name, prediction, latents_mean, latents_std)
    return getattr(diffusers, plan.scheduler_class).from_config(plan.scheduler_config)


def item_generators(seeds) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(int(s) & (2**63 - 1)) for s in seeds]


class Sampler:
    """UNet + VAE + scheduler config; `img2img` runs batches with injected noise.

    The VAE runs in `vae_dtype` (fp32 by default: SDXL's VAE overflows in fp16); the UNet in
    its own dtype (fp16/bf16 on GPU). `vae_tiling_above`: VAE tiling for images whose longer side
    exceeds it (4K); slicing decodes a batch one image at a time. `prediction`: the checkpoint's
    prediction type (None: the scheduler config as given); an EDM checkpoint's VAE gets its latent
    statistics (`latents_mean`/`latents_std`, Playground v2.5's when None) and scaling 0.5.
    """

    def __init__(self, unet, vae, scheduler_config, *, force_zeros_for_empty_prompt: bool = True,
                 vae_dtype=torch.float32, vae_tiling_above: int = 2048, vae_slicing: bool = True,
                 prediction: str | None = None, latents_mean=None, latents_std=None):
        self.unet, self.vae = unet.eval(), vae.eval()
        self.scheduler_config = dict(scheduler_config)
        self.prediction = prediction
        self.latents_mean, self.latents_std = latents_mean, latents_std
        if prediction is not None:  # the VAE side of the plan does not depend on the sampler name
            vae_config = scheduler_plan(self.scheduler_config, "euler", prediction, latents_mean, latents_std).vae_config
            if vae_config:
                self.vae.register_to_config(**vae_config)
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.vae_dtype = vae_dtype
        self.vae_tiling_above = int(vae_tiling_above)
        if vae_dtype is not None and self.vae.dtype != vae_dtype:
            self.vae.to(vae_dtype)
        if vae_slicing and hasattr(self.vae, "enable_slicing"):
            self.vae.enable_slicing()

    @classmethod
    def from_pipeline(cls, pipe, **kw) -> "Sampler":
        force = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", True))
        return cls(pipe.unet, pipe.vae, pipe.scheduler.config, force_zeros_for_empty_prompt=force, **kw)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    @property
    def pooled_dim(self) -> int:
        c = self.unet.config
        return int(c.projection_class_embeddings_input_dim) - 6 * int(c.addition_time_embed_dim)

    @property
    def has_ip_adapter(self) -> bool:
        return getattr(self.unet.config, "encoder_hid_dim_type", None) == "ip_image_proj"

    # ------------------------------------------------------------------ VAE
    def _vae_mode(self, side: int):
        tile = side > self.vae_tiling_above
        if tile != getattr(self.vae, "use_tiling", False) and hasattr(self.vae, "enable_tiling"):
            self.vae.enable_tiling() if tile else self.vae.disable_tiling()

    def _latent_stats(self, like: torch.Tensor):
        """(mean, std) [1, C, 1, 1] of the VAE's latents when its config has them (EDM), else (None, None)."""
        c = self.vae.config
        mean, std = getattr(c, "latents_mean", None), getattr(c, "latents_std", None)
        if mean is None or std is None:
            return None, None
        shape = (1, len(mean), 1, 1)
        return (torch.tensor(mean, dtype=torch.float32, device=like.device).view(shape),
                torch.tensor(std, dtype=torch.float32, device=like.device).view(shape))

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> scaled latents [B, 4, H/8, W/8] float32 (posterior mode); with latent
        statistics (EDM), (z - mean) * scaling_factor / std, as diffusers' SDXL img2img pipeline does."""
        self._vae_mode(max(pixels.shape[-2:]))
        z = self._guarded(lambda vae: vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode(), "encode")
        mean, std = self._latent_stats(z)
        if mean is not None:
            return (z - mean) * self.vae.config.scaling_factor / std
        return z * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels [B, 3, H, W] float32 in [-1, 1] (the inverse of `encode`'s scaling)."""
        self._vae_mode(8 * max(latents.shape[-2:]))
        mean, std = self._latent_stats(latents)
        if mean is not None:
            z = latents.float() * std / self.vae.config.scaling_factor + mean
        else:
            z = latents / self.vae.config.scaling_factor
        return self._guarded(lambda vae: vae.decode(z.to(vae.device, vae.dtype)).sample, "decode").clamp(-1, 1)

    def scheduler_plan(self, name: str):
        """The scheduler this checkpoint gets for sampler `name` (SamplerError when it cannot be sampled with it)."""
        return scheduler_plan(self.scheduler_config, name, self.prediction, self.latents_mean, self.latents_std)

    def make_scheduler(self, name: str):
        return make_scheduler(self.scheduler_config, name, self.prediction, self.latents_mean, self.latents_std)

    def _guarded(self, run, what: str) -> torch.Tensor:
        out = run(self.vae).float()
        if torch.isfinite(out).all():
            return out
        if self.vae.dtype != torch.float32:  # fp16/bf16 overflow: retry once upcast
            saved = self.vae.dtype
            self.vae.to(torch.float32)
            try:
                out = run(self.vae).float()
            finally:
                self.vae.to(saved)
            if torch.isfinite(out).all():
                return out
        raise NonFiniteError(f"VAE {what} produced NaN/inf even in float32; the VAE weights or the input "
                             "are broken (try an fp16-fix VAE or check the checkpoint)")

    # ------------------------------------------------------------------ denoising
    def _check(self, cond: CondBatch, noise: torch.Tensor, latents: torch.Tensor) -> None:
        b = latents.shape[0]
        if noise.shape != latents.shape:
            raise SamplerError(f"injected noise {tuple(noise.shape)} does not match the latents {tuple(latents.shape)}")
        if len(cond) != b:
            raise SamplerError(f"{len(cond)} conditioning rows for {b} batch items (one row per item)")
        if cond.cond.shape[-1] != self.cross_attention_dim:
            raise SamplerError(f"conditioning width {cond.cond.shape[-1]} does not match the UNet's cross-attention "
                               f"dim {self.cross_attention_dim} (a vault/projector for another checkpoint family?)")
        if cond.pooled.shape[-1] != self.pooled_dim:
            raise SamplerError(f"pooled width {cond.pooled.shape[-1]} does not match the UNet's {self.pooled_dim}")
        if self.has_ip_adapter and cond.image_embeds is None:
            raise SamplerError("the UNet has an IP-Adapter loaded: give one image embedding per batch item")

    @staticmethod
    def fit_noise(noise: torch.Tensor, latents: torch.Tensor, seeds=None) -> torch.Tensor:
        """The scaffold's noise lives on SDXL's 8 px latent grid; a VAE with another factor (the toy
        preset's 4x) gets it resampled to its own grid, still white and the same for the same seed."""
        if noise.dim() != 4 or latents.dim() != 4 or noise.shape[:2] != latents.shape[:2] \
                or noise.shape[-2:] == latents.shape[-2:]:
            return noise
        from lsd_runtime.scaffold import derived_generator, resample_noise

        size = tuple(int(v) for v in latents.shape[-2:])
        return torch.stack([resample_noise(n, size, derived_generator("vae_grid", int(seeds[i]) if seeds is not None else i,
                                                                      size)) for i, n in enumerate(noise)])

    @torch.no_grad()
    def denoise(self, latents: torch.Tensor, noise: torch.Tensor, cond: CondBatch, settings: SamplerSettings,
                seeds=None) -> torch.Tensor:
        """Clean latents [B,4,h,w] + injected noise [B,4,h,w] -> denoised latents (float32)."""
        settings.check()
        noise = self.fit_noise(noise, latents, seeds)
        self._check(cond, noise, latents)
        b = latents.shape[0]
        dev, dt = self.device, self.dtype
        sched = self.make_scheduler(settings.sampler)
        steps = int(settings.steps)
        sched.set_timesteps(steps, device=dev)
        init = min(int(steps * float(settings.strength)), steps)
        t_start = max(steps - init, 0) * sched.order
        timesteps = sched.timesteps[t_start:]
        if len(timesteps) == 0:
            return latents.float()
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start)
        x = sched.add_noise(latents.to(dev, torch.float32), noise.to(dev, torch.float32), timesteps[:1].repeat(b))

        use_cfg = float(settings.cfg) > 1.0
        length = max(cond.cond.shape[1], cond.neg_cond.shape[1]) if use_cfg else cond.cond.shape[1]
        pos = tile_tokens(cond.cond, length)
        if use_cfg:
            hidden = torch.cat([tile_tokens(cond.neg_cond, length), pos])
            pooled = torch.cat([cond.neg_pooled, cond.pooled])
            tids = torch.cat([cond.time_ids, cond.time_ids])
        else:
            hidden, pooled, tids = pos, cond.pooled, cond.time_ids
        added = {"text_embeds": pooled.to(dev, dt), "time_ids": tids.to(dev, dt)}
        if self.has_ip_adapter:
            from lsd_runtime.ip_adapter import ip_image_embeds

            added["image_embeds"] = ip_image_embeds(cond.image_embeds, cond.neg_image_embeds, use_cfg, dev, dt)
        hidden = hidden.to(dev, dt)

        step_kw = {}
        if "generator" in inspect.signature(sched.step).parameters and settings.stochastic:
            if seeds is None:
                raise SamplerError(f"sampler {settings.sampler!r} draws noise every step: give one seed per item")
            step_kw["generator"] = item_generators(seeds)
        for t in timesteps:
            inp = torch.cat([x, x]) if use_cfg else x
            inp = sched.scale_model_input(inp, t).to(dt)
            eps = self.unet(inp, t, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)[0].float()
            if use_cfg:
                neg, posv = eps.chunk(2)
                eps = neg + float(settings.cfg) * (posv - neg)
            x = sched.step(eps, t, x, return_dict=False, **step_kw)[0].float()
        return x

    @torch.no_grad()
    def img2img(self, pixels: torch.Tensor, noise: torch.Tensor, cond: CondBatch, settings: SamplerSettings,
                seeds=None) -> torch.Tensor:
        """Pixels [B,3,H,W] in [-1,1] -> refined pixels [B,3,H,W] in [-1,1] (float32, CPU)."""
        latents = self.encode(pixels)
        out = self.denoise(latents, noise, cond, settings, seeds)
        return self.decode(out).cpu()


# ---------------------------------------------------------------------- image conversions


def to_pixels(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 or float [0,255] HxWx3 arrays -> [B,3,H,W] float32 in [-1, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def from_pixels(pixels: torch.Tensor) -> list[np.ndarray]:
    """[B,3,H,W] in [-1, 1] -> float32 HxWx3 arrays in [0, 255]."""
    arr = ((pixels.float().clamp(-1, 1) + 1.0) * 127.5).permute(0, 2, 3, 1).cpu().numpy()
    return [a for a in arr]


@dataclass
class DenoiseItem:
    """One crop or tile handed to a denoiser."""

    image: np.ndarray  # HxWx3 float32 in [0, 255] at working size
    noise: torch.Tensor  # [4, H/8, W/8]
    row: "object"  # conditioning.CondRow
    seed: int
    time_ids: torch.Tensor = field(default_factory=lambda: torch.zeros(6))


def sampler_denoiser(sampler: Sampler, settings: SamplerSettings, negative):
    """A batch denoiser `f(items) -> list of HxWx3 float arrays` running `sampler.img2img`.

    `negative` = (neg_cond [L, C], neg_pooled [P]) shared by every item.
    """
    neg_cond, neg_pooled = negative

    def run(items: list[DenoiseItem]) -> list[np.ndarray]:
        if not items:
            return []
        length = int(np.lcm.reduce([int(it.row.cond.shape[0]) for it in items]))
        cond = torch.stack([tile_tokens(it.row.cond[None].float(), length)[0] for it in items])
        pooled = torch.stack([it.row.pooled.float() for it in items])
        embeds = None
        if sampler.has_ip_adapter:
            if any(getattr(it.row, "image_embed", None) is None for it in items):
                raise SamplerError("IP-Adapter loaded but a crop has no image embedding")
            embeds = torch.stack([it.row.image_embed.float() for it in items])
        batch = CondBatch(
            cond=cond, pooled=pooled,
            neg_cond=neg_cond[None].float().expand(len(items), -1, -1),
            neg_pooled=neg_pooled[None].float().expand(len(items), -1),
            time_ids=torch.stack([it.time_ids.float() for it in items]),
            image_embeds=embeds,
        )
        pixels = to_pixels([it.image for it in items])
        noise = torch.stack([it.noise for it in items])
        out = sampler.img2img(pixels, noise, batch, settings, seeds=[it.seed for it in items])
        return from_pixels(out)

    return run


# ---------------------------------------------------------------------- memory


def auto_batch_size(sampler: Sampler, working_size: int, cfg: bool = True, cap: int = 8, cpu_default: int = 4) -> int:
    """Crops per batch that fit the free GPU memory (an estimate, halved for safety); `cpu_default` on CPU.

    Activation memory of an SDXL UNet forward grows with the latent area and the batch (x2 with
    CFG); ~1.6 GB per 1024 px item in half precision with SDPA, scaled by the UNet's width.
    """
    dev = sampler.device
    if dev.type != "cuda":
        return cpu_default
    free, _ = torch.cuda.mem_get_info(dev)
    width = float(sampler.unet.config.block_out_channels[-1]) / 1280.0
    per_item = 1.6e9 * (working_size / 1024.0) ** 2 * width * (2 if cfg else 1)
    per_item *= 2 if sampler.dtype == torch.float32 else 1
    return int(max(1, min(cap, (free * 0.5) // max(per_item, 1.0))))
