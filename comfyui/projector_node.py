"""ComfyUI "Luna Vision Translator" node: an image embedding -> SDXL conditioning through a trained projector.

Inputs: a projector folder (`luna train` output), and either a CLIP_VISION_OUTPUT (from ComfyUI's
"CLIP Vision Encode") or an IMAGE with a vision tower (ComfyUI's CLIP_VISION, or a luna open_clip
tower named by `vision_model` + `vision_weights`). The projected conditioning is blended into an
optional CONDITIONING: (1 - strength) * yours + strength * projected; without one, the output is
strength * projected (SDXL's empty prompt is all zeros). Returns ComfyUI CONDITIONING
`[[cond [B,77,C], {"pooled_output": [B,P], width, height, crop_w, crop_h, target_width, target_height}]]`.
This module imports nothing from ComfyUI, so it loads (and is tested) without it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

_PROJECTORS: dict[tuple, object] = {}
_TOWERS: dict[tuple, object] = {}


def _projector(path: str, dim: int):
    """One loaded projector per (folder, modification time, input width), kept across prompts."""
    from projector.export import CONFIG_NAME, load_projector

    folder = Path(path).expanduser()
    folder = folder if folder.is_dir() else folder.parent
    stamp = (folder / CONFIG_NAME).stat().st_mtime if (folder / CONFIG_NAME).is_file() else None
    key = (str(folder), stamp, dim)
    if key not in _PROJECTORS:
        _PROJECTORS[key] = load_projector(folder, expect_dim=dim)
    return _PROJECTORS[key]


def _field(output, name: str):
    """A field of ComfyUI's clip_vision Output (attribute or item access), or None."""
    value = getattr(output, name, None)
    if value is None:
        try:
            value = output[name]
        except (KeyError, TypeError, IndexError):
            value = None
    return value


def _luna_tower(name: str, weights: str):
    from luna.models.vision import load_vision

    key = (name, weights)
    if key not in _TOWERS:
        _TOWERS[key] = load_vision(name, weights=weights or None)
    return _TOWERS[key]


