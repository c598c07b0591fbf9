"""Conditioning sources of the ComfyUI detailer and refiner, built on lsd_runtime.conditioning.

- `ComfyText`: the user's positive CONDITIONING as the text row (what `TextSource` is to the CLI),
  with ComfyUI's CLIP as the encoder of prompts-only vaults.
- Crop embedders: ComfyUI's CLIP_VISION, or a luna open_clip tower (the one a vault or
  projector was built on; `vision_model` + `vision_weights`).
- `Chained`: vault rows, then the projector blended into them (each with its own strength).
- `Routed`: per-label vault categories (face -> faces), through the detailer's `rows_for`.

Every error names the node input at fault.
"""
from __future__ import annotations

import numpy as np
import torch

from lsd_runtime.api import CondRow

# ComfyUI CLIP_VISION configs -> the open_clip model id luna's vaults record
_VISION_IDS = {(1280, 32): "ViT-H-14", (1024, 24): "ViT-L-14", (1664, 48): "ViT-bigG-14"}


class InputError(ValueError):
    """A node input the Luna nodes cannot use (the message names the input)."""


class ComfyText:
    """The first entry of a ComfyUI CONDITIONING as one text row; `encode` via ComfyUI's CLIP."""

    name = "text"

    def __init__(self, conditioning, clip=None, what: str = "positive"):
        if not conditioning or not isinstance(conditioning, (list, tuple)) or len(conditioning[0]) != 2:
            raise InputError(f"input '{what}': not a ComfyUI CONDITIONING (connect CLIPTextEncode)")
        cond, extra = conditioning[0]
        if len(conditioning) > 1 or cond.shape[0] > 1:  # combined or batched: one text row per crop is all we use
            raise InputError(f"input '{what}': {len(conditioning)} conditioning entries of batch {cond.shape[0]}; the "
                             "detailer takes one entry of batch 1 (one prompt; not ConditioningCombine or a batch)")
        self.cond = cond[0].float().cpu()
        pooled = extra.get("pooled_output")
        self.pooled = pooled[0].float().cpu() if pooled is not None else torch.zeros(0)
        self.clip = clip

    def encode(self, prompts: list[str]):
        if self.clip is None:
            raise InputError("input 'clip': this vault stores prompts only; connect the checkpoint's CLIP so the "
                             "neighbours' prompts are encoded by your text encoders")
        cond, pooled = clip_encoder(self.clip)(prompts)
        return cond.float().cpu(), pooled.float().cpu()

    def rows(self, crops) -> list[CondRow]:
        return [CondRow(self.cond, self.pooled, "text", 0.0) for _ in crops]


def pil_batch(crops) -> torch.Tensor:
    """PIL crops (one size) -> ComfyUI IMAGE [B, H, W, 3] in 0..1."""
    return torch.from_numpy(np.stack([np.asarray(c.convert("RGB"), np.float32) for c in crops]) / 255.0)


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


