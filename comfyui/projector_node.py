"""ComfyUI "Luna Vision Translator" node: image embeddings -> SDXL (or SD 1.x) conditioning through a trained projector.

Inputs: a projector (dropdown of models/luna_projectors/, or a typed folder), and either a
CLIP_VISION_OUTPUT (from ComfyUI's "CLIP Vision Encode") or an IMAGE with a vision tower
(ComfyUI's CLIP_VISION, or a luna open_clip tower named by `vision_model` + `vision_weights`).
The projected conditioning is blended into an optional CONDITIONING row by row:
(1 - strength) * yours + strength * projected, one row per input image; strength 0 returns yours
unchanged. Without one, strength blends against the model's empty prompt: for SDXL that is all zeros
(force_zeros_for_empty_prompt), so the output is strength * projected, with the given width/height as
SDXL size conditioning; a user's entries keep their own size keys. SD 1.x's empty prompt is CLIP-L's
encoding of "" (not zeros): a CLIP-L projector without a conditioning blends against that, encoded by
the `clip` input, which it needs unless strength is 1.
Returns ComfyUI CONDITIONING `[[cond [B,77,C], {"pooled_output": [B,P], ...}]]`.

What the conditioning is for follows the export's declared targets (projector.json `targets`):
an SDXL projector gives SDXL's [B,77,2048] + pooled [B,1280]; a CLIP-L head (`model.heads=[clip_l]`)
gives SD 1.x's [B,77,768] + pooled [B,768] (CLIP-L's final normed layer and pooled EOS state, what
an SD 1.x CLIPTextEncode gives), with no SDXL size keys. The `target` widget may insist on one
(`sdxl` refuses a CLIP-L projector, `sd1.x` an SDXL one), and a CLIP-L projector is refused for an
SDXL conditioning input: each a clear error naming the projector.
Projectors and towers stay loaded in the model host and reload when their files change.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .paths import NONE, choices as folder_choices, fingerprint_of, require as require_folder
from .host import HOST
from .sources import clip_encoder, image_to_pil, luna_tower, match_length
from .vault_node import sdxl_size


def _projector(path: str, dim: int | None):
    """One loaded projector per (folder, file fingerprint, input width), kept across prompts."""
    from projector.export import load_projector

    folder = Path(path).expanduser()
    folder = folder if folder.is_dir() else folder.parent
    # "any targets" in the key: the detailer caches the same folder only after its SDXL targets check
    return HOST.get("projector", str(folder), lambda: load_projector(folder, expect_dim=dim), (dim, "any targets"))


def _field(output, name: str):
    """A field of ComfyUI's clip_vision Output (attribute or item access), or None."""
    value = getattr(output, name, None)
    if value is None:
        try:
            value = output[name]
        except (KeyError, TypeError, IndexError):
            value = None
    return value


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
        tower = luna_tower(vision_model, vision_weights)
        pixels = torch.stack([tower.preprocess(p) for p in image_to_pil(image)])
        x = tower.encode_tokens(pixels) if kind == "tokens" else tower.encode(pixels)
        return x.float(), tower.model_id
    raise ValueError(
        "Luna Vision Translator: connect a CLIP_VISION_OUTPUT, or an IMAGE with a vision tower "
        "(CLIP_VISION input, or vision_model + vision_weights)"
    )


def sd1_empty_prompt(clip, strength: float, width: int):
    """SD 1.x's empty-prompt CONDITIONING (CLIP-L's encoding of ""), what a CLIP-L projection without an input
    conditioning is blended against; None at strength 1 (nothing of it would remain)."""
    if strength == 1.0:
        return None
    if clip is None:
        raise ValueError(
            f"Luna Vision Translator: input 'clip': a CLIP-L (SD 1.x) projector without input 'conditioning' blends "
            f"the projection into SD 1.x's empty prompt at strength {strength:g} (CLIP-L's encoding of \"\"; unlike "
            "SDXL's it is not zeros): connect your checkpoint's CLIP, or a conditioning, or set strength 1")
    cond, pooled = clip_encoder(clip)([""])
    if cond.shape[-1] != width or pooled.shape[-1] != width:
        raise ValueError(f"Luna Vision Translator: input 'clip' encodes the empty prompt {cond.shape[-1]} wide "
                         f"(pooled {pooled.shape[-1]}), the CLIP-L projector gives {width}: connect an SD 1.x "
                         "checkpoint's CLIP")
    return [[cond.float().cpu(), {"pooled_output": pooled.float().cpu()}]]


