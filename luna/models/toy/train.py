"""Training of the toy checkpoints (`luna make-toy`): fixed seeds, resumable, one stage at a time.

Stages, each saved to `<work>/<stage>.pt` every `checkpoint_every_s` seconds and when it ends
(a rerun continues from there; a finished stage is skipped):
  vae       the SDXL AutoencoderKL (4x downsampling, configs/sdxl-toy/vae) on renders of both styles;
  decoder   its decoder alone, longer, the encoder frozen: the latents the UNet learns stay the same,
            so this can run beside `base` (a second process, `only=[decoder]`);
  base      the UNet and both text encoders, jointly, on "flat" renders (VAE frozen);
  pony      a copy of `base` fine-tuned further, text encoders included, on "outline" renders:
            another style and another text-encoder family;
  vision    the open_clip ViT (`luna-toy-vit`) with cosine attribute heads (dropped at export),
            so that nearest neighbours of its embeddings share attributes.
Then `export` writes `<out>/toy-base-flat.safetensors`, `<out>/toy-pony-outline.safetensors`
(single-file SDXL, original key layout, fp16) and `<out>/luna-toy-vit.safetensors` (visual.* only).

Every batch is drawn from an RNG seeded by (seed, stage, step), so a resumed run sees the same
data as an uninterrupted one and the same seed gives the same weights on the CPU. Batches and
noise are made on the CPU and moved, so `device="cuda"` sees the same data as a CPU run; its weights
differ by the device's arithmetic, and from run to run by cuDNN's non-deterministic backward kernels.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from luna.models.configs import SDXL_TOY
from luna.models.toy import world

STAGES = ("vae", "decoder", "base", "pony", "vision")
CHECKPOINTS = {"base": ("toy-base-flat", "flat"), "pony": ("toy-pony-outline", "outline")}
VISION_NAME = "luna-toy-vit"
SCALING_FACTOR = 0.13025  # SDXL's; the toy VAE's latents are rescaled (folded into its weights) to match it
SIZE = 32  # the size the toy checkpoints generate at (latents 8x8)
_MIN_SNR = 5.0
LOGVAR = -12.0  # the toy VAE's posterior log-variance (a deterministic autoencoder)
# Reconstruction weight of shape pixels against background pixels. The shape covers 8-20% of the
# image: with a plain pixel loss the VAE learns the background first and, after 1,200 steps, still
# confuses the colours (red/blue -> purple: 13% right); weighted 1 + 10 it gets them 100% right.
FG_WEIGHT = 10.0
DEVICE = torch.device("cpu")  # where the stages train (make_toy's `device`); data is made on the CPU and moved


@dataclass
class StageConfig:
    steps: int
    batch: int
    lr: float


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def _config(sub: str) -> dict:
    return json.loads((SDXL_TOY / sub / "config.json").read_text())


def _built(build, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().to(DEVICE)  # built (initialised) on the CPU: the same weights on every device


def _dev(t: torch.Tensor) -> torch.Tensor:
    return t.to(DEVICE, non_blocking=True)


def new_vae(seed: int):
    from diffusers import AutoencoderKL

    return _built(lambda: AutoencoderKL.from_config(_config("vae")), _seed(seed, "vae"))


def new_unet(seed: int):
    from diffusers import UNet2DConditionModel

    return _built(lambda: UNet2DConditionModel.from_config(_config("unet")), _seed(seed, "unet"))


def new_text_encoders(seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    te1 = _built(lambda: CLIPTextModel(CLIPTextConfig(**_config("text_encoder"))), _seed(seed, "te1"))
    te2 = _built(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**_config("text_encoder_2"))), _seed(seed, "te2"))
    return te1, te2


def new_vision(seed: int):
    from luna.models.vision import create_open_clip

    return create_open_clip(VISION_NAME, seed=_seed(seed, "vision")).to(DEVICE)


# ---------------------------------------------------------------- data


def batch_scenes(rng: np.random.Generator, n: int) -> list[world.Scene]:
    return [world.random_scene(rng) for _ in range(n)]


def render_batch(scenes, rng: np.random.Generator, style, size: int = SIZE) -> torch.Tensor:
    """[B,3,H,W] in [-1,1]; `style` is one style or a list of them (one per scene)."""
    styles = [style] * len(scenes) if isinstance(style, str) else list(style)
    return as_batch(np.stack([world.render(s, size, int(rng.integers(2**31)), st) for s, st in zip(scenes, styles)]))


def as_batch(images: np.ndarray) -> torch.Tensor:
    """uint8 [B,H,W,3] renders -> [B,3,H,W] in [-1,1] on the training device."""
    return _dev(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0)


def recon_loss(y: torch.Tensor, x: torch.Tensor, scenes) -> torch.Tensor:
    """L1 + L2 reconstruction loss with the shape's pixels (anything off the flat background)
    weighted 1 + FG_WEIGHT."""
    bg = torch.tensor([world.BACKGROUNDS[s.background] for s in scenes], dtype=x.dtype, device=x.device).view(-1, 3, 1, 1)
    fg = ((x - (bg / 127.5 - 1.0)).abs().amax(dim=1, keepdim=True) > 0.15).to(x.dtype)
    w = 1.0 + FG_WEIGHT * fg
    d = y - x
    return (d.abs() * w).mean() + (d.pow(2) * w).mean()


# ---------------------------------------------------------------- resumable stage loop


class Stage:
    """A stage's modules, optimiser, step and EMA, saved atomically to `<work>/<name>.pt`."""

    def __init__(self, work: Path, name: str, modules: dict, params, cfg: StageConfig, ema: list[str] = ()):
        self.path = work / f"{name}.pt"
        self.name, self.modules, self.cfg = name, modules, cfg
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
        self.ema = {k: copy.deepcopy(modules[k]).requires_grad_(False) for k in ema}
        self.step = 0
        self.done = False
        self.log: list[dict] = []
        if self.path.is_file():
            state = torch.load(self.path, map_location="cpu", weights_only=True)  # tensors, numbers, lists only
            for k, m in modules.items():
                m.load_state_dict(state["modules"][k])
            for k, m in self.ema.items():
                m.load_state_dict(state["ema"][k])
            self.opt.load_state_dict(state["opt"])
            self.step, self.done, self.log = state["step"], state["done"], state["log"]
            if self.done and cfg.steps > self.step:  # more steps asked of a finished stage: continue it
                self.done = False

    def save(self) -> None:
        from luna.files import atomic_path

        state = {"modules": {k: m.state_dict() for k, m in self.modules.items()},
                 "ema": {k: m.state_dict() for k, m in self.ema.items()},
                 "opt": self.opt.state_dict(), "step": self.step, "done": self.done, "log": self.log}
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)

    def lr(self, step: int) -> float:
        """Warm up over 5% of the steps, hold, then a cosine down to 10% over the last 30%."""
        n = self.cfg.steps
        warm, tail = max(1, n // 20), max(1, int(0.3 * n))
        if step < warm:
            return self.cfg.lr * (step + 1) / warm
        if step < n - tail:
            return self.cfg.lr
        t = (step - (n - tail)) / tail
        return self.cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    def run(self, step_fn, every_s: float, ema_decay: float = 0.995, log_file: Path | None = None) -> None:
        from tqdm import tqdm

        if self.done:
            return
        last_save = time.monotonic()
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc=f"make-toy {self.name}", unit="step", dynamic_ncols=True)
        for m in self.modules.values():
            m.train()
        while self.step < self.cfg.steps:
            for g in self.opt.param_groups:
                g["lr"] = self.lr(self.step) * g.get("lr_scale", 1.0)
            loss = step_fn(self.step)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], 1.0)
            self.opt.step()
            decay = min(ema_decay, (1 + self.step) / (10 + self.step))
            with torch.no_grad():
                for k, e in self.ema.items():
                    for pe, pm in zip(e.parameters(), self.modules[k].parameters()):
                        pe.lerp_(pm, 1 - decay)
            self.step += 1
            value = float(loss)
            self.log.append({"step": self.step, "loss": value})
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            if log_file is not None and (self.step % 25 == 0 or self.step == self.cfg.steps):
                recent = [r["loss"] for r in self.log[-25:]]
                with open(log_file, "a") as f:
                    f.write(json.dumps({"stage": self.name, "step": self.step, "loss": sum(recent) / len(recent),
                                        "time": time.strftime("%H:%M:%S")}) + "\n")
            if time.monotonic() - last_save > every_s:
                self.save()
                last_save = time.monotonic()
        bar.close()
        for m in self.modules.values():
            m.eval()
        self.done = True
        self.save()

    def final(self, key: str):
        """The EMA copy of a module when the stage keeps one, else the module."""
        return (self.ema[key] if key in self.ema else self.modules[key]).eval()


