"""open_clip vision towers from local weight files (never a download), plus the tiny preset's tower,
and `embed`: the one image -> embedding path of extraction, the vault and the runtime.

Precision policy of `embed`: the tower keeps its own weights' dtype (float32 as `load_vision` makes
it); on CUDA the forward runs under float16 autocast, on CPU in float32; results are float32 on the
CPU. Extraction, vault queries and runtime crops all go through it, so a query embeds a crop with
the same arithmetic that embedded the pairs the vault was built from.
"""
from __future__ import annotations

import contextlib
import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch

from luna.models.configs import OPEN_CLIP_DIR

TINY_NAME = "luna-tiny-vit"
ALIASES = {"tiny": TINY_NAME}
_registered = False


class VisionWeightsError(ValueError):
    """A weights file that cannot be loaded into the requested open_clip architecture."""


def _register_configs() -> None:
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(OPEN_CLIP_DIR)
        _registered = True


_INIT_FUNCTIONS = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                   "xavier_normal_", "trunc_normal_", "constant_", "zeros_", "ones_", "orthogonal_")


@contextlib.contextmanager
def _skip_init():
    """Skip random initialisation (5x faster for ViT-H/bigG on CPU) when every weight is loaded afterwards."""
    saved = {n: getattr(torch.nn.init, n) for n in _INIT_FUNCTIONS}
    for n in _INIT_FUNCTIONS:
        setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def create_open_clip(name: str, seed: int | None = None, init: bool = True):
    """An open_clip model of architecture `name` with random weights (seeded: deterministic), in eval mode.

    init=False leaves the weights uninitialised, for a caller that loads all of them next."""
    import open_clip

    _register_configs()
    name = ALIASES.get(name, name)
    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {name!r} (e.g. tiny, ViT-H-14, ViT-L-14-336, ViT-bigG-14)")
    root = logging.getLogger()
    saved = root.level
    root.setLevel(max(saved, logging.ERROR))  # open_clip warns "No pretrained weights loaded": we load them ourselves
    try:
        with torch.random.fork_rng(devices=[]), (contextlib.nullcontext() if init else _skip_init()):
            torch.manual_seed(zlib.crc32(name.encode()) if seed is None else seed)
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=None, pretrained_image=False, pretrained_text=False
            )
    finally:
        root.setLevel(saved)
    model.luna_preprocess = preprocess
    return model.eval()


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or .bin/.pt/.pth via torch.load(weights_only=True)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if any(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    if "vision_model.embeddings.patch_embedding.weight" in state:  # transformers CLIP vision layout
        state = from_hf_clip_vision(state)
    return state


_HF_LAYER = {
    "layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}
_HF_TOP = {
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
}


def from_hf_clip_vision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPVisionModelWithProjection weights (e.g. IP-Adapter's image_encoder) -> open_clip `visual.*`."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
        elif key == "visual_projection.weight":
            out["visual.proj"] = value.T.contiguous()
        elif key.startswith("vision_model.encoder.layers."):
            layer, rest = key[len("vision_model.encoder.layers."):].split(".", 1)
            base = f"visual.transformer.resblocks.{layer}."
            parts = rest.split(".")
            if parts[0] == "self_attn" and parts[1] in ("q_proj", "k_proj", "v_proj"):
                qkv.setdefault(f"{base}attn.in_proj_{parts[2]}", {})[parts[1]] = value
            else:
                new = next((n + rest[len(o):] for o, n in _HF_LAYER.items() if rest.startswith(o)), None)
                if new is not None:
                    out[base + new] = value
    for key, p in qkv.items():
        out[key] = torch.cat([p["q_proj"], p["k_proj"], p["v_proj"]], dim=0)
    return out


def _check_matches(state: dict[str, torch.Tensor], model, path: Path, name: str) -> dict[str, torch.Tensor]:
    expected = model.state_dict()
    expected = dict(sorted(expected.items(), key=lambda kv: not kv[0].startswith("visual.")))  # vision first
    if state and all(k.startswith("visual.") for k in state):  # a vision-only file
        expected = {k: v for k, v in expected.items() if k.startswith("visual.")}
    for key, ref in expected.items():
        if key not in state:
            raise VisionWeightsError(f"{path}: does not match open_clip {name}: tensor {key!r} is missing")
        if tuple(state[key].shape) != tuple(ref.shape):
            raise VisionWeightsError(
                f"{path}: does not match open_clip {name}: tensor {key!r} has shape {tuple(state[key].shape)}, "
                f"expected {tuple(ref.shape)}"
            )
    extra = [k for k in state if k not in expected and k.startswith("visual.")]
    if extra:
        raise VisionWeightsError(f"{path}: does not match open_clip {name}: unexpected tensor {extra[0]!r}")
    return {k: state[k] for k in expected}


_OPENAI_KEYS = ("input_resolution", "context_length", "vocab_size")  # only OpenAI's own CLIP state dicts hold these


def _activation(model) -> str:
    return "quick_gelu" if any(type(m).__name__ == "QuickGELU" for m in model.visual.modules()) else "gelu"


def declared_activation(path: Path, state_keys) -> tuple[str | None, str]:
    """(activation the weights were trained with, evidence), or (None, "") when the file does not say.

    QuickGELU and GELU weights have the same tensors and shapes: only a sibling config
    (transformers config.json, open_clip_config.json), the safetensors metadata or OpenAI's own
    key signature tell them apart."""
    keys = set(state_keys)
    if any(k in keys for k in _OPENAI_KEYS):
        return "quick_gelu", "OpenAI CLIP key signature (input_resolution/context_length/vocab_size)"
    for cfg_name in ("config.json", "open_clip_config.json"):
        cfg_path = path.parent / cfg_name
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, ValueError):
            continue
        act = (cfg.get("vision_config") or {}).get("hidden_act") or cfg.get("hidden_act")
        if act in ("quick_gelu", "gelu"):
            return act, f"{cfg_path.name} hidden_act={act}"
        qg = (cfg.get("model_cfg") or {}).get("quick_gelu")
        if isinstance(qg, bool):
            return ("quick_gelu" if qg else "gelu"), f"{cfg_path.name} model_cfg.quick_gelu={qg}"
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        act = meta.get("hidden_act") or ("quick_gelu" if meta.get("quick_gelu") == "true" else None)
        if act in ("quick_gelu", "gelu"):
            return act, f"safetensors metadata hidden_act={act}"
    return None, ""


def _check_activation(model, path: Path, name: str, state_keys) -> None:
    act, evidence = declared_activation(path, state_keys)
    want = _activation(model)
    if act is not None and act != want:
        fix = f"{name}-quickgelu" if act == "quick_gelu" else name.removesuffix("-quickgelu")
        raise VisionWeightsError(
            f"{path}: weights trained with {act} ({evidence}), but open_clip {name} uses {want}: every shape "
            f"matches and the embeddings would be wrong; use the architecture {fix!r} (conf/vision/)")


@dataclass
class VisionTower:
    """An open_clip image encoder: projected embeddings and the penultimate token sequence."""

    model_id: str  # "open_clip:<architecture>"
    dim: int  # projected embedding size
    preprocess: Callable  # the model's own open_clip eval transform, PIL image -> [3,H,W]
    model: torch.nn.Module  # the whole open_clip model (its text tower is unused)

    @property
    def visual(self):
        return self.model.visual

    @property
    def image_size(self) -> int:
        size = self.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] preprocessed pixels -> [B,D] projected embeddings (open_clip encode_image, not normalised)."""
        return self.model.encode_image(pixels.to(self.device, next(self.model.parameters()).dtype))

    @torch.no_grad()
    def encode_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] -> [B,T,W] output of the penultimate transformer block (class token first), as IP-Adapter uses."""
        visual = self.visual
        depth = len(visual.transformer.resblocks)
        out = visual.forward_intermediates(
            pixels.to(self.device, next(self.model.parameters()).dtype),
            indices=[depth - 2],
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        return torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)


def load_vision(name: str = "tiny", weights=None, device="cpu", dtype=torch.float32) -> VisionTower:
    """An open_clip vision tower `name` ("tiny", "ViT-H-14", "ViT-L-14-336", "ViT-bigG-14", ...) with local `weights`.

    weights=None is allowed only for "tiny" (deterministic tiny weights); real architectures need a
    local file (safetensors, or .bin/.pt read with weights_only=True) holding an open_clip state
    dict, its `visual.*` part, or a transformers CLIPVisionModelWithProjection (IP-Adapter's
    image_encoder/model.safetensors for ViT-H-14).
    """
    arch = ALIASES.get(name, name)
    _register_configs()
    import open_clip

    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {name!r} (e.g. tiny, ViT-H-14, ViT-L-14-336, ViT-bigG-14)")
    if weights is None and arch != TINY_NAME:
        raise ValueError(f"vision model {name!r} needs a local weights file (weights=PATH); nothing is downloaded")
    if weights is None:
        model = create_open_clip(arch)
    else:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"vision weights file {path} does not exist")
        state = read_state_dict(path)
        model = create_open_clip(arch, init=False)
        _check_activation(model, path, arch, state.keys())
        state = _check_matches(state, model, path, arch)
        with torch.no_grad():
            for key, param in model.state_dict().items():
                if key not in state:  # the unused text tower of a vision-only file: defined, not garbage
                    param.zero_()
        model.load_state_dict(state, strict=False)
    model = model.to(device=device, dtype=dtype).eval()
    dim = int(getattr(model.visual, "output_dim", 0) or model.visual.proj.shape[1])
    return VisionTower(model_id=f"open_clip:{arch}", dim=dim, preprocess=model.luna_preprocess, model=model)


