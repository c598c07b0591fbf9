"""SDXL pipelines and text encoders from single-file checkpoints or diffusers folders, offline.

Single files (the community format, original ldm/sgm key layout) are read by diffusers' own
original->diffusers converters (`from_single_file` with a `config=` folder kept in this repo), so
real checkpoints and tiny ones take the same path. The architecture is read from the
safetensors header (tensor names and shapes) before any weight is loaded.
"""
from __future__ import annotations

import contextlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from luna.models.configs import SDXL_BASE, SDXL_TINY, SDXL_TOY

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")

_UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
_UNET_LABEL = "model.diffusion_model.label_emb.0.0.weight"
_CLIP_L_POS = "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"
_BIGG_POS = "conditioner.embedders.1.model.positional_embedding"
_VAE_IN = "first_stage_model.encoder.conv_in.weight"
# Key variant of some community files: the bigG projection stored as a Linear weight ([out, in])
# instead of open_clip's `text_projection` ([in, out]); diffusers' converter leaves it on the meta device.
_BIGG_PROJ = "conditioner.embedders.1.model.text_projection"
_BIGG_PROJ_LINEAR = _BIGG_PROJ + ".weight"


class NotSDXLError(ValueError):
    """The file or folder cannot be used as an SDXL checkpoint; the message names it and says why."""


class PickleCheckpointError(ValueError):
    """A pickle checkpoint (.ckpt/.pt/.bin) was given without allow_pickle=True."""


class NonFiniteError(ValueError):
    """The VAE produced NaN or inf (SDXL's VAE overflows in fp16)."""


@dataclass(frozen=True)
class ArchInfo:
    """What a checkpoint is, read from tensor names and shapes only."""

    path: Path
    format: str  # "single_file" | "diffusers" | "pickle" | "unknown"
    family: str  # "sdxl" | "sd15" | "unknown"
    size: str | None  # "full" | "tiny" | "toy" | "custom" (diffusers folders only) | None
    reason: str

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl" and self.size is not None

    @property
    def config_dir(self) -> Path | None:
        """The repo's diffusers config folder for this size (single files need one)."""
        return {"full": SDXL_BASE, "tiny": SDXL_TINY, "toy": SDXL_TOY}.get(self.size or "")


def read_safetensors_header(path) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape", "data_offsets"}} from a .safetensors header, without reading weights."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 1024**2 or n > path.stat().st_size - 8:
            raise ValueError(f"{path}: header length {n} is not plausible for a safetensors file")
        try:
            header = json.loads(f.read(n))
        except RecursionError:
            raise ValueError(f"{path}: safetensors header nested too deeply") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(isinstance(x, int) for x in shape):
            raise ValueError(f"{path}: safetensors header entry {name!r} has no valid shape")
    return header


# Transformer blocks per attention block of SDXL base 1.0 (original layout): transformer_layers_per_block
# [1, 2, 10] down, 10 in the middle, the same mirrored up (three blocks a level on the way up).
FULL_DEPTHS = {**{f"input_blocks.{i}.1": 2 for i in (4, 5)}, **{f"input_blocks.{i}.1": 10 for i in (7, 8)},
               "middle_block.1": 10, **{f"output_blocks.{i}.1": 10 for i in (0, 1, 2)},
               **{f"output_blocks.{i}.1": 2 for i in (3, 4, 5)}}
_TRANSFORMER_KEY = re.compile(r"^model\.diffusion_model\.((?:input|output)_blocks\.\d+\.\d+|middle_block\.\d+)"
                              r"\.transformer_blocks\.(\d+)\.")


def transformer_depths(shapes) -> dict[str, int]:
    """{attention block (e.g. "input_blocks.7.1"): its number of transformer blocks} of an original-layout UNet."""
    out: dict[str, int] = {}
    for key in shapes:
        m = _TRANSFORMER_KEY.match(key)
        if m:
            out[m.group(1)] = max(out.get(m.group(1), 0), int(m.group(2)) + 1)
    return out