# ---------------------------------------------------------------- stages


def mixed_renders(seed: int, stage: str, n: int, i: int) -> tuple[list, np.ndarray]:
    """Step `i`'s `n` random scenes in random styles and their renders (uint8 [B,H,W,3]): a pure
    function of its arguments, so a worker process can draw it ahead of the step."""
    rng = np.random.default_rng(_seed(seed, stage, i))
    scenes = batch_scenes(rng, n)
    styles = [world.STYLES[int(b)] for b in rng.integers(0, 2, n)]
    return scenes, np.stack([world.render(s, SIZE, int(rng.integers(2**31)), st) for s, st in zip(scenes, styles)])


class Prefetch:
    """`fn(i)` for the steps of a stage, computed by `workers` forked processes up to `ahead` steps before
    they are asked for (0 workers: in this process, when asked). Rendering is CPU work the training
    device waits for; the values are the same either way, so the weights are too."""

    def __init__(self, fn, workers: int = 0, ahead: int = 8):
        self.fn, self.workers, self.ahead = fn, int(workers), int(ahead)
        self.pool, self.pending = None, {}

    def __call__(self, i: int):
        if self.workers <= 0:
            return self.fn(i)
        if self.pool is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("fork"))
        for j in range(i, i + self.ahead):
            if j not in self.pending:
                self.pending[j] = self.pool.submit(self.fn, j)
        for j in [j for j in self.pending if j < i]:  # a resumed or repeated step: drop what is behind
            self.pending.pop(j).cancel()
        return self.pending.pop(i).result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool, self.pending = None, {}