def match_length(cond: torch.Tensor, length: int, node: str) -> torch.Tensor:
    """Tile a [B,77,C] conditioning to a user's [B,77*n,C] (ComfyUI concatenates 77-token chunks)."""
    if cond.shape[1] == length:
        return cond
    if length % cond.shape[1]:
        raise ValueError(f"{node}: conditioning of {length} tokens is not a multiple of {cond.shape[1]}")
    return cond.repeat(1, length // cond.shape[1], 1)


def open_vault_checked(path: str, what: str = "vault", prefix: str = ""):
    """An open vault (or service client) from the model host, one per path/address and file fingerprint,
    kept across prompts; a folder that is not a vault is an InputError naming the input."""
    from vault.service import VaultError
    from vault.service import open_vault

    from .host import HOST

    try:
        return HOST.get("vault", path, lambda: open_vault(path))
    except (VaultError, ValueError, OSError, KeyError) as exc:
        raise InputError(f"{prefix}input '{what}': {path} is not a usable Luna vault ({exc})") from exc


def luna_tower(vision_model: str, vision_weights: str = ""):
    """A luna open_clip tower, loaded once by the model host."""
    from luna.models.vision import load_vision

    from .host import HOST

    return HOST.get("vision", vision_weights or f"open_clip:{vision_model}",
                    lambda: load_vision(vision_model, weights=vision_weights or None), options=(vision_model,))


class ClipVisionEmbedder:
    """Crop embeddings [B, D] from ComfyUI's CLIP_VISION (`image_embeds`, its own preprocessing)."""

    def __init__(self, clip_vision):
        self.clip_vision = clip_vision
        proj = getattr(getattr(clip_vision, "model", None), "visual_projection", None)
        self._dim = int(proj.out_features) if proj is not None else None
        cfg = getattr(getattr(clip_vision, "model", None), "vision_model", None)
        self.model_id = None
        try:
            layers = len(cfg.encoder.layers)
            width = int(cfg.embeddings.class_embedding.shape[-1])
            mid = _VISION_IDS.get((width, layers))
            if mid and int(getattr(clip_vision, "image_size", 224)) == 336:
                mid += "-336"
            self.model_id = mid
        except AttributeError:
            pass

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = int(self.clip_vision.encode_image(torch.zeros(1, 224, 224, 3)).image_embeds.shape[-1])
        return self._dim

    def __call__(self, crops) -> torch.Tensor:
        return self.clip_vision.encode_image(pil_batch(crops)).image_embeds.float().cpu()


def tower_embedder(vision_model: str, vision_weights: str = ""):
    """A luna open_clip tower (kept by the model host) as a crop embedder."""
    from lsd_runtime.api import CropEmbedder

    return CropEmbedder(luna_tower(vision_model, vision_weights))


class Chained:
    """Rows of a first source (text or vault), with a projector blended in at `weight` (linear)."""

    def __init__(self, first, projector, embedder, weight: float):
        self.first, self.projector, self.embedder, self.weight = first, projector, embedder, float(weight)
        self.text = getattr(first, "text", first)
        self.name = f"{getattr(first, 'name', 'text')}+projector"

    def _blend(self, rows, crops):
        from vault.blend import blend_linear

        embeds = self.embedder(crops)
        with torch.no_grad():
            cond, pooled = self.projector(embeds.to(next(self.projector.buffers()).device))
        out = []
        for i, r in enumerate(rows):
            c = cond[i].float().cpu()
            if c.shape[-1] != r.cond.shape[-1]:
                raise InputError(f"input 'projector': it gives [{c.shape[0]},{c.shape[-1]}] conditioning but the "
                                 f"positive conditioning is {r.cond.shape[-1]} wide (a projector for another "
                                 "text-encoder family)")
            reps = r.cond.shape[0] // c.shape[0]
            mixed = blend_linear(r.cond[None], c.repeat(max(reps, 1), 1)[None], self.weight)[0]
            p = pooled[i].float().cpu()
            mp = blend_linear(r.pooled[None], p[None], self.weight)[0] if r.pooled.numel() == p.numel() else r.pooled
            out.append(CondRow(mixed, mp, self.name, self.weight, "linear", list(r.neighbours), embeds[i]))
        return out

    def rows(self, crops):
        return self._blend(self.first.rows(crops), crops)

    def rows_for(self, crops, detections):
        rows = self.first.rows_for(crops, detections) if hasattr(self.first, "rows_for") else self.first.rows(crops)
        return self._blend(rows, crops)


def parse_routing(text: str) -> dict[str, str]:
    """'face=faces, hand=hands' -> {'face': 'faces', 'hand': 'hands'} (input 'category_routing')."""
    out = {}
    for part in (text or "").replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        label, eq, cat = part.partition("=")
        if not eq or not label.strip() or not cat.strip():
            raise InputError(f"input 'category_routing': {part!r} is not label=category (e.g. face=faces, hand=hands)")
        out[label.strip().lower()] = cat.strip()
    return out


class Routed:
    """A VaultSource queried per detection label's category (unrouted labels: the whole vault). With a
    `category_settings.json` table (`luna ab tune=true`), its routes come first (`category_routing`
    adds to them) and a category it lists is queried with its own strength, k, weighting and temperature;
    other crops keep the node's vault_strength / vault_k."""

    KNOBS = ("weight", "k", "weighting", "temperature")

    def __init__(self, vault_source, routing: dict[str, str], table=None, where: str = "category_routing"):
        self.source, self.table = vault_source, table
        self.routing = {**(table.routes if table is not None else {}), **routing}
        self.text, self.name = vault_source.text, vault_source.name
        cats = set(getattr(vault_source.vault, "info", lambda: {})().get("categories") or [])
        wanted = set(self.routing.values()) | (set(table.categories) if table is not None else set())
        missing = sorted(wanted - cats) if cats else []
        if missing:
            raise InputError(f"input '{where}': categories {missing} are not in the vault (it has {sorted(cats)})")

    def rows(self, crops):
        return self.source.rows(crops)

    def rows_for(self, crops, detections):
        cats = [self.routing.get(str(getattr(d, "label", "")).lower()) for d in detections]
        out: list = [None] * len(crops)
        saved = {k: getattr(self.source, k) for k in ("category", *self.KNOBS)}
        try:
            for cat in dict.fromkeys(cats):
                idx = [i for i, c in enumerate(cats) if c == cat]
                self.source.category = cat if cat is not None else saved["category"]
                own = self.table.categories.get(cat) if self.table is not None and cat is not None else None
                for k in self.KNOBS:
                    setattr(self.source, k, getattr(own, k) if own is not None else saved[k])
                for i, r in zip(idx, self.source.rows([crops[i] for i in idx])):
                    out[i] = r
        finally:
            for k, v in saved.items():
                setattr(self.source, k, v)
        return out