class Embedded(NamedTuple):
    embed: torch.Tensor  # [B, D] projected embeddings (open_clip encode_image, not normalised), float32 on CPU
    tokens: torch.Tensor | None  # [B, T, W] penultimate-block tokens, class token first (tokens=True), else None


def embed(tower: VisionTower, images: Sequence | torch.Tensor, *, tokens: bool = False,
          autocast: bool = True) -> Embedded:
    """Embeddings of `images` (PIL images, preprocessed here with the tower's own transform, or a
    [B,3,H,W] tensor already preprocessed) and, with tokens=True, the penultimate tokens from the same
    forward pass. autocast=False runs CUDA in the tower's dtype too (see the module's precision policy)."""
    if isinstance(images, torch.Tensor):
        pixels = images
    else:
        pixels = torch.stack([tower.preprocess(im.convert("RGB")) for im in images])
    pixels = pixels.to(tower.device, next(tower.model.parameters()).dtype, non_blocking=True)
    use_autocast = autocast and tower.device.type == "cuda"
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=use_autocast):
        if tokens and hasattr(tower.visual, "forward_intermediates"):
            emb, tok = _embed_and_tokens(tower, pixels)
        else:
            emb = tower.encode(pixels)
            tok = tower.encode_tokens(pixels) if tokens else None
    return Embedded(emb.float().cpu(), tok.float().cpu() if tok is not None else None)