RENDER_WORKERS = 0  # make_toy's render_workers: processes drawing the autoencoder and vision stages' batches


def _mixed_batch(renders: Prefetch, seed: int, stage: str, i: int):
    """Step `i` of an autoencoder stage: its scenes, their renders ([B,3,H,W] in [-1,1], from `renders`,
    a Prefetch of this stage's mixed_renders) and the step's own noise generator."""
    scenes, images = renders(i)
    return scenes, as_batch(images), torch.Generator().manual_seed(_seed(seed, f"{stage}-noise", i))


def train_vae(work: Path, cfg: StageConfig, seed: int, every_s: float, log_file=None):
    vae = new_vae(seed)
    stage = Stage(work, "vae", {"vae": vae}, vae.parameters(), cfg)
    renders = Prefetch(functools.partial(mixed_renders, seed, "vae", cfg.batch), RENDER_WORKERS)

    def step(i: int) -> torch.Tensor:
        scenes, x, gen = _mixed_batch(renders, seed, "vae", i)
        # a deterministic autoencoder (the posterior's std is pinned near zero at export, see
        # _fold_latent_scale): a unit-std posterior sample would drown the latents in noise and
        # slow learning 10x; a little noise and an L2 bound keep the latent space smooth
        mean = vae.encode(x).latent_dist.mean
        y = vae.decode(mean + 0.1 * _dev(torch.randn(mean.shape, generator=gen))).sample
        return recon_loss(y, x, scenes) + 1e-4 * mean.pow(2).mean()

    try:
        stage.run(step, every_s, log_file=log_file)
    finally:
        renders.close()
    vae = stage.final("vae")
    if not getattr(vae, "_luna_rescaled", False):
        _fold_latent_scale(vae, seed)
    return vae


