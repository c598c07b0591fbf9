"""ComfyUI "Luna Vault Query" node: an image (crop) -> retrieved SDXL conditioning, optionally blended.

ComfyUI types: IMAGE is a float tensor [B,H,W,C] in 0..1; CONDITIONING is a list of
`[cond [1,T,2048], {"pooled_output": [1,1280], ...}]`. This module imports nothing from ComfyUI,
so it loads (and is tested) without it.
"""
from __future__ import annotations

import json

import numpy as np
import torch

_VAULTS: dict[str, object] = {}


def _open(path: str):
    """One open vault (or service client) per path/address, kept across prompts."""
    from vault.service import open_vault

    if path not in _VAULTS:
        _VAULTS[path] = open_vault(path)
    return _VAULTS[path]


def image_to_pil(image: torch.Tensor) -> list:
    """ComfyUI IMAGE [B,H,W,C] floats in 0..1 -> list of RGB PIL images."""
    from PIL import Image

    if image.ndim == 3:
        image = image[None]
    arr = (image.detach().float().cpu().clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
    return [Image.fromarray(a[..., :3]) for a in arr]


def clip_encoder(clip):
    """encode(prompts) -> (cond [B,77,C], pooled [B,P]) through a ComfyUI CLIP object."""
    def encode(prompts: list[str]):
        conds, pooleds = [], []
        for p in prompts:
            cond, pooled = clip.encode_from_tokens(clip.tokenize(p), return_pooled=True)
            conds.append(cond[:, :77])
            pooleds.append(pooled)
        return torch.cat(conds), torch.cat(pooleds)
    return encode


def _match_length(retrieved: torch.Tensor, length: int) -> torch.Tensor:
    """Tile a [1,77,C] conditioning to a user's [1,77*n,C] (prompts longer than 77 tokens)."""
    if retrieved.shape[1] == length:
        return retrieved
    if length % retrieved.shape[1]:
        raise ValueError(f"Luna Vault Query: conditioning of {length} tokens is not a multiple of {retrieved.shape[1]}")
    return retrieved.repeat(1, length // retrieved.shape[1], 1)


def blend_conditioning(conditioning, cond: torch.Tensor, pooled: torch.Tensor, strength: float, blend: str):
    """Blend retrieved (cond [1,77,C], pooled [1,P]) into every entry of a ComfyUI CONDITIONING."""
    from vault.blend import blend_concat, blend_linear

    if conditioning is None:
        return [[cond, {"pooled_output": pooled}]]
    out = []
    for c, extra in conditioning:
        extra = dict(extra)
        if blend == "concat":
            new = blend_concat(c, cond)
        else:
            new = blend_linear(c, _match_length(cond, c.shape[1]), strength)
            if extra.get("pooled_output") is not None:
                extra["pooled_output"] = blend_linear(extra["pooled_output"], pooled, strength)
        if extra.get("pooled_output") is None:
            extra["pooled_output"] = pooled.to(c.dtype)
        out.append([new, extra])
    return out


class LunaVaultQuery:
    """Retrieve the conditioning of the vault images nearest to IMAGE and blend it with CONDITIONING."""

    CATEGORY = "conditioning/luna"
    FUNCTION = "query"
    RETURN_TYPES = ("CONDITIONING", "STRING")
    RETURN_NAMES = ("conditioning", "neighbours")
    DESCRIPTION = ("k nearest vault images of the crop -> their prompts' SDXL conditioning (weighted), blended "
                   "linearly ((1-strength)*yours + strength*retrieved) or appended as extra tokens (concat).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vault": ("STRING", {"default": "", "tooltip": "vault folder, or service address ray:NAME"}),
                "image": ("IMAGE",),
                "k": ("INT", {"default": 8, "min": 1, "max": 256}),
                "strength": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05}),
            },
            "optional": {
                "conditioning": ("CONDITIONING",),
                "clip": ("CLIP", {"tooltip": "text encoders, needed for prompts-only vaults"}),
                "blend": (["linear", "concat"], {"default": "linear"}),
                "weighting": (["softmax", "mean"], {"default": "softmax"}),
                "temperature": ("FLOAT", {"default": 0.05, "min": 0.001, "max": 10.0, "step": 0.01}),
                "category": ("STRING", {"default": "", "tooltip": "empty: whole vault; auto; or a category name"}),
            },
        }

    def query(self, vault, image, k, strength, conditioning=None, clip=None, blend="linear", weighting="softmax",
              temperature=0.05, category=""):
        v = _open(vault)
        result = v.query_images(image_to_pil(image), k=int(k), category=category or None, weighting=weighting,
                                temperature=float(temperature), encode=clip_encoder(clip) if clip is not None else None)
        # several images in the batch: one conditioning, their mean
        cond = result.cond.float().mean(0, keepdim=True)
        pooled = result.pooled.float().mean(0, keepdim=True)
        neighbours = json.dumps([[{k_: n[k_] for k_ in ("key", "prompt", "score", "category", "checkpoint")}
                                  for n in nbs] for nbs in result.neighbours], indent=1)
        return (blend_conditioning(conditioning, cond, pooled, float(strength), blend), neighbours)


NODE_CLASS_MAPPINGS = {"LunaVaultQuery": LunaVaultQuery}
NODE_DISPLAY_NAME_MAPPINGS = {"LunaVaultQuery": "Luna Vault Query"}