def classify_shapes(shapes: dict[str, tuple[int, ...]]) -> tuple[str, str | None, str]:
    """(family, size, reason) of an original-layout state dict given as {name: shape}."""
    if _UNET_IN not in shapes:
        if any(k.startswith("conditioner.") or k.startswith("cond_stage_model.") for k in shapes):
            return "unknown", None, "text encoders only, no UNet (model.diffusion_model.*)"
        if any(k.startswith(("down_blocks.", "up_blocks.", "mid_block.")) for k in shapes):
            return "unknown", None, "a diffusers-layout component file, not a whole single-file checkpoint"
        return "unknown", None, f"no Stable Diffusion UNet (no {_UNET_IN})"
    if any(k.startswith("cond_stage_model.transformer.") for k in shapes):
        return "sd15", None, "SD 1.x checkpoint (one CLIP-L text encoder, cross-attention 768), not SDXL"
    if any(k.startswith("cond_stage_model.model.") for k in shapes):
        return "unknown", None, "SD 2.x checkpoint (OpenCLIP-H text encoder), not SDXL"
    if "conditioner.embedders.0.model.text_projection" in shapes:
        return "unknown", None, "SDXL refiner (bigG text encoder only), not an SDXL base model"
    if _UNET_LABEL not in shapes:
        return "unknown", None, "UNet without SDXL's added (text_time) conditioning"
    missing = [what for key, what in ((_CLIP_L_POS, "CLIP-L text encoder"), (_BIGG_POS, "OpenCLIP-bigG text encoder"), (_VAE_IN, "VAE")) if key not in shapes]
    if missing:
        return "sdxl", None, f"SDXL UNet but no {', '.join(missing)} in the file (incomplete checkpoint)"
    width, channels = shapes[_UNET_IN][0], shapes[_UNET_IN][1]
    if channels != 4:
        return "unknown", None, f"SDXL UNet with {channels} input channels (inpainting/instruct variant), not text-to-image"
    cross = shapes[_CLIP_L_POS][-1] + shapes[_BIGG_POS][-1]
    for size, cfg_dir in (("full", SDXL_BASE), ("tiny", SDXL_TINY), ("toy", SDXL_TOY)):
        cfg = json.loads((cfg_dir / "unet" / "config.json").read_text())
        if width == cfg["block_out_channels"][0] and cross == cfg["cross_attention_dim"]:
            if size == "full":
                depths = transformer_depths(shapes)
                off = {b: (depths.get(b, 0), n) for b, n in FULL_DEPTHS.items() if depths.get(b, 0) != n}
                if off:
                    where = ", ".join(f"{b} has {got} (SDXL base {n})" for b, (got, n) in list(off.items())[:3])
                    return "sdxl", None, (f"SDXL layout with other transformer depths ({where}): a distilled or pruned "
                                          "SDXL (e.g. SSD-1B, Vega), which the SDXL base config cannot load")
            return "sdxl", size, f"SDXL base layout ({size} size: UNet width {width}, cross-attention {cross})"
    return "sdxl", None, f"SDXL layout of an unsupported size (UNet width {width}, cross-attention {cross})"


def _detect_folder(path: Path) -> ArchInfo:
    index = path / "model_index.json"
    if not index.is_file():
        return ArchInfo(path, "unknown", "unknown", None, "a folder without model_index.json (not a diffusers pipeline)")
    cls = json.loads(index.read_text()).get("_class_name", "")
    unet_cfg = path / "unet" / "config.json"
    if cls not in SDXL_PIPELINES:
        family = "sd15" if cls == "StableDiffusionPipeline" else "unknown"
        return ArchInfo(path, "diffusers", family, None, f"diffusers pipeline {cls!r}, not StableDiffusionXLPipeline")
    if not unet_cfg.is_file() or not (path / "text_encoder_2").is_dir() or not (path / "text_encoder").is_dir():
        return ArchInfo(path, "diffusers", "unknown", None, "SDXL pipeline folder without unet/text_encoder/text_encoder_2")
    cfg = json.loads(unet_cfg.read_text())
    if cfg.get("in_channels", 4) != 4:
        return ArchInfo(path, "diffusers", "unknown", None,
                        f"SDXL UNet with {cfg['in_channels']} input channels (inpainting/instruct variant), not text-to-image")
    size = "custom"
    for name, cfg_dir in (("full", SDXL_BASE), ("tiny", SDXL_TINY), ("toy", SDXL_TOY)):
        ref = json.loads((cfg_dir / "unet" / "config.json").read_text())
        if all(cfg.get(k) == ref[k] for k in ("block_out_channels", "cross_attention_dim", "transformer_layers_per_block")):
            size = name
    return ArchInfo(path, "diffusers", "sdxl", size, f"diffusers SDXL pipeline ({size} size)")