def blend(conditioning, cond: torch.Tensor, pooled: torch.Tensor, strength: float, size: dict):
    """(1 - strength) * each CONDITIONING entry + strength * projected, row by row; without one, strength * projected
    (a blend against SDXL's empty prompt, zeros; the CLIP-L path passes SD 1.x's empty prompt as `conditioning`)."""
    if conditioning is None:
        return [[cond * strength, {"pooled_output": pooled * strength, **size}]]
    b = cond.shape[0]
    out = []
    for c, extra in conditioning:
        if c.shape[-1] != cond.shape[-1]:
            raise ValueError(
                f"Luna Vision Translator: input 'conditioning' is {c.shape[-1]} wide, the projector gives "
                f"{cond.shape[-1]} (a projector for another text-encoder family; an SDXL conditioning is 2048 wide)"
            )
        if c.shape[0] not in (1, b):
            raise ValueError(f"Luna Vision Translator: input 'conditioning' has a batch of {c.shape[0]}, "
                             f"the images {b}")
        extra = dict(extra)
        p = cond.to(c.device, c.dtype)
        new = (1 - strength) * c.expand(b, -1, -1) + strength * match_length(p, c.shape[1], "Luna Vision Translator")
        base_pooled = extra.get("pooled_output")
        q = pooled.to(c.device, c.dtype)
        extra["pooled_output"] = q if base_pooled is None else (1 - strength) * base_pooled.expand(b, -1) + strength * q
        out.append([new, extra])
    return out


class LunaVisionTranslator:
    """Translate what a vision model sees in each crop into SDXL conditioning, and blend it with yours."""

    CATEGORY = "Luna/conditioning"
    FUNCTION = "translate"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("one conditioning row per input image",)
    DESCRIPTION = ("A trained Luna projector maps the image embedding to an SDXL conditioning [77, 2048] + pooled "
                   "(or, for a CLIP-L head, an SD 1.x conditioning [77, 768] + pooled); blended as "
                   "(1-strength)*yours + strength*projected. Strength 0 returns yours unchanged. Without yours, "
                   "strength blends against the empty prompt: SDXL's is zeros (strength*projected); SD 1.x's is "
                   "CLIP-L's encoding of \"\", from the clip input.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "projector": (folder_choices("luna_projectors", with_none=False) or [NONE], {"tooltip":
                              "a projector folder in models/luna_projectors/ (projector.safetensors + projector.json)"}),
                "strength": ("FLOAT", {"default": 0.3, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                             "weight of the projected conditioning; 0 returns yours unchanged"}),
            },
            "optional": {
                "projector_path": ("STRING", {"default": "", "tooltip": "instead of the dropdown: a projector folder"}),
                "clip_vision_output": ("CLIP_VISION_OUTPUT", {"tooltip": "from CLIP Vision Encode (its image_embeds)"}),
                "image": ("IMAGE", {"tooltip": "the crops, embedded by clip_vision or vision_model"}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "the vision model the projector was trained on"}),
                "vision_model": ("STRING", {"default": "", "tooltip": "luna open_clip tower, e.g. ViT-H-14 (instead of CLIP_VISION)"}),
                "vision_weights": ("STRING", {"default": "", "tooltip": "local weights file of vision_model"}),
                "conditioning": ("CONDITIONING", {"tooltip": "yours (CLIPTextEncode); its size keys are kept. "
                                 "Without it, strength blends against the empty prompt (SDXL's: zeros)"}),
                "clip": ("CLIP", {"tooltip": "SD 1.x only (CLIP-L projector, no conditioning, strength < 1): your "
                                  "checkpoint's CLIP, to encode the empty prompt strength blends against"}),
                "width": ("INT", {"default": 1024, "min": 64, "max": 16384, "step": 8, "tooltip":
                          "SDXL size conditioning, only when there is no input conditioning"}),
                "height": ("INT", {"default": 1024, "min": 64, "max": 16384, "step": 8, "tooltip":
                           "SDXL size conditioning, only when there is no input conditioning"}),
                "target": (list(TARGETS), {"default": "auto", "tooltip": "the model the conditioning is for: auto "
                           "follows the projector (projector.json targets: sdxl, or clip_l for SD 1.x); sdxl / sd1.x "
                           "refuse a projector trained for the other"}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, projector=NONE, projector_path="", **_):
        return fingerprint_of("luna_projectors", projector, projector_path, "projector")

    def translate(self, projector, strength, projector_path="", clip_vision_output=None, image=None, clip_vision=None,
                  vision_model="", vision_weights="", conditioning=None, width=1024, height=1024, target="auto",
                  clip=None):
        from projector.export import ProjectorLoadError, ProjectorMismatchError

        if conditioning is not None and float(strength) == 0.0:
            return (conditioning,)
        folder = Path(require_folder("luna_projectors", projector, projector_path, "projector",
                                     "Luna Vision Translator", "choose a projector or set projector_path"))
        kind, targets = _declared(folder)
        check_targets(folder, targets, target, conditioning)
        if targets == "clip_l" and conditioning is None:  # blend against SD 1.x's empty prompt, as SDXL's zeros
            conditioning = sd1_empty_prompt(clip, float(strength), 768)
        x, model_id = encode_inputs(kind, clip_vision_output, image, clip_vision, vision_model, vision_weights)
        try:
            proj = _projector(str(folder), int(x.shape[-1]) if kind == "embed" else None)
        except ProjectorMismatchError as exc:
            raise ProjectorMismatchError(f"Luna Vision Translator: input 'projector': {exc}") from exc
        except ProjectorLoadError as exc:
            raise ProjectorLoadError(f"Luna Vision Translator: input 'projector': {exc}") from exc
        trained_on = proj.dims.get("vision_model")
        if model_id is not None and trained_on != model_id:
            raise ProjectorMismatchError(
                f"Luna Vision Translator: input 'projector': {folder} was trained on {trained_on!r}, the image was "
                f"encoded with {model_id!r}"
            )
        with torch.no_grad():
            cond, pooled = proj(x.to(proj.input_mean.device))
        size = sdxl_size(width, height) if targets == "sdxl" else {}
        return (blend(conditioning, cond.cpu(), pooled.cpu(), float(strength), size),)


