"""Per-crop IP-Adapter on ComfyUI's MODEL: each batch item attends to its own crop's image embedding.

The weights are a plain IP-Adapter in the original file layout (`image_proj.proj`, `image_proj.norm`,
`ip_adapter.{1,3,5,...}.to_k_ip/to_v_ip`), what `luna refine` loads through diffusers
(lsd_runtime/ip_adapter.py) and what ComfyUI users keep in `models/ipadapter/`. Per sampler call
the model is cloned and every cross-attention (attn2) of its UNet is replaced by

    out = attention(q, k, v) + strength * attention(q, to_k_ip(tokens), to_v_ip(tokens))

where `tokens` are LayerNorm(proj(embedding)) of *that item's* crop: row i of the latent batch gets
crop i's tokens, its CFG negative the tokens of a zero embedding (diffusers' plain IP-Adapter
negative). The i-th pair of `to_k_ip/to_v_ip` belongs to the i-th cross-attention in diffusers'
order (down blocks, up blocks, middle), which is ComfyUI's input, output, middle blocks. Nothing
here changes the model when no IP-Adapter is chosen; ComfyUI is imported only when sampling.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .sources import InputError


def cross_attentions(diffusion_model) -> list[tuple[tuple, torch.nn.Module]]:
    """((block name, block index, transformer index), attn2) of every cross-attention of a ComfyUI UNet,
    in the IP-Adapter's key order (input blocks, output blocks, middle)."""
    found = []
    groups = (("input", getattr(diffusion_model, "input_blocks", [])),
              ("output", getattr(diffusion_model, "output_blocks", [])),
              ("middle", [diffusion_model.middle_block] if getattr(diffusion_model, "middle_block", None) else []))
    for name, blocks in groups:
        for index, block in enumerate(blocks):
            for layer in block:
                for t, tb in enumerate(getattr(layer, "transformer_blocks", [])):
                    if getattr(tb, "attn2", None) is not None:
                        found.append(((name, index, t), tb.attn2))
    return found


class IPAdapterWeights:
    """A plain IP-Adapter file: image projection (embedding -> tokens) and one K/V pair per cross-attention.
    Its errors are InputErrors naming `what` (the node input) and the file."""

    def __init__(self, path, what: str = "ip_adapter"):
        from safetensors.torch import load_file

        self.path = Path(path)
        if self.path.suffix != ".safetensors":
            raise self._error("IP-Adapter weights must be .safetensors (pickles are not loaded)", what)
        try:
            state = load_file(str(self.path))
        except (OSError, RuntimeError, ValueError) as exc:
            raise self._error(f"not a readable safetensors file ({exc})", what) from exc
        need = ("image_proj.proj.weight", "image_proj.proj.bias", "image_proj.norm.weight", "image_proj.norm.bias")
        missing = [k for k in need if k not in state]
        if missing:
            kind = "an IP-Adapter Plus/FaceID (resampler)" if any(k.startswith("image_proj.latents") or
                                                                   k.startswith("image_proj.layers") for k in state) \
                else "not a plain IP-Adapter"
            raise self._error(f"{kind}: lacks {missing}; only the plain IP-Adapter (image_proj.proj + norm) is "
                              "supported", what)
        self.proj_w, self.proj_b = state["image_proj.proj.weight"].float(), state["image_proj.proj.bias"].float()
        self.norm_w, self.norm_b = state["image_proj.norm.weight"].float(), state["image_proj.norm.bias"].float()
        self.cross = int(self.norm_w.shape[0])
        self.dim = int(self.proj_w.shape[1])
        if self.proj_w.shape[0] % self.cross:
            raise self._error(f"image_proj.proj gives {self.proj_w.shape[0]} values, not a whole number of "
                              f"{self.cross}-wide tokens", what)
        self.tokens = int(self.proj_w.shape[0]) // self.cross
        keys = sorted({int(k.split(".")[1]) for k in state if k.startswith("ip_adapter.")})
        try:
            self.kv = [(state[f"ip_adapter.{i}.to_k_ip.weight"].float(), state[f"ip_adapter.{i}.to_v_ip.weight"].float())
                       for i in keys]
        except KeyError as exc:
            raise self._error(f"lacks {exc.args[0]}", what) from exc
        if not self.kv:
            raise self._error("has no ip_adapter.N.to_k_ip/to_v_ip weights", what)

    def _error(self, message: str, what: str) -> InputError:
        return InputError(f"input '{what}': {self.path}: {message}")

    def check_dim(self, dim: int, embedder: str, what: str = "ip_adapter") -> None:
        if int(dim) != self.dim:
            raise self._error(f"the IP-Adapter takes {self.dim}-d image embeddings, {embedder} gives {dim}-d (use "
                              "the vision model the IP-Adapter was trained with, e.g. ViT-bigG-14 for "
                              "ip-adapter_sdxl, ViT-H-14 for ip-adapter_sdxl_vit-h)", what)

    def layers(self, model, what: str = "ip_adapter") -> list[tuple[tuple, int]]:
        """(patch key, heads) per cross-attention of `model` (a ComfyUI MODEL), checked against the weights."""
        attns = cross_attentions(model.model.diffusion_model)
        if len(attns) != len(self.kv):
            raise self._error(f"has {len(self.kv)} cross-attention K/V pairs, this model has {len(attns)} "
                              "cross-attentions (an IP-Adapter for another model)", what)
        out = []
        for (key, attn), (k, _v) in zip(attns, self.kv):
            want = tuple(attn.to_k.weight.shape)
            if tuple(k.shape) != want:
                raise self._error(f"to_k_ip of {key} is {tuple(k.shape)}, the model's cross-attention is {want} "
                                  f"(an IP-Adapter for another model; its tokens are {self.cross} wide)", what)
            out.append((key, int(attn.heads)))
        return out

    def project(self, embeds: torch.Tensor) -> torch.Tensor:
        """Image embeddings [B, D] -> IP tokens [B, T, C] (the plain IP-Adapter's image projection)."""
        x = torch.nn.functional.linear(embeds.float().cpu(), self.proj_w, self.proj_b)
        x = x.reshape(x.shape[0], self.tokens, self.cross)
        return torch.nn.functional.layer_norm(x, (self.cross,), self.norm_w, self.norm_b)