def _embed_and_tokens(tower: VisionTower, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The projected embedding and the penultimate tokens from one forward pass (equal to `encode`
    and `encode_tokens` run separately)."""
    visual = tower.visual
    depth = len(visual.transformer.resblocks)
    out = visual.forward_intermediates(pixels, indices=[depth - 2], intermediates_only=False,
                                       output_fmt="NLC", output_extra_tokens=True)
    tok = torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)
    return out["image_features"], tok


# ---------------------------------------------------------------------- text side


class TextSideError(ValueError):
    """A tower without a usable text encoder (a vision-only weights file zeroes it)."""


class TextSide:
    """The vision tower's own text encoder (open_clip CLIP), when the tower has a usable one:
    `text_side(prompts)` -> [B, D] L2-normalised text embeddings, float32 on the CPU."""

    def __init__(self, tower: VisionTower):
        import open_clip

        self.tower = tower
        model = tower.model
        arch = str(tower.model_id).removeprefix("open_clip:")
        emb = getattr(model, "token_embedding", None)
        if not hasattr(model, "encode_text") or emb is None or not bool(torch.any(emb.weight != 0)):
            raise TextSideError(f"{tower.model_id}: no text side loaded")  # a vision-only weights file zeroes it
        self.tokenizer = open_clip.get_tokenizer(arch)

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            t = self.tower.model.encode_text(self.tokenizer(prompts).to(self.tower.device))
        return torch.nn.functional.normalize(t.float().cpu(), dim=-1)


def text_side(tower: VisionTower | None) -> TextSide | None:
    """The tower's TextSide, or None when there is no tower or it has no text side."""
    try:
        return TextSide(tower) if tower is not None else None
    except TextSideError:
        return None


def text_agreement(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> list[float]:
    """Row i's cosine of image embedding i and text embedding i (the text-image agreement score,
    `clip_text` of `luna ab`, the factory gate's `quality.agreement`); either side may be unnormalised."""
    a = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
    b = torch.nn.functional.normalize(text_embeds.float(), dim=-1)
    if a.shape != b.shape:
        raise ValueError(f"text_agreement: {tuple(a.shape)} image embeddings against {tuple(b.shape)} text embeddings")
    return [float(v) for v in (a * b).sum(-1).tolist()]