@torch.no_grad()
def _fold_latent_scale(vae, seed: int) -> None:
    """Rescale the latent space inside the VAE's weights so that latents * SCALING_FACTOR have unit
    std, as SDXL's do (quant_conv's mean rows * c, post_quant_conv / c), and pin the posterior's
    log-variance to LOGVAR (std ~0.002 against latents of std ~7.7): sampling equals the mode."""
    rng = np.random.default_rng(_seed(seed, "vae-scale"))
    x = render_batch(batch_scenes(rng, 256), rng, [world.STYLES[i % 2] for i in range(256)])
    mean = vae.encode(x).latent_dist.mean
    c = float(1.0 / (mean.std() * SCALING_FACTOR))
    ch = vae.config.latent_channels
    qc, pqc = vae.quant_conv, vae.post_quant_conv
    qc.weight[:ch] *= c
    qc.bias[:ch] *= c
    qc.weight[ch:] = 0.0
    qc.bias[ch:] = LOGVAR
    pqc.weight /= c
    vae.register_to_config(scaling_factor=SCALING_FACTOR)
    vae._luna_rescaled = True


def train_decoder(work: Path, cfg: StageConfig, seed: int, vae, every_s: float, log_file=None):
    """Fine-tune post_quant_conv + decoder on frozen (rescaled) latents; returns the VAE with them."""
    vae.requires_grad_(False)
    params = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    for p in params:
        p.requires_grad_(True)
    parts = {"post_quant_conv": vae.post_quant_conv, "decoder": vae.decoder}
    stage = Stage(work, "decoder", parts, params, cfg)
    renders = Prefetch(functools.partial(mixed_renders, seed, "decoder", cfg.batch), RENDER_WORKERS)

    def step(i: int) -> torch.Tensor:
        scenes, x, gen = _mixed_batch(renders, seed, "decoder", i)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
            z = z + 0.02 / SCALING_FACTOR * _dev(torch.randn(z.shape, generator=gen))  # the UNet's latents are not exact
        y = vae.decode(z).sample
        return recon_loss(y, x, scenes)

    vae.encoder.eval()
    try:
        stage.run(step, every_s, log_file=log_file)
    finally:
        renders.close()
    vae.requires_grad_(False)
    return vae.eval()


def _tokenize(tokenizers, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    out = []
    for tok in tokenizers:
        out.append(tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids)
    return out[0], out[1]


def encode_text(te1, te2, ids1, ids2) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [B,77,C1+C2], pooled [B,P]) as diffusers' SDXL pipeline computes them."""
    h1 = te1(ids1, output_hidden_states=True).hidden_states[-2]
    o2 = te2(ids2, output_hidden_states=True)
    return torch.cat([h1, o2.hidden_states[-2]], dim=-1), o2[0]


def _alphas_cumprod() -> torch.Tensor:
    sched = json.loads((SDXL_TOY / "scheduler" / "scheduler_config.json").read_text())
    betas = torch.linspace(sched["beta_start"] ** 0.5, sched["beta_end"] ** 0.5, sched["num_train_timesteps"]) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


_TIME_SIZES = (32, 64, 128, 256, 512, 1024)


@torch.no_grad()
def latent_pool(vae, seed: int, name: str, style: str, n: int, chunk: int = 128):
    """(scenes, posterior means, posterior stds) of `n` renders: encoded once, sampled every step."""
    from tqdm import tqdm

    rng = np.random.default_rng(_seed(seed, name, "pool"))
    scenes = batch_scenes(rng, n)
    means, stds = [], []
    for k in tqdm(range(0, n, chunk), desc=f"make-toy {name}: encoding {n} renders", unit="batch", leave=False):
        post = vae.encode(render_batch(scenes[k: k + chunk], rng, style)).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return scenes, torch.cat(means), torch.cat(stds)