class _Attn2Patch:
    """attn2 replacement of one cross-attention: text attention (or the replacement another node had put
    there, e.g. a model-wide IP-Adapter) + strength * attention to this batch's per-item IP tokens."""

    def __init__(self, k_ip, v_ip, heads: int, cond: torch.Tensor, uncond: torch.Tensor, strength: float,
                 previous=None):
        self.k_ip, self.v_ip, self.heads = k_ip, v_ip, heads
        self.cond, self.uncond, self.strength = cond, uncond, float(strength)
        self.previous = previous
        self._cast: dict = {}

    def to(self, device):  # ComfyUI moves patches with the model; our tensors are cast lazily per call instead
        if hasattr(self.previous, "to"):
            self.previous = self.previous.to(device)
        return self

    def _on(self, q):
        key = (q.device, q.dtype)
        if key not in self._cast:
            self._cast = {key: tuple(t.to(q.device, q.dtype) for t in (self.k_ip, self.v_ip, self.cond, self.uncond))}
        return self._cast[key]

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        precision = extra_options.get("attn_precision")
        if self.previous is not None:
            out = self.previous(q, k, v, extra_options)
        else:
            out = optimized_attention(q, k, v, self.heads, attn_precision=precision, transformer_options=extra_options)
        k_ip, v_ip, cond, uncond = self._on(q)
        chunks = list(extra_options.get("cond_or_uncond") or [0])
        if q.shape[0] != len(chunks) * cond.shape[0]:
            raise InputError(f"input 'ip_adapter': the sampler batched {q.shape[0]} rows for {len(chunks)} "
                             f"conditioning chunk(s) of {cond.shape[0]} crops; per-crop IP-Adapter tokens need whole "
                             "batches of crops")
        tokens = torch.cat([uncond if c == 1 else cond for c in chunks])
        ip = optimized_attention(q, tokens @ k_ip.T, tokens @ v_ip.T, self.heads, attn_precision=precision,
                                 transformer_options=extra_options)
        return out + self.strength * ip


class ComfyIPAdapter:
    """The IP-Adapter at one strength, as ComfyDenoiser's hook: `patched(model, embeds [B, D])` is a clone of
    the MODEL whose cross-attentions give item i the tokens of embedding i."""

    def __init__(self, weights: IPAdapterWeights, strength: float, what: str = "ip_adapter"):
        self.weights, self.strength, self.what = weights, float(strength), what
        self.dim = weights.dim

    def patched(self, model, embeds: torch.Tensor):
        w = self.weights
        embeds = torch.as_tensor(embeds).float()
        if embeds.ndim != 2 or embeds.shape[-1] != w.dim:
            raise w._error(f"crop embeddings are {tuple(embeds.shape)}, the IP-Adapter takes [B, {w.dim}]", self.what)
        cond, uncond = w.project(embeds), w.project(torch.zeros_like(embeds))
        clone = model.clone()
        existing = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
        for (key, heads), (k_ip, v_ip) in zip(w.layers(model, self.what), w.kv):
            patch = _Attn2Patch(k_ip, v_ip, heads, cond, uncond, self.strength, existing.get(key))
            clone.set_model_attn2_replace(patch, *key)
        return clone


def load_ip_adapter(path: str, what: str = "ip_adapter") -> IPAdapterWeights:
    """The weights from the model host (one per file fingerprint, reloaded when the file changes)."""
    from .host import HOST

    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"input '{what}': {p} is not a file (an IP-Adapter .safetensors)")
    return HOST.get("ip_adapter", str(p), lambda: IPAdapterWeights(p, what))
