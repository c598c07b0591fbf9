"""Fast fingerprints of checkpoints and of their text encoders.

`file_fingerprint` hashes the size, the first MiB (the safetensors header) and evenly spaced
blocks, never a whole multi-GB file: it tells copies of one file apart from other files.

`te_fingerprint` hashes every element of both text encoders (streamed from the safetensors
file tensor by tensor, never a full model load) in a layout-independent form: diffusers tensor
names, the fused open_clip attention split into q/k/v, `text_projection` in Linear orientation,
`position_ids`/`logit_scale` left out. So the same text encoders give the same fingerprint as a
single file or a diffusers folder, and any edit to any row (a merged textual inversion, the start
token, one attention row, one projection column) gives another one.

Canonical rounding (why fp32/fp16/bf16 releases agree): each value is rounded to fp16 and then
to bf16 (round-to-nearest-even both times) before hashing. An fp32 master and its fp16 release,
and an fp16 release and a bf16 copy made from it, hash alike. A bf16 release rounded directly
from an fp32 master differs from the fp16 route in a few per cent of values (double rounding) and
gets its own fingerprint: list both under one name in families.yaml (docs/models.md).

`component_digests` gives the same per-tensor digests, name-free, for the UNet and the VAE, so the
same model stored as a single file and as a diffusers folder can be recognised as one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from pathlib import Path
from typing import Callable, Iterator

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


# ---------------------------------------------------------------- canonical tensors

# rows per conversion: ~8 MB of fp16, so memory stays flat whatever the tensor size
_CHUNK_ELEMENTS = 4 << 20
_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def canonical(t: torch.Tensor) -> torch.Tensor:
    """The hashed form of a tensor: floats rounded fp16 -> bf16 (see the module docstring), as int16 bits."""
    if t.is_floating_point():
        return t.to(torch.float16).to(torch.bfloat16).contiguous().view(torch.int16)
    return t.contiguous()


_buffers = threading.local()


def _buffer(dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A reused per-thread buffer: fresh 8 MB allocations per chunk cost as much as the rounding itself."""
    buf = getattr(_buffers, str(dtype), None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, _CHUNK_ELEMENTS), dtype=dtype)
        setattr(_buffers, str(dtype), buf)
    return buf[:numel]


def _canonical_into_buffer(t: torch.Tensor) -> torch.Tensor:
    """canonical(t), written into the reused buffers (valid until the next call on this thread)."""
    if not t.is_floating_point():
        return t.contiguous()
    src = t
    if t.dtype != torch.float16:
        src = _buffer(torch.float16, t.numel()).view(t.shape)
        src.copy_(t)
    out = _buffer(torch.bfloat16, t.numel()).view(t.shape)
    out.copy_(src)
    return out.view(torch.int16)


# A source tensor: (name, shape, read(start_row, stop_row) -> tensor[start:stop] in the canonical orientation)
Entry = tuple[str, tuple[int, ...], Callable[[int, int], torch.Tensor]]


class _Tensors:
    """Zero-copy views of the tensors of a safetensors file (memory-mapped), or an in-memory state dict."""

    def __init__(self, path: Path | None = None, state: dict | None = None):
        self.state = state
        self._views: dict[str, torch.Tensor] = {}
        if path is not None:
            import mmap

            from luna.models.sdxl import read_safetensors_header

            header = read_safetensors_header(path)
            with open(path, "rb") as f:
                start = 8 + int.from_bytes(f.read(8), "little")
                # copy-on-write mapping: writable for torch.frombuffer, never written, nothing copied
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if path.stat().st_size else None
            self._header = header
            self._start = start
            self._keys = sorted(header, key=lambda k: header[k]["data_offsets"][0])  # file order: sequential reads
        else:
            self._keys = list(state)

    def keys(self) -> list[str]:
        return self._keys

    def _view(self, key: str) -> torch.Tensor:
        if self.state is not None:
            return self.state[key]
        if key not in self._views:
            e = self._header[key]
            if e["dtype"] not in _DTYPES:
                raise ValueError(f"tensor {key!r} has dtype {e['dtype']}, not one this reader knows")
            dtype, shape = _DTYPES[e["dtype"]], tuple(e["shape"])
            a, b = e["data_offsets"]
            numel = 1
            for d in shape:
                numel *= d
            if numel * torch.empty((), dtype=dtype).element_size() != b - a:
                raise ValueError(f"tensor {key!r}: {b - a} bytes for shape {list(shape)} {e['dtype']}")
            self._views[key] = (torch.frombuffer(self._mm, dtype=dtype, count=numel, offset=self._start + a).view(shape)
                                if numel else torch.empty(shape, dtype=dtype))
        return self._views[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header[key]["shape"]) if self.state is None else tuple(self.state[key].shape)

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        t = self._view(key)
        return t[start:stop] if t.ndim else t

    def whole(self, key: str) -> torch.Tensor:
        return self._view(key)