def detect_architecture(path) -> ArchInfo:
    """Family, size and reason for a single file or a diffusers folder, from names and shapes only."""
    path = Path(path)
    if path.is_dir():
        return _detect_folder(path)
    if not path.is_file():
        return ArchInfo(path, "unknown", "unknown", None, "no such file or folder")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return ArchInfo(path, "pickle", "unknown", None, "pickle checkpoint: its tensors cannot be listed without unpickling")
    try:
        header = read_safetensors_header(path)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return ArchInfo(path, "unknown", "unknown", None, f"not a readable safetensors file ({exc})")
    family, size, reason = classify_shapes({k: tuple(v["shape"]) for k, v in header.items()})
    return ArchInfo(path, "single_file", family, size, reason)


def load_pickle_state(path: Path):
    """torch.load(weights_only=True) of an opted-in pickle; anything but tensors is refused, never run."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) torch.save file
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError...: one clear error
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise NotSDXLError(f"{path}: refused: torch.load(weights_only=True) cannot read it ({type(e).__name__}: {first})") from None


def _pickle_arch(path: Path) -> ArchInfo:
    state = load_pickle_state(path)
    if not isinstance(state, dict):
        raise NotSDXLError(f"{path}: not a loadable SDXL checkpoint: the pickle holds no state dict")
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    family, size, reason = classify_shapes({k: tuple(v.shape) for k, v in state.items() if torch.is_tensor(v)})
    return ArchInfo(path, "pickle", family, size, reason)


def checked_architecture(path, allow_pickle: bool = False) -> ArchInfo:
    """detect_architecture, raising NotSDXLError / PickleCheckpointError when it cannot be loaded as SDXL."""
    info = detect_architecture(path)
    if info.format == "pickle":
        if not allow_pickle:
            raise PickleCheckpointError(
                f"{info.path}: pickle checkpoints can run code when loaded; convert it to .safetensors "
                "or pass allow_pickle=True (it is then read with torch.load(weights_only=True))"
            )
        info = _pickle_arch(info.path)
    if not info.is_sdxl:
        raise NotSDXLError(f"{info.path}: not a loadable SDXL checkpoint: {info.reason}")
    return info


@contextlib.contextmanager
def _quiet():
    """Silence diffusers/transformers progress bars and info logs while loading, then restore them."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (dlog, tlog)]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, verbosity, bars in saved:
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()


def _folder_tokenizers(folder: Path) -> dict:
    """Our offline tokenizers for any tokenizer subfolder that lacks its own files."""
    from luna.models.tokenizers import make_tokenizer

    out = {}
    for sub in ("tokenizer", "tokenizer_2"):
        d = folder / sub
        if not any((d / f).is_file() for f in ("tokenizer.json", "vocab.json")):
            out[sub] = make_tokenizer(sub)
    return out


def _variant(folder: Path) -> str | None:
    """'fp16' when a diffusers folder holds only `*.fp16.safetensors` weights (a common hub layout)."""
    unet = folder / "unet"
    if any(unet.glob("diffusion_pytorch_model*.safetensors")) and not any(
        p for p in unet.glob("diffusion_pytorch_model*.safetensors") if ".fp16." not in p.name
    ):
        return "fp16"
    return None


def load_sdxl(path, device="cpu", dtype=torch.float32, allow_pickle: bool = False):
    """A StableDiffusionXLPipeline from a single file (original layout) or a diffusers folder, offline."""
    from diffusers import StableDiffusionXLPipeline

    from luna.models.tokenizers import sdxl_tokenizers

    info = checked_architecture(path, allow_pickle=allow_pickle)
    with _quiet():
        if info.format == "diffusers":
            pipe = StableDiffusionXLPipeline.from_pretrained(
                info.path, local_files_only=True, dtype=dtype, variant=_variant(info.path), **_folder_tokenizers(info.path)
            )
        else:
            tok, tok2 = sdxl_tokenizers()
            encoders = {}
            if info.format == "single_file" and _BIGG_PROJ_LINEAR in read_safetensors_header(info.path):
                enc = load_text_encoders(info.path, dtype=dtype)  # our key normalisation, then diffusers' converter
                encoders = dict(text_encoder=enc.text_encoder, text_encoder_2=enc.text_encoder_2)
            pipe = StableDiffusionXLPipeline.from_single_file(
                str(info.path), config=str(info.config_dir), local_files_only=True, dtype=dtype,
                tokenizer=tok, tokenizer_2=tok2, **encoders,
            )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# ---------------------------------------------------------------- text encoders


