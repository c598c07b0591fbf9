"""Fast fingerprints of checkpoints and of their text encoders.

`file_fingerprint` hashes the size, the first MiB (the safetensors header) and evenly spaced
blocks, never a whole multi-GB file. `te_fingerprint` hashes the text-encoder tensors only, in a
layout-independent form (diffusers tensor names, sampled rows cast to fp16, fixed key order), so
the same text encoders give the same fingerprint as a single file or as a diffusers folder, and a
fine-tune that retrains them (Pony, Illustrious) gives another one.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
_HEAD = 1 << 20
_BLOCK = 1 << 16
_BLOCKS = 16
_DIGITS = 24


def _file_digest(path: Path, h) -> None:
    size = path.stat().st_size
    h.update(f"size={size};".encode())
    with open(path, "rb") as f:
        h.update(f.read(_HEAD))
        if size > _HEAD:
            for i in range(_BLOCKS + 1):
                f.seek(_HEAD + (size - _HEAD - _BLOCK) * i // _BLOCKS if size - _HEAD > _BLOCK else _HEAD)
                h.update(f.read(_BLOCK))


def file_fingerprint(path) -> str:
    """Identity of a checkpoint file (size + sampled bytes) or diffusers folder (its weight and config files)."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.suffix == ".json"))
        for p in files:
            h.update(p.relative_to(path).as_posix().encode() + b"\0")
            if p.suffix == ".json":
                h.update(p.read_bytes())
            else:
                _file_digest(p, h)
    else:
        _file_digest(path, h)
    return h.hexdigest()[:_DIGITS]


# ---------------------------------------------------------------- text encoders

_BIGG = "conditioner.embedders.1.model."
_CLIP_L = "conditioner.embedders.0.transformer."
_BIGG_LAYER = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2.", "attn.out_proj.": "self_attn.out_proj."}


class _Tensors:
    """Lazy row access to the tensors of a safetensors file or an in-memory state dict."""

    def __init__(self, path: Path | None = None, state: dict | None = None):
        self.state = state
        self.file = None
        if path is not None:
            from safetensors import safe_open

            self.file = safe_open(str(path), framework="pt")
            self._keys = list(self.file.keys())
        else:
            self._keys = list(state)

    def keys(self) -> list[str]:
        return self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.file.get_slice(key).get_shape()) if self.file else tuple(self.state[key].shape)

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self.file.get_slice(key)[start:stop] if self.file else self.state[key][start:stop]

    def columns(self, key: str, start: int, stop: int) -> torch.Tensor:
        return (self.file.get_slice(key)[:, start:stop] if self.file else self.state[key][:, start:stop]).T


# A canonical tensor: (name in diffusers layout, shape, rows(start, stop) -> tensor[start:stop]).
def _entries_diffusers(t: _Tensors, tag: str):
    for key in t.keys():
        if key.endswith("position_ids"):
            continue
        name = f"{tag}.{key.removeprefix('text_model.')}"
        yield name, t.shape(key), (lambda a, b, key=key: t.rows(key, a, b))


def _entry(t: _Tensors, key: str, name: str):
    yield name, t.shape(key), (lambda a, b: t.rows(key, a, b))


def _entries_single(t: _Tensors):
    for key in t.keys():
        rest = key[len(_CLIP_L):]
        # only CLIPTextModel's own tensors: some files add extras (position_ids, a text_projection)
        if key.startswith(_CLIP_L) and rest.startswith("text_model.") and not key.endswith("position_ids"):
            yield from _entry(t, key, "te1." + rest.removeprefix("text_model."))
        elif key.startswith(_BIGG):
            yield from _bigg_entries(t, key, key[len(_BIGG):])


def _bigg_entries(t: _Tensors, key: str, rest: str):
    simple = {
        "token_embedding.weight": "embeddings.token_embedding.weight",
        "positional_embedding": "embeddings.position_embedding.weight",
        "ln_final.weight": "final_layer_norm.weight",
        "ln_final.bias": "final_layer_norm.bias",
    }
    if rest in simple:
        yield from _entry(t, key, "te2." + simple[rest])
    elif rest == "text_projection":
        w, e = t.shape(key)
        yield "te2.text_projection.weight", (e, w), (lambda a, b: t.columns(key, a, b))
    elif rest.startswith("transformer.resblocks."):
        layer, sub = rest[len("transformer.resblocks."):].split(".", 1)
        base = f"te2.encoder.layers.{layer}."
        if sub.startswith("attn.in_proj_"):
            kind = sub.rsplit("_", 1)[1]  # weight | bias
            shape = t.shape(key)
            width = shape[0] // 3
            for part, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                off = part * width
                yield (f"{base}self_attn.{proj}.{kind}", (width, *shape[1:]),
                       (lambda a, b, off=off: t.rows(key, off + a, off + b)))
        else:
            for old, new in _BIGG_LAYER.items():
                if sub.startswith(old):
                    yield from _entry(t, key, base + new + sub[len(old):])
                    break
    # anything else (logit_scale, ...) is not part of diffusers' text encoder


def _hash_entries(entries) -> str:
    h = hashlib.sha256()
    for name, shape, rows in sorted(entries, key=lambda e: e[0]):
        h.update(f"{name}:{list(shape)};".encode())
        if not shape:
            continue
        n = shape[0]
        # 1-D tensors (norms, biases) are small: whole; matrices: five rows spread over the tensor
        picks = [(0, n)] if len(shape) == 1 or n <= 5 else [(i, i + 1) for i in sorted({0, n // 4, n // 2, 3 * n // 4, n - 1})]
        for a, b in picks:
            h.update(rows(a, b).contiguous().to(torch.float16).numpy().tobytes())
    return h.hexdigest()[:_DIGITS]


def _folder_weights(folder: Path) -> list[Path]:
    """The weight files of one transformers model folder (sharded or not; prefers the unsuffixed variant)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found[:1] if len(found) > 1 and all("-of-" not in p.name for p in found) else found
    found = sorted(folder.glob("*.bin"))
    if not found:
        raise FileNotFoundError(f"{folder}: no text-encoder weights (model.safetensors)")
    return found


def te_fingerprint(path, allow_pickle: bool = False) -> str:
    """Fingerprint of the two SDXL text encoders only, equal across the single-file and diffusers formats."""
    path = Path(path)
    entries = []
    if path.is_dir():
        for sub, tag in (("text_encoder", "te1"), ("text_encoder_2", "te2")):
            for f in _folder_weights(path / sub):
                if f.suffix == ".safetensors":
                    t = _Tensors(path=f)
                else:
                    t = _Tensors(state=torch.load(f, map_location="cpu", weights_only=True, mmap=True))
                entries += list(_entries_diffusers(t, tag))
    elif path.suffix == ".safetensors":
        entries = list(_entries_single(_Tensors(path=path)))
    else:
        if not allow_pickle:
            from luna.models.sdxl import PickleCheckpointError

            raise PickleCheckpointError(f"{path}: pickle checkpoint; pass allow_pickle=True to read it with weights_only=True")
        from luna.models.sdxl import load_pickle_state

        state = load_pickle_state(path)
        while "state_dict" in state:
            state = state["state_dict"]
        entries = list(_entries_single(_Tensors(state={k: v for k, v in state.items() if k.startswith("conditioner.")})))
    if not any(name.startswith("te1.") for name, _, _ in entries) or not any(name.startswith("te2.") for name, _, _ in entries):
        raise ValueError(f"{path}: no SDXL text-encoder tensors (conditioner.embedders.0/1 or text_encoder/text_encoder_2)")
    return _hash_entries(entries)