def train_diffusion(work: Path, name: str, cfg: StageConfig, seed: int, vae, style: str, every_s: float,
                    init: tuple | None = None, te_lr_scale: float = 0.5, log_file=None, pool_size: int = 4096):
    """UNet + both text encoders on `style` renders; `init` = (unet, te1, te2) to fine-tune from."""
    from luna.models.tokenizers import sdxl_tokenizers

    if init is None:
        unet = new_unet(seed)
        te1, te2 = new_text_encoders(seed)
    else:
        unet, te1, te2 = (copy.deepcopy(m).requires_grad_(True) for m in init)  # init holds frozen EMA copies
    tokenizers = sdxl_tokenizers()
    vae.requires_grad_(False)
    groups = [{"params": list(unet.parameters())},
              {"params": list(te1.parameters()) + list(te2.parameters()), "lr_scale": te_lr_scale}]
    stage = Stage(work, name, {"unet": unet, "te1": te1, "te2": te2}, groups, cfg, ema=["unet", "te1", "te2"])
    acp = _dev(_alphas_cumprod())
    empty_ids = tuple(_dev(t) for t in _tokenize(tokenizers, [""]))
    cache: dict[str, tuple] = {}

    def ids_of(prompts):
        missing = [p for p in prompts if p not in cache]
        if missing:
            a, b = _tokenize(tokenizers, missing)
            cache.update({p: (a[i], b[i]) for i, p in enumerate(missing)})
        return _dev(torch.stack([cache[p][0] for p in prompts])), _dev(torch.stack([cache[p][1] for p in prompts]))

    if stage.done:  # finished earlier (e.g. a run that only exports): no pool to encode
        return stage.final("unet"), stage.final("te1"), stage.final("te2")
    pool_scenes, pool_mean, pool_std = latent_pool(vae, seed, name, style, pool_size)

    def step(i: int) -> torch.Tensor:
        rng = np.random.default_rng(_seed(seed, name, i))
        gen = torch.Generator().manual_seed(_seed(seed, name, "noise", i))
        b = cfg.batch
        pick = torch.from_numpy(rng.integers(0, len(pool_scenes), b))
        scenes = [pool_scenes[int(j)] for j in pick]
        pick = _dev(pick)
        mean, std = pool_mean[pick], pool_std[pick]
        z = (mean + std * _dev(torch.randn(mean.shape, generator=gen))) * vae.config.scaling_factor
        ids1, ids2 = ids_of([world.prompt(s) for s in scenes])
        cond, pooled = encode_text(te1, te2, ids1, ids2)
        # 10% unconditional: half the encoded empty prompt (a "" negative), half zeros (force_zeros_for_empty_prompt)
        drop = rng.random(b)
        e1, e2 = empty_ids
        if (drop < 0.1).any():
            ucond, upooled = encode_text(te1, te2, e1, e2)
            for j in np.flatnonzero(drop < 0.05):
                cond, pooled = cond.clone(), pooled.clone()
                cond[j], pooled[j] = ucond[0], upooled[0]
            for j in np.flatnonzero((drop >= 0.05) & (drop < 0.1)):
                cond, pooled = cond.clone(), pooled.clone()
                cond[j], pooled[j] = 0.0, 0.0
        # half the batch with the true size ids, half with arbitrary ones, so that time ids carry nothing
        sizes = rng.choice(_TIME_SIZES, size=(b, 2))
        tids = _dev(torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE] if rng.random() < 0.5 else
                                  [s[0], s[0], 0, 0, s[1], s[1]] for s in sizes], dtype=torch.float32))
        t = _dev(torch.from_numpy(rng.integers(0, len(acp), b)))
        noise = _dev(torch.randn(z.shape, generator=gen))
        a = acp[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        pred = unet(noisy, t, cond, added_cond_kwargs={"text_embeds": pooled, "time_ids": tids}).sample
        snr = acp[t] / (1 - acp[t])
        w = torch.clamp(snr, max=_MIN_SNR) / snr
        return (w * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()

    stage.run(step, every_s, ema_decay=0.995, log_file=log_file)
    return stage.final("unet"), stage.final("te1"), stage.final("te2")


class _Heads(torch.nn.Module):
    """Cosine classifiers, one per attribute, on the normalised image embedding."""

    def __init__(self, dim: int):
        super().__init__()
        sizes = {"shape": world.SHAPES, "color": world.COLORS, "background": world.BACKGROUNDS,
                 "size": world.SIZES, "position": world.POSITIONS, "mark": world.MARKS}
        self.names = list(sizes)
        self.heads = torch.nn.ParameterDict({k: torch.nn.Parameter(torch.randn(len(v), dim) * 0.1) for k, v in sizes.items()})

    def forward(self, emb: torch.Tensor) -> dict[str, torch.Tensor]:
        e = F.normalize(emb, dim=-1)
        return {k: 10.0 * e @ F.normalize(w, dim=-1).T for k, w in self.heads.items()}


_CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
_CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def vision_input(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """[-1,1] images -> the open_clip eval transform's normalised input (bicubic resize, as it does)."""
    x = (x + 1) / 2
    if x.shape[-1] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False).clamp(0, 1)
    return (x - _CLIP_MEAN.to(x.device)) / _CLIP_STD.to(x.device)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image separable Gaussian blur (sigma in pixels, 0 = none), 5-tap."""
    k = torch.arange(-2, 3, dtype=torch.float32, device=x.device)
    w = torch.exp(-(k[None] ** 2) / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    w = w / w.sum(dim=1, keepdim=True)  # [B,5]
    b, c, h, wd = x.shape
    pad = F.pad(x, (2, 2, 2, 2), mode="replicate")
    x = sum(w[:, i].view(b, 1, 1, 1) * pad[:, :, 2:2 + h, i:i + wd] for i in range(5))
    pad = F.pad(x, (0, 0, 2, 2), mode="replicate")
    return sum(w[:, i].view(b, 1, 1, 1) * pad[:, :, i:i + h, :] for i in range(5))


def train_vision(work: Path, cfg: StageConfig, seed: int, every_s: float, log_file=None):
    model = new_vision(seed)
    visual = model.visual
    heads = _built(lambda: _Heads(int(visual.output_dim)), _seed(seed, "heads"))
    stage = Stage(work, "vision", {"visual": visual, "heads": heads}, list(visual.parameters()) + list(heads.parameters()), cfg)
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    renders = Prefetch(functools.partial(mixed_renders, seed, "vision", cfg.batch), RENDER_WORKERS)

    def step(i: int) -> torch.Tensor:
        scenes, images = renders(i)
        x = as_batch(images)
        with torch.no_grad():  # blur, noise and a colour shift: generated images are softer than renders
            gen = torch.Generator().manual_seed(_seed(seed, "vision-noise", i))
            x = _blur(x, _dev(torch.rand(cfg.batch, generator=gen) * 1.2))
            x = x + 0.08 * _dev(torch.rand(cfg.batch, 3, 1, 1, generator=gen) - 0.5)
            x = (x + 0.04 * _dev(torch.randn(x.shape, generator=gen))).clamp(-1, 1)
        logits = heads(visual(vision_input(x, size)))
        loss = 0.0
        for k in heads.names:
            values = list(_VALUES[k])
            target = _dev(torch.tensor([values.index(getattr(s, k)) for s in scenes]))
            loss = loss + F.cross_entropy(logits[k], target)
        return loss

    try:
        stage.run(step, every_s, log_file=log_file)
    finally:
        renders.close()
    model.visual = stage.final("visual")
    return model.eval()


_VALUES = {"shape": world.SHAPES, "color": tuple(world.COLORS), "background": tuple(world.BACKGROUNDS),
           "size": world.SIZES, "position": world.POSITIONS, "mark": tuple(world.MARKS)}


# ---------------------------------------------------------------- export


def make_pipeline(unet, vae, te1, te2):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from luna.models.tokenizers import sdxl_tokenizers

    tok, tok2 = sdxl_tokenizers()
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2, unet=unet,
        scheduler=EulerDiscreteScheduler.from_pretrained(SDXL_TOY, subfolder="scheduler"),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def export(out: Path, vae, diffusion: dict, vision_model) -> list[Path]:
    """Write the checkpoints (single file, fp16) and the vision tower (visual.* only, fp16)."""
    from safetensors.torch import save_file

    from luna.files import atomic_path
    from luna.models.tiny import write_single_file

    out.mkdir(parents=True, exist_ok=True)
    written = []
    vae = vae.cpu()
    for stage, (unet, te1, te2) in diffusion.items():
        name, _ = CHECKPOINTS[stage]
        written.append(write_single_file(make_pipeline(unet.cpu(), vae, te1.cpu(), te2.cpu()), out / f"{name}.safetensors"))
    if vision_model is not None:
        state = {k: v.to("cpu", torch.float16).contiguous() for k, v in vision_model.state_dict().items() if k.startswith("visual.")}
        path = out / f"{VISION_NAME}.safetensors"
        with atomic_path(path) as tmp:
            save_file(state, str(tmp))
        written.append(path)
    return written


def make_toy(work, out, seed: int, stages: dict[str, StageConfig], checkpoint_every_s: float = 180.0,
             threads: int | None = None, only=None, pool_size: int = 4096, device: str = "cpu",
             render_workers: int | str = 0) -> list[Path]:
    """Run (or continue) every stage in `work`, then export the weights into `out`.

    `only` = a subset of STAGES runs just those (e.g. the vision stage in a second process, which
    needs no other stage) and exports nothing; a later run without `only` finds them done.
    `device` = where the stages train ("cpu", "cuda", "cuda:1"); a stage saved on one device
    continues on another. `render_workers` = processes drawing the autoencoder and vision stages'
    batches ahead of the steps (the same batches: the same weights); "auto" = on a GPU up to 4 (every
    core but two), on the CPU 1 when a core is left beside the torch threads, else 0. On this
    project's 2-core machine with 1 torch thread, one worker made the vision stage 1.54x faster
    (benchmarks/toy_render_bench.py)."""
    global DEVICE, RENDER_WORKERS
    from luna.settings import number_or_auto, resolve_device, usable_cores

    try:
        DEVICE = torch.device(resolve_device(device))
    except RuntimeError as exc:
        raise ValueError(f"device={device!r}: not a device (auto, cpu, cuda, cuda:1): {exc}") from None
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: no CUDA device here (torch.cuda.is_available() is False)")
    n = number_or_auto(render_workers, "render_workers", int, "a number of processes (0: in this process)")
    cores = usable_cores()
    spare = cores - 2 if DEVICE.type == "cuda" else min(1, cores - torch.get_num_threads())
    RENDER_WORKERS = n if n is not None else max(0, min(4, spare))
    work, out = Path(work), Path(out)
    work.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(int(threads))
    log_file = work / "train.log"
    wanted = set(STAGES if not only else only)
    unknown = wanted - set(STAGES)
    if unknown:
        raise ValueError(f"only={sorted(unknown)}: not stages of make-toy (one of {list(STAGES)})")
    if "vision" in wanted:
        vision = train_vision(work, stages["vision"], seed, checkpoint_every_s, log_file)
    if wanted & {"vae", "decoder", "base", "pony"}:
        vae = train_vae(work, stages["vae"], seed, checkpoint_every_s, log_file)
    if wanted & {"base", "pony"}:  # the UNet learns the encoder's latents, which the decoder stage keeps
        base = train_diffusion(work, "base", stages["base"], seed, vae, "flat", checkpoint_every_s,
                               log_file=log_file, pool_size=pool_size)
    if "pony" in wanted:
        pony = train_diffusion(work, "pony", stages["pony"], seed, vae, "outline", checkpoint_every_s, init=base,
                               te_lr_scale=1.0, log_file=log_file, pool_size=pool_size)
    if "decoder" in wanted:
        vae = train_decoder(work, stages["decoder"], seed, vae, checkpoint_every_s, log_file)
    if only:
        return []
    return export(out, vae, {"base": base, "pony": pony}, vision)
