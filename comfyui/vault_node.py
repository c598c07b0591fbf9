"""ComfyUI "Luna Vault Query" node: images (crops) -> retrieved SDXL conditioning, one per image, optionally blended.

ComfyUI types: IMAGE is a float tensor [B,H,W,C] in 0..1; CONDITIONING is a list of
`[cond [B,T,2048], {"pooled_output": [B,1280], ...}]`. Without an input conditioning the output carries
the SDXL size keys CLIPTextEncodeSDXL sets (width, height, crop_w, crop_h, target_width, target_height:
the node's width/height, crop 0); a user's entries keep their own. The output's batch is the image batch:
image i gets the neighbours of image i (a conditioning batch equal to the latent batch conditions
latent i with row i). Vaults come from the models/luna_vaults/ dropdown, or a typed folder or
`ray:NAME` service address; they stay open in the model host and are reopened when their files change.
"""
from __future__ import annotations

import json

import torch

from .paths import NONE, choices as folder_choices, fingerprint_of, require as require_folder
from .sources import clip_encoder, image_to_pil, match_length, open_vault_checked


def _to_batch(t: torch.Tensor, b: int, what: str) -> torch.Tensor:
    if t.shape[0] == b:
        return t
    if t.shape[0] == 1:
        return t.expand(b, *t.shape[1:])
    raise ValueError(f"Luna Vault Query: input 'conditioning' has a batch of {t.shape[0]} ({what}); "
                     f"the image batch is {b}")


def sdxl_size(width: int, height: int) -> dict:
    """The size keys ComfyUI's CLIPTextEncodeSDXL puts beside pooled_output (no crop, target = size)."""
    return {"width": int(width), "height": int(height), "crop_w": 0, "crop_h": 0,
            "target_width": int(width), "target_height": int(height)}


def blend_conditioning(conditioning, cond: torch.Tensor, pooled: torch.Tensor, strength: float, blend: str,
                       size: dict | None = None):
    """Blend retrieved rows (cond [B,77,C], pooled [B,P]) into every entry of a ComfyUI CONDITIONING, row by row;
    without one, the retrieved rows with the SDXL `size` keys."""
    from vault.blend import blend_concat, blend_linear

    if conditioning is None:
        return [[cond, {"pooled_output": pooled, **(size or {})}]]
    b = cond.shape[0]
    out = []
    for c, extra in conditioning:
        if c.shape[-1] != cond.shape[-1]:
            raise ValueError(f"Luna Vault Query: input 'conditioning' is {c.shape[-1]} wide, the vault's conditioning "
                             f"{cond.shape[-1]} (a vault built for another text-encoder family)")
        extra = dict(extra)
        user = _to_batch(c, b, "cond")
        r = cond.to(c.device, c.dtype)
        if blend == "concat":
            new = blend_concat(user, r)
        else:
            new = blend_linear(user, match_length(r, c.shape[1], "Luna Vault Query"), strength)
            if extra.get("pooled_output") is not None:
                base = _to_batch(extra["pooled_output"], b, "pooled_output")
                extra["pooled_output"] = blend_linear(base, pooled.to(base.device, base.dtype), strength)
        if extra.get("pooled_output") is None:
            extra["pooled_output"] = pooled.to(c.dtype)
        elif extra["pooled_output"].shape[0] != b:
            extra["pooled_output"] = _to_batch(extra["pooled_output"], b, "pooled_output")
        out.append([new, extra])
    return out


