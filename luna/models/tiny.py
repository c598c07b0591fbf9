"""The tiny preset: SDXL's real diffusers/transformers architectures at tiny sizes, deterministic weights.

A tiny checkpoint has a UNet of its own (seeded by its index) and text encoders determined by its
family (seeded by the family name), so two checkpoints of one family share text encoders, as two
fine-tunes of SDXL base do, while a "pony" checkpoint has text encoders of its own, as Pony does.
Weights are rounded to fp16 and written in fp16 (the community format); loaded in fp32 they give
the same numbers in both on-disk formats.
"""
from __future__ import annotations

import contextlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from luna.files import atomic_dir, atomic_path
from luna.models.configs import SDXL_TINY

FAMILIES = ("base", "pony")
TINY_VISION = "luna-tiny-vit"  # open_clip architecture name of the tiny vision tower


@dataclass(frozen=True)
class CheckpointFiles:
    """One tiny checkpoint written in both on-disk formats."""

    name: str
    family: str
    index: int
    single_file: Path  # out_dir/single/<name>.safetensors, original SDXL key layout
    diffusers_dir: Path  # out_dir/diffusers/<name>/


def _config(sub: str) -> dict:
    return json.loads((SDXL_TINY / sub / "config.json").read_text())


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def _seeded(build, seed: int):
    """Build a module under a fixed RNG state, then round its weights to fp16 precision."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(torch.float16).to(p.dtype))
    return module.eval()


def tiny_unet(index: int = 0):
    from diffusers import UNet2DConditionModel

    return _seeded(lambda: UNet2DConditionModel.from_config(_config("unet")), _seed("unet", index))


def tiny_vae():
    from diffusers import AutoencoderKL

    def build():
        vae = AutoencoderKL.from_config(_config("vae"))
        # Random init decodes to a nearly flat grey; give the tiny VAE visible contrast so that
        # images differ visibly between checkpoints, prompts and seeds (the factory's flat-image gate).
        with torch.no_grad():
            vae.decoder.conv_out.weight.mul_(3.0)
        return vae

    return _seeded(build, _seed("vae"))


def tiny_text_encoders(family: str = "base"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    te1 = _seeded(lambda: CLIPTextModel(CLIPTextConfig(**_config("text_encoder"))), _seed("text_encoder", family))
    te2 = _seeded(
        lambda: CLIPTextModelWithProjection(CLIPTextConfig(**_config("text_encoder_2"))), _seed("text_encoder_2", family)
    )
    return te1, te2


def tiny_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_pretrained(SDXL_TINY, subfolder="scheduler")


def tiny_pipeline(index: int = 0, family: str = "base"):
    """An in-memory tiny StableDiffusionXLPipeline (fp32, CPU): checkpoint `index` of `family`."""
    from diffusers import StableDiffusionXLPipeline

    from luna.models.tokenizers import sdxl_tokenizers

    tok, tok2 = sdxl_tokenizers()
    te1, te2 = tiny_text_encoders(family)
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tok,
        tokenizer_2=tok2,
        unet=tiny_unet(index),
        scheduler=tiny_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def one_thread():
    """Tiny models gain nothing from intra-op threads, and spin-waiting OpenMP threads on a busy
    machine make them 10x slower: run tiny work on one thread."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def checkpoint_name(index: int, family: str) -> str:
    return f"tiny-{family}-{index}"


def write_single_file(pipe, path: Path) -> Path:
    """Write `pipe` as one fp16 .safetensors in the original SDXL key layout (temporary name, then rename)."""
    from safetensors.torch import save_file

    from luna.models.convert import pipeline_to_original

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(torch.float16) for k, v in pipeline_to_original(pipe).items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "modelspec.architecture": "stable-diffusion-xl-v1-base"})
    return path


def write_diffusers(pipe, folder: Path) -> Path:
    """Write `pipe` as an fp16 diffusers folder (built beside it, then swapped in: `luna.files.atomic_dir`)."""
    from luna.models.sdxl import _quiet

    with atomic_dir(folder) as tmp, _quiet():
        pipe.to(torch.float16)
        try:
            pipe.save_pretrained(tmp, safe_serialization=True)
        finally:
            pipe.to(torch.float32)
    return Path(folder)


def write_checkpoints(out_dir, n: int = 2, families=FAMILIES) -> list[CheckpointFiles]:
    """Write `n` distinct tiny checkpoints (families cycle) as single files and diffusers folders."""
    out_dir = Path(out_dir)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not families or any(not f or "." in f or "/" in f for f in families):
        raise ValueError(f"families must be non-empty names without dots or slashes, got {list(families)}")
    written = []
    with one_thread():
        for index in range(n):
            family = families[index % len(families)]
            name = checkpoint_name(index, family)
            pipe = tiny_pipeline(index, family)
            single = write_single_file(pipe, out_dir / "single" / f"{name}.safetensors")
            folder = write_diffusers(pipe, out_dir / "diffusers" / name)
            written.append(CheckpointFiles(name, family, index, single, folder))
    return written


def write_vision(out_dir) -> Path:
    """Write the tiny open_clip vision model's weights (the whole open_clip state dict, safetensors)."""
    from safetensors.torch import save_file

    from luna.models.vision import create_open_clip

    with one_thread():
        model = create_open_clip(TINY_VISION)
    path = Path(out_dir) / f"{TINY_VISION}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    return path