@dataclass
class TextEncoders:
    """SDXL's two tokenizers and text encoders, nothing else (cheap to load)."""

    tokenizer: object
    tokenizer_2: object
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder_2.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.text_encoder_2.parameters()).dtype

    @classmethod
    def from_pipeline(cls, pipe) -> "TextEncoders":
        return cls(pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2)


def normalise_te_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text-encoder key variants real files use, in the layout diffusers' converter reads
    (`text_projection.weight` -> transposed `text_projection`; position_ids/logit_scale are read as they are)."""
    if _BIGG_PROJ_LINEAR in state:
        linear = state.pop(_BIGG_PROJ_LINEAR)
        state.setdefault(_BIGG_PROJ, linear.T.contiguous())
    return state


def _conditioner_tensors(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        state = load_pickle_state(path)
        while "state_dict" in state:
            state = state["state_dict"]
        return normalise_te_keys({k: v for k, v in state.items() if k.startswith("conditioner.")})
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return normalise_te_keys({k: f.get_tensor(k) for k in f.keys() if k.startswith("conditioner.")})


def _tokenizers(info: ArchInfo) -> tuple:
    """(tokenizer, tokenizer_2) of a checked checkpoint: a diffusers folder's own (ours where it lacks
    them), SDXL's for a single file."""
    if info.format == "diffusers":
        from transformers import AutoTokenizer

        own = _folder_tokenizers(info.path)
        tok = own.get("tokenizer") or AutoTokenizer.from_pretrained(info.path / "tokenizer", local_files_only=True)
        tok2 = own.get("tokenizer_2") or AutoTokenizer.from_pretrained(info.path / "tokenizer_2", local_files_only=True)
        return tok, tok2
    from luna.models.tokenizers import sdxl_tokenizers

    return sdxl_tokenizers()


def load_tokenizers(path, allow_pickle: bool = False) -> tuple:
    """(tokenizer, tokenizer_2) of a checkpoint, without its weights (what `load_text_encoders` pairs with
    the encoders)."""
    info = checked_architecture(path, allow_pickle=allow_pickle)
    with _quiet():
        return _tokenizers(info)


def load_text_encoders(path, device="cpu", dtype=torch.float32, allow_pickle: bool = False) -> TextEncoders:
    """Tokenizers and text encoders only, from a single file (conditioner.* tensors) or a diffusers folder."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    info = checked_architecture(path, allow_pickle=allow_pickle)
    with _quiet():
        tok, tok2 = _tokenizers(info)
        if info.format == "diffusers":
            common = dict(local_files_only=True, dtype=dtype, variant=_variant(info.path))
            te1 = CLIPTextModel.from_pretrained(info.path / "text_encoder", **common)
            te2 = CLIPTextModelWithProjection.from_pretrained(info.path / "text_encoder_2", **common)
        else:
            from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

            state = _conditioner_tensors(info.path, allow_pickle)
            common = dict(config=str(info.config_dir), local_files_only=True, torch_dtype=dtype)
            te1 = create_diffusers_clip_model_from_ldm(CLIPTextModel, state, subfolder="text_encoder", **common)
            te2 = create_diffusers_clip_model_from_ldm(CLIPTextModelWithProjection, state, subfolder="text_encoder_2", **common)
    return TextEncoders(tok, tok2, te1.to(device).eval(), te2.to(device).eval())


def tokenize(tokenizers, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids `[B, 77]` of `prompts` from both SDXL tokenizers `(tokenizer, tokenizer_2)`, as
    `encode_prompt` feeds them to the encoders."""
    return tuple(tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                     return_tensors="pt").input_ids for tok in tokenizers)