def _chunks(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    if not shape:
        return [(0, 1)]
    n = shape[0]
    per_row = 1
    for d in shape[1:]:
        per_row *= d
    step = max(1, _CHUNK_ELEMENTS // max(1, per_row))
    return [(a, min(n, a + step)) for a in range(0, n, step)] or [(0, 0)]


@contextlib.contextmanager
def _one_thread():
    """Rounding is memory-bound: extra OpenMP threads only spin-wait on a busy machine (measured 2x slower)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def tensor_digest(shape: tuple[int, ...], read: Callable[[int, int], torch.Tensor]) -> tuple[str, int]:
    """(xxh3-128 hex of the canonical bytes of a whole tensor, bytes hashed), row chunk by row chunk.

    xxh3 rather than sha256 per tensor: the rounding pass already costs about one sha256 of the same
    bytes, and a fingerprint needs to tell weights apart, not resist an attacker (the tensor digests
    are combined with sha256)."""
    import xxhash

    h = xxhash.xxh3_128()
    nbytes = 0
    for a, b in _chunks(shape):
        c = _canonical_into_buffer(read(a, b))
        nbytes += c.numel() * c.element_size()
        if c.numel():
            h.update(memoryview(c.reshape(-1).numpy()).cast("B"))
    return h.hexdigest(), nbytes


# ---------------------------------------------------------------- text encoders

_BIGG = "conditioner.embedders.1.model."
_CLIP_L = "conditioner.embedders.0.transformer."
_BIGG_LAYER = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2.", "attn.out_proj.": "self_attn.out_proj."}
_SKIP = ("position_ids", "logit_scale")  # buffers and the contrastive scale: not part of the encoder's output


def _entries_diffusers(t: _Tensors, tag: str) -> Iterator[Entry]:
    for key in t.keys():
        if key.endswith(_SKIP):
            continue
        name = f"{tag}.{key.removeprefix('text_model.')}"
        yield name, t.shape(key), (lambda a, b, key=key: t.rows(key, a, b))


def _entry(t: _Tensors, key: str, name: str) -> Iterator[Entry]:
    yield name, t.shape(key), (lambda a, b: t.rows(key, a, b))


def _entries_single(t: _Tensors) -> Iterator[Entry]:
    for key in t.keys():
        rest = key[len(_CLIP_L):]
        # only CLIPTextModel's own tensors: some files add extras (position_ids, a text_projection)
        if key.startswith(_CLIP_L) and rest.startswith("text_model.") and not key.endswith(_SKIP):
            yield from _entry(t, key, "te1." + rest.removeprefix("text_model."))
        elif key.startswith(_BIGG):
            yield from _bigg_entries(t, key, key[len(_BIGG):])


def _bigg_entries(t: _Tensors, key: str, rest: str) -> Iterator[Entry]:
    simple = {
        "token_embedding.weight": "embeddings.token_embedding.weight",
        "positional_embedding": "embeddings.position_embedding.weight",
        "ln_final.weight": "final_layer_norm.weight",
        "ln_final.bias": "final_layer_norm.bias",
        "text_projection.weight": "text_projection.weight",  # the Linear-layout variant some files use
    }
    if rest in simple:
        yield from _entry(t, key, "te2." + simple[rest])
    elif rest == "text_projection":  # open_clip: x @ P, i.e. the transpose of the Linear weight
        w, e = t.shape(key)
        yield "te2.text_projection.weight", (e, w), (lambda a, b: t.whole(key).T[a:b])
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


def hash_entries(entries: list[Entry]) -> tuple[str, int]:
    """(fingerprint of named tensors, bytes hashed): sha256 over the sorted (name, shape, tensor digest)."""
    digests = {}
    nbytes = 0
    with _one_thread():
        for name, shape, read in entries:  # file order; the combination below is in name order
            d, n = tensor_digest(shape, read)
            digests[name] = (list(shape), d)
            nbytes += n
    h = hashlib.sha256()
    for name in sorted(digests):
        shape, d = digests[name]
        h.update(f"{name}:{shape}:{d};".encode())
    return h.hexdigest()[:_DIGITS], nbytes


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


def _open(f: Path) -> _Tensors:
    if f.suffix == ".safetensors":
        return _Tensors(path=f)
    return _Tensors(state=torch.load(f, map_location="cpu", weights_only=True, mmap=True))


def te_entries(path, allow_pickle: bool = False) -> list[Entry]:
    """The text-encoder tensors of a single file or diffusers folder under their canonical names."""
    path = Path(path)
    entries: list[Entry] = []
    if path.is_dir():
        for sub, tag in (("text_encoder", "te1"), ("text_encoder_2", "te2")):
            for f in _folder_weights(path / sub):
                entries += list(_entries_diffusers(_open(f), tag))
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
    return entries


def te_fingerprint_of_state(state: dict[str, torch.Tensor]) -> str:
    """te_fingerprint of an original-layout state dict in memory (what a single file would give)."""
    return hash_entries(list(_entries_single(_Tensors(state=state))))[0]


def te_fingerprint_of_encoders(text_encoder, text_encoder_2) -> str:
    """te_fingerprint of loaded diffusers text encoders (any device or dtype): the same value as their
    file's when loaded in the file's dtype, or in fp32, or in bf16 from an fp16 file (canonical rounding)."""
    entries = []
    for module, tag in ((text_encoder, "te1"), (text_encoder_2, "te2")):
        state = {k: v.detach() for k, v in module.state_dict().items()}
        entries += list(_entries_diffusers(_Tensors(state=state), tag))
    return hash_entries(entries)[0]


def te_fingerprint(path, allow_pickle: bool = False) -> str:
    """Fingerprint of every element of the two SDXL text encoders, equal across the single-file and diffusers formats."""
    return hash_entries(te_entries(path, allow_pickle))[0]


# ---------------------------------------------------------------- UNet and VAE, name-free

_COMPONENT_PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model."}


def _component_files(folder: Path) -> list[Path]:
    found = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
    plain = [p for p in found if ".fp16." not in p.name]
    return plain or found


def component_digests(path, component: str, small_only: bool = False, first_rows: bool = False) -> tuple[str, int]:
    """(digest of the multiset of per-tensor digests of the UNet or VAE, bytes hashed).

    Names are left out: the original and diffusers layouts hold the same tensors under other names
    (VAE attention as 1x1 convolutions vs linear layers: the same bytes). small_only=True hashes the
    1-D tensors only (norms, biases: ~1 % of the bytes), a cheap probe before the full digest.
    first_rows=True hashes the 1-D tensors whole and the first row (index 0 of the first dimension)
    of every other tensor: a merged UNet LoRA, which leaves norms and biases alone, still changes it."""
    path = Path(path)
    sources: list[tuple[_Tensors, list[str]]] = []
    if path.is_dir():
        for f in _component_files(path / component):
            t = _Tensors(path=f)
            sources.append((t, t.keys()))
    else:
        t = _Tensors(path=path)
        sources.append((t, [k for k in t.keys() if k.startswith(_COMPONENT_PREFIX[component])]))
    digests, nbytes = [], 0
    with _one_thread():
        for t, keys in sources:
            for key in keys:
                shape = t.shape(key)
                if small_only and len(shape) > 1:
                    continue
                if first_rows and len(shape) > 1:
                    # a row is shape[1:] whatever the layout (1x1 conv or linear): the same bytes
                    d, n = tensor_digest((min(1, shape[0]),) + shape[1:], lambda a, b, key=key: t.rows(key, 0, 1))
                    digests.append(f"row:{n}:{d}")
                    nbytes += n
                    continue
                # row chunks of any shape concatenate to the row-major bytes: the digest is shape-free
                d, n = tensor_digest(shape, lambda a, b, key=key: t.rows(key, a, b))
                digests.append(f"{n}:{d}")
                nbytes += n
    if not digests:
        raise ValueError(f"{path}: no {component} tensors")
    return hashlib.sha256(";".join(sorted(digests)).encode()).hexdigest()[:_DIGITS], nbytes


def model_probe(path) -> str:
    """Format-independent identity of the UNet and VAE of a single file or diffusers folder, cheap to read.

    component_digests(first_rows=True) of both: every 1-D tensor whole and the first row of every
    other tensor (under 1 % of the bytes). The same model as a single file and as a diffusers
    folder (fp16 or fp32: canonical rounding) gives the same probe; weights that differ only
    outside the hashed rows (an edit to rows 1.. of every tensor it touches) are not told apart."""
    return hashlib.sha256(";".join(component_digests(path, c, first_rows=True)[0] for c in ("unet", "vae")).encode()
                          ).hexdigest()[:_DIGITS]
