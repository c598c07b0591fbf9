"""IP-Adapter from local weights, with one distinct image embedding per batch item.

Loading is diffusers' own (`pipe.load_ip_adapter` from a local folder, never the hub; no image
encoder: the runtime embeds crops itself with luna.models.vision). Calling is ours: diffusers'
pipelines repeat `ip_adapter_image_embeds` by the batch size, which mixes the items of a batch
(diffusers issue 9813). The sampler instead hands the UNet
`added_cond_kwargs["image_embeds"] = [tensor(2B, 1, D)]`: row i (and B + i, its CFG negative)
belongs to item i only. The projection and the IP attention processors are per row.

The original IP-Adapter for SDXL (ip-adapter_sdxl.safetensors) expects ViT-bigG-14 image
embeddings (1280-d): run the runtime's vision tower as `vision.name=ViT-bigG-14` then.
"""
from __future__ import annotations

from pathlib import Path

import torch

from luna.files import atomic_path


class IPAdapterError(ValueError):
    """IP-Adapter weights that cannot be used here (missing file, wrong embedding size)."""


def load_ip_adapter(pipe, path, scale: float = 0.6) -> int:
    """Load an IP-Adapter safetensors file (or a folder holding one) into `pipe`; returns its image-embed dim."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise IPAdapterError(f"{path}: expected exactly one IP-Adapter .safetensors file, found {len(files)}")
        path = files[0]
    if not path.is_file():
        raise IPAdapterError(f"{path}: no such IP-Adapter weights file")
    if path.suffix != ".safetensors":
        raise IPAdapterError(f"{path}: IP-Adapter weights must be .safetensors (pickles are not loaded)")
    try:
        pipe.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None,
                             local_files_only=True)
    except (KeyError, RuntimeError, OSError, ValueError) as exc:
        raise IPAdapterError(f"{path}: not an IP-Adapter for this UNet ({type(exc).__name__}: {exc})") from exc
    pipe.set_ip_adapter_scale(float(scale))
    return image_embed_dim(pipe.unet)


def image_embed_dim(unet) -> int:
    """The image-embedding width the loaded IP-Adapter's projection takes."""
    proj = getattr(unet, "encoder_hid_proj", None)
    if proj is None or not hasattr(proj, "image_projection_layers"):
        raise IPAdapterError("no IP-Adapter is loaded in this UNet")
    layer = proj.image_projection_layers[0]
    lin = getattr(layer, "image_embeds", None)
    if lin is None:
        raise IPAdapterError(f"IP-Adapter projection {type(layer).__name__} is not supported (plain IP-Adapter only)")
    return int(lin.in_features)


def ip_image_embeds(embeds: torch.Tensor, negative: torch.Tensor | None, use_cfg: bool, device, dtype) -> list:
    """`added_cond_kwargs["image_embeds"]` with one row per item: [tensor(2B or B, 1, D)].

    Rows follow the sampler's CFG order [negatives; positives]; negatives default to zeros
    (what diffusers uses for a plain IP-Adapter's unconditional branch).
    """
    embeds = torch.as_tensor(embeds).float()
    if embeds.ndim != 2:
        raise IPAdapterError(f"image embeddings must be [B, D], got {tuple(embeds.shape)}")
    if use_cfg:
        neg = torch.zeros_like(embeds) if negative is None else torch.as_tensor(negative).float()
        embeds = torch.cat([neg, embeds])
    return [embeds[:, None, :].to(device, dtype)]


def write_tiny_ip_adapter(unet, image_dim: int, path, seed: int = 0, tokens: int = 4, std: float = 0.2) -> Path:
    """A random plain IP-Adapter for `unet` in the original key layout (tests and benchmarks)."""
    from safetensors.torch import save_file

    cross = int(unet.config.cross_attention_dim)
    g = torch.Generator("cpu").manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g) * std  # noqa: E731
    state = {"image_proj.proj.weight": rnd(tokens * cross, image_dim), "image_proj.proj.bias": rnd(tokens * cross),
             "image_proj.norm.weight": torch.ones(cross), "image_proj.norm.bias": torch.zeros(cross)}
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = _hidden_size(unet, name)
        state[f"ip_adapter.{key}.to_k_ip.weight"] = rnd(hidden, cross)
        state[f"ip_adapter.{key}.to_v_ip.weight"] = rnd(hidden, cross)
        key += 2
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    return path


def _hidden_size(unet, name: str) -> int:
    outs = list(unet.config.block_out_channels)
    if name.startswith("mid_block"):
        return outs[-1]
    if name.startswith("up_blocks"):
        return list(reversed(outs))[int(name[len("up_blocks.")])]
    return outs[int(name[len("down_blocks.")])]