class LunaVaultQuery:
    """Retrieve the conditioning of the vault images nearest to each IMAGE and blend it with CONDITIONING."""

    CATEGORY = "Luna/conditioning"
    FUNCTION = "query"
    RETURN_TYPES = ("CONDITIONING", "STRING")
    RETURN_NAMES = ("conditioning", "neighbours")
    OUTPUT_TOOLTIPS = ("one conditioning row per input image", "the neighbours (key, prompt, score) of every image, JSON")
    DESCRIPTION = ("k nearest vault images of each crop -> their prompts' SDXL conditioning (weighted), blended "
                   "linearly ((1-strength)*yours + strength*retrieved) or appended as extra tokens (concat). "
                   "Strength 0 returns your conditioning unchanged. Without your conditioning: the retrieved one "
                   "with CLIPTextEncodeSDXL's size keys (width/height, crop 0).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vault": (folder_choices("luna_vaults", with_none=False) or [NONE], {"tooltip":
                          "a vault folder in models/luna_vaults/ (extra_model_paths.yaml: luna_vaults)"}),
                "image": ("IMAGE", {"tooltip": "the crops; one conditioning row per image"}),
                "k": ("INT", {"default": 8, "min": 1, "max": 256, "tooltip": "neighbours per image"}),
                "strength": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                             "weight of the retrieved conditioning; 0 returns yours unchanged"}),
            },
            "optional": {
                "vault_path": ("STRING", {"default": "", "tooltip": "instead of the dropdown: a vault folder, or the "
                               "shared service ray:NAME (luna vault serve)"}),
                "conditioning": ("CONDITIONING", {"tooltip": "yours (CLIPTextEncode); without it the output is the "
                                 "retrieved conditioning alone"}),
                "clip": ("CLIP", {"tooltip": "your text encoders: used only by prompts-only vaults, which store "
                                  "prompts and encode them with the caller's encoders"}),
                "blend": (["linear", "concat"], {"default": "linear", "tooltip": "linear mix, or append the "
                          "retrieved tokens after yours"}),
                "weighting": (["softmax", "mean"], {"default": "softmax", "tooltip": "how neighbours are weighted"}),
                "temperature": ("FLOAT", {"default": 0.05, "min": 0.001, "max": 10.0, "step": 0.01, "tooltip":
                                "softmax temperature over the neighbours' scores"}),
                "category": ("STRING", {"default": "", "tooltip": "empty: whole vault; auto: the nearest category; "
                             "or a category name (faces, hands, ...)"}),
                "width": ("INT", {"default": 1024, "min": 64, "max": 16384, "step": 8, "tooltip":
                          "SDXL size conditioning, only when there is no input conditioning"}),
                "height": ("INT", {"default": 1024, "min": 64, "max": 16384, "step": 8, "tooltip":
                           "SDXL size conditioning, only when there is no input conditioning"}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, vault=NONE, vault_path="", **_):
        return fingerprint_of("luna_vaults", vault, vault_path, "vault")

    def query(self, vault, image, k, strength, vault_path="", conditioning=None, clip=None, blend="linear",
              weighting="softmax", temperature=0.05, category="", width=1024, height=1024):
        if conditioning is not None and float(strength) == 0.0:
            return (conditioning, "[]")
        path = require_folder("luna_vaults", vault, vault_path, "vault", "Luna Vault Query",
                              "choose a vault (models/luna_vaults/) or set vault_path")
        v = open_vault_checked(path, prefix="Luna Vault Query: ")
        stored = v.info().get("mode", "stored") == "stored"
        if not stored and clip is None:
            raise ValueError("Luna Vault Query: input 'clip': this vault stores prompts only; connect your "
                             "checkpoint's CLIP to encode the neighbours' prompts")
        result = v.query_images(image_to_pil(image), k=int(k), category=category or None, weighting=weighting,
                                temperature=float(temperature), encode=None if stored else clip_encoder(clip))
        cond = torch.as_tensor(result.cond).float()
        pooled = torch.as_tensor(result.pooled).float()
        neighbours = json.dumps([[{k_: n[k_] for k_ in ("key", "prompt", "score", "category", "checkpoint")}
                                  for n in nbs] for nbs in result.neighbours], indent=1)
        return (blend_conditioning(conditioning, cond, pooled, float(strength), blend, sdxl_size(width, height)),
                neighbours)


NODE_CLASS_MAPPINGS = {"LunaVaultQuery": LunaVaultQuery}
NODE_DISPLAY_NAME_MAPPINGS = {"LunaVaultQuery": "Luna Vault Query"}