def tokenizers_fingerprint(tokenizers) -> str:
    """A hex digest of everything that decides what `tokenize` gives with `(tokenizer, tokenizer_2)`:
    each one's class, vocabulary, merges, normalizer and pre-tokenizer (its whole `tokenizer.json`),
    special tokens, padding token and maximum length. Token ids stored under it are valid for any
    checkpoint whose tokenizers have the same digest (most SDXL families share SDXL's)."""
    import hashlib

    h = hashlib.sha256()
    for tok in tokenizers:
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None:
            spec = backend.to_str()
            cut = spec.find(',"added_tokens":')  # what precedes it (truncation, padding) is the last call's state
            if spec.startswith('{"version"') and cut > 0:
                spec = spec[cut:]
            else:
                spec = json.loads(spec)
                spec.pop("truncation", None)
                spec.pop("padding", None)
                spec = json.dumps(spec, sort_keys=True)
        else:  # a pure-Python tokenizer: its vocabulary and settings
            spec = json.dumps({"vocab": sorted(tok.get_vocab().items()),
                               "init": {k: str(v) for k, v in sorted(tok.init_kwargs.items())}})
        settings = {"class": type(tok).__name__, "model_max_length": int(tok.model_max_length),
                    "pad_token_id": tok.pad_token_id, "padding_side": tok.padding_side,
                    "truncation_side": tok.truncation_side, "special": list(tok.all_special_tokens)}
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
        h.update(spec.encode())
    return h.hexdigest()[:32]


@torch.no_grad()
def encode_ids(enc: TextEncoders, ids: torch.Tensor, ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond [B,77,C1+C2], pooled [B,P]) of token ids from `tokenize`: the encoders' half of `encode_prompt`."""
    hidden, pooled = [], None
    for tok_ids, encoder in ((ids, enc.text_encoder), (ids_2, enc.text_encoder_2)):
        out = encoder(tok_ids.to(next(encoder.parameters()).device), output_hidden_states=True)
        if out[0].ndim == 2:  # text_encoder_2's projected pooled output
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    cond = torch.cat(hidden, dim=-1).to(enc.dtype)
    return cond, pooled


def _encode(enc: TextEncoders, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    return encode_ids(enc, *tokenize((enc.tokenizer, enc.tokenizer_2), prompts))


def encode_prompt(enc: TextEncoders, prompts, negative=None):
    """(cond [B,77,C1+C2], pooled [B,P], neg_cond, neg_pooled) exactly as diffusers' SDXL encode_prompt.

    `negative=None` gives all-zero negatives (SDXL's force_zeros_for_empty_prompt, what the pipeline
    does when no negative prompt is given); a string or list of strings is encoded like the prompts.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    cond, pooled = _encode(enc, prompts)
    if negative is None:
        return cond, pooled, torch.zeros_like(cond), torch.zeros_like(pooled)
    negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
    if len(negative) != len(prompts):
        raise ValueError(f"encode_prompt: {len(negative)} negative prompts for {len(prompts)} prompts")
    neg_cond, neg_pooled = _encode(enc, negative)
    return cond, pooled, neg_cond, neg_pooled


def add_time_ids(original_size=(1024, 1024), crop=(0, 0), target_size=None, batch: int = 1, dtype=torch.float32):
    """SDXL's micro-conditioning `time_ids` [B, 6]: original size, crop top-left, target size (h, w)."""
    target_size = target_size or original_size
    ids = torch.tensor([list(original_size) + list(crop) + list(target_size)], dtype=dtype)
    return ids.repeat(batch, 1)


# ---------------------------------------------------------------- VAE, guarded against fp16 overflow


@contextlib.contextmanager
def _vae_fp32(vae):
    dtype = vae.dtype
    if dtype == torch.float16:
        vae.to(torch.float32)
    try:
        yield
    finally:
        if dtype == torch.float16:
            vae.to(dtype)


def _check_finite(t: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(t).all():
        raise NonFiniteError(f"VAE {what} produced NaN/inf values (fp16 overflow?)")
    return t


@torch.no_grad()
def vae_encode(vae, pixels: torch.Tensor, generator=None, sample: bool = False) -> torch.Tensor:
    """Pixels in [-1, 1] [B,3,H,W] -> scaled latents [B,4,H/8,W/8] (posterior mode unless sample=True), in fp32."""
    with _vae_fp32(vae):
        dist = vae.encode(pixels.to(vae.device, torch.float32)).latent_dist
        latents = dist.sample(generator) if sample else dist.mode()
    return _check_finite(latents * vae.config.scaling_factor, "encode")


@torch.no_grad()
def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> pixels in [-1, 1] (fp32), decoding in fp32 so fp16 weights never overflow."""
    with _vae_fp32(vae):
        pixels = vae.decode(latents.to(vae.device, torch.float32) / vae.config.scaling_factor).sample
    return _check_finite(pixels, "decode")