# widget value -> the projector targets it needs (projector/targets.py); auto: whatever the export declares
TARGETS = {"auto": None, "sdxl": "sdxl", "sd1.x": "clip_l"}


def check_targets(folder: Path, targets: str, target: str, conditioning) -> None:
    """Refuse a projector whose declared targets are not what the `target` widget or the input conditioning
    (a CLIP-L projector into an SDXL-wide conditioning) needs; the message names the projector."""
    from projector.export import TARGET_SHAPES, ProjectorTargetsError

    if target not in TARGETS:
        raise ValueError(f"Luna Vision Translator: input 'target': {target!r}; choose one of {list(TARGETS)}")
    want = TARGETS[target]
    what = {"sdxl": "an SDXL", "clip_l": "a CLIP-L (SD 1.x / Flux)"}
    if want is not None and targets != want:
        raise ProjectorTargetsError(
            f"Luna Vision Translator: input 'projector': {folder} is {what.get(targets, targets)} projector "
            f"(projector.json targets {targets!r}: {TARGET_SHAPES.get(targets, '?')}); target={target} needs "
            f"{TARGET_SHAPES[want]}: choose a projector trained for {target} (model.heads=[{want}]) or set target")
    if targets == "clip_l" and conditioning is not None:
        width = int(conditioning[0][0].shape[-1])
        if width != 768:
            raise ProjectorTargetsError(
                f"Luna Vision Translator: input 'projector': {folder} is a CLIP-L (SD 1.x / Flux) projector "
                f"({TARGET_SHAPES['clip_l']}), refused for input 'conditioning' of width {width} (an SDXL "
                "conditioning is 2048 wide): use it with an SD 1.x model's conditioning, or an SDXL projector")


def _declared(folder: Path) -> tuple[str, str]:
    """(input kind "embed" | "tokens", targets "sdxl" | "clip_l") of the projector in `folder`, from its
    projector.json (absent targets: sdxl)."""
    import json

    from projector.export import CONFIG_NAME, ProjectorLoadError

    cfg = folder / CONFIG_NAME if folder.is_dir() else folder.parent / CONFIG_NAME
    if not cfg.is_file():
        raise ProjectorLoadError(f"Luna Vision Translator: input 'projector': {folder} is not a projector folder "
                                 f"(no {CONFIG_NAME})")
    dims = json.loads(cfg.read_text())["dims"]
    return dims.get("input", "embed"), dims.get("targets", "sdxl")


NODE_CLASS_MAPPINGS = {"LunaVisionTranslator": LunaVisionTranslator}
NODE_DISPLAY_NAME_MAPPINGS = {"LunaVisionTranslator": "Luna Vision Translator"}