def _image_to_pixels(image: torch.Tensor, preprocess) -> torch.Tensor:
    """ComfyUI IMAGE [B,H,W,C] in 0..1 -> the tower's own preprocessing, [B,3,S,S]."""
    from PIL import Image

    if image.ndim == 3:
        image = image[None]
    arr = (image.detach().float().cpu().clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
    return torch.stack([preprocess(Image.fromarray(a[..., :3])) for a in arr])


def encode_inputs(kind: str, clip_vision_output=None, image=None, clip_vision=None, vision_model="", vision_weights=""):
    """The projector's input ([B,D] embeddings, or [B,T,W] tokens when kind == "tokens") from
    whichever image input was given, and the vision model id when it is known."""
    if clip_vision_output is None and image is not None and clip_vision is not None:
        clip_vision_output = clip_vision.encode_image(image)
    if clip_vision_output is not None:
        name = "penultimate_hidden_states" if kind == "tokens" else "image_embeds"
        value = _field(clip_vision_output, name)
        if value is None:
            raise ValueError(f"Luna Vision Translator: the CLIP_VISION_OUTPUT has no {name}")
        return value.float(), None
    if image is not None and vision_model:
        tower = _luna_tower(vision_model, vision_weights)
        pixels = _image_to_pixels(image, tower.preprocess)
        x = tower.encode_tokens(pixels) if kind == "tokens" else tower.encode(pixels)
        return x.float(), tower.model_id
    raise ValueError(
        "Luna Vision Translator: connect a CLIP_VISION_OUTPUT, or an IMAGE with a vision tower "
        "(CLIP_VISION input, or vision_model + vision_weights)"
    )


def _match_length(cond: torch.Tensor, length: int) -> torch.Tensor:
    """Tile a [B,77,C] conditioning to a user's [B,77*n,C] (ComfyUI concatenates 77-token chunks)."""
    if cond.shape[1] == length:
        return cond
    if length % cond.shape[1]:
        raise ValueError(f"Luna Vision Translator: conditioning of {length} tokens is not a multiple of {cond.shape[1]}")
    return cond.repeat(1, length // cond.shape[1], 1)


def blend(conditioning, cond: torch.Tensor, pooled: torch.Tensor, strength: float, size: dict):
    """(1 - strength) * each CONDITIONING entry + strength * projected; strength * projected without one."""
    if conditioning is None:
        return [[cond * strength, {"pooled_output": pooled * strength, **size}]]
    out = []
    for c, extra in conditioning:
        if c.shape[-1] != cond.shape[-1]:
            raise ValueError(
                f"Luna Vision Translator: CONDITIONING width {c.shape[-1]} differs from the projector's {cond.shape[-1]}"
                " (an SDXL conditioning is 2048 wide)"
            )
        extra = dict(extra)
        p = cond.to(c.device, c.dtype)
        new = (1 - strength) * c + strength * _match_length(p, c.shape[1])
        base_pooled = extra.get("pooled_output")
        q = pooled.to(c.device, c.dtype)
        extra["pooled_output"] = q if base_pooled is None else (1 - strength) * base_pooled + strength * q
        for k, v in size.items():
            extra.setdefault(k, v)
        out.append([new, extra])
    return out


class LunaVisionTranslator:
    """Translate what a vision model sees in a crop into SDXL conditioning, and blend it with yours."""

    CATEGORY = "conditioning/luna"
    FUNCTION = "translate"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    DESCRIPTION = ("A trained Luna projector maps the image embedding to an SDXL conditioning [77, 2048] + pooled; "
                   "blended as (1-strength)*yours + strength*projected.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "projector": ("STRING", {"default": "", "tooltip": "folder with projector.safetensors + projector.json"}),
                "strength": ("FLOAT", {"default": 0.3, "min": 0.0, "max": 1.0, "step": 0.05}),
            },
            "optional": {
                "clip_vision_output": ("CLIP_VISION_OUTPUT",),
                "image": ("IMAGE",),
                "clip_vision": ("CLIP_VISION",),
                "vision_model": ("STRING", {"default": "", "tooltip": "luna open_clip tower, e.g. ViT-H-14 (instead of CLIP_VISION)"}),
                "vision_weights": ("STRING", {"default": "", "tooltip": "local weights file of vision_model"}),
                "conditioning": ("CONDITIONING",),
                "width": ("INT", {"default": 1024, "min": 64, "max": 16384, "step": 8}),
                "height": ("INT", {"default": 1024, "min": 64, "max": 16384, "step": 8}),
            },
        }

    def translate(self, projector, strength, clip_vision_output=None, image=None, clip_vision=None,
                  vision_model="", vision_weights="", conditioning=None, width=1024, height=1024):
        from projector.export import ProjectorMismatchError

        folder = Path(projector).expanduser()
        kind = _input_kind(folder)
        x, model_id = encode_inputs(kind, clip_vision_output, image, clip_vision, vision_model, vision_weights)
        proj = _projector(str(folder), int(x.shape[-1]) if kind == "embed" else None)
        trained_on = proj.dims.get("vision_model")
        if model_id is not None and trained_on != model_id:
            raise ProjectorMismatchError(
                f"Luna Vision Translator: {folder} was trained on {trained_on!r}, the image was encoded with {model_id!r}"
            )
        with torch.no_grad():
            cond, pooled = proj(x.to(proj.input_mean.device))
        size = {"width": int(width), "height": int(height), "crop_w": 0, "crop_h": 0,
                "target_width": int(width), "target_height": int(height)}
        return (blend(conditioning, cond.cpu(), pooled.cpu(), float(strength), size),)


def _input_kind(folder: Path) -> str:
    """"embed" or "tokens": what the projector in `folder` takes (read from its projector.json)."""
    import json

    from projector.export import CONFIG_NAME, ProjectorLoadError

    cfg = folder / CONFIG_NAME if folder.is_dir() else folder.parent / CONFIG_NAME
    if not cfg.is_file():
        raise ProjectorLoadError(f"Luna Vision Translator: {folder} is not a projector folder (no {CONFIG_NAME})")
    return json.loads(cfg.read_text())["dims"].get("input", "embed")


NODE_CLASS_MAPPINGS = {"LunaVisionTranslator": LunaVisionTranslator}
NODE_DISPLAY_NAME_MAPPINGS = {"LunaVisionTranslator": "Luna Vision Translator"}
