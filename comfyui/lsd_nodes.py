"""The Luna Semantic Detailer as ComfyUI nodes, on ComfyUI's own MODEL / VAE / CONDITIONING.

    Luna Noise Scaffold -> LUNA_SCAFFOLD (+ a LATENT / NOISE that draws the 1K draft from it)
    Luna Detector       -> LUNA_DETECTIONS (+ MASK batch, preview IMAGE)
    Luna Semantic Detailer, Luna Global Refiner -> IMAGE

The pure work is lsd_runtime's (detailer.detail, refiner.refine_tiles, the scaffold, the
conditioning sources); only the denoising call differs (lsd_runtime.denoiser.ComfyDenoiser runs
comfy.sample with the scaffold's noise and one conditioning row per crop, in true batches).
User errors raise ValueError naming the node input, which ComfyUI shows as the node's error.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

from .paths import NONE, choices as folder_choices, file_choices, fingerprint_of, resolve as resolve_folder
from .host import HOST
from .ip_adapter import ComfyIPAdapter, load_ip_adapter
from .sources import (ClipVisionEmbedder, Chained, ComfyText, InputError, Routed, open_vault_checked, parse_routing,
                      tower_embedder)

CATEGORY = "Luna/detailer"
MAX_RES = 16384


# ---------------------------------------------------------------------- types


@dataclass
class LunaDetections:
    """LUNA_DETECTIONS: per image of the batch, its detections (normalised boxes, labels, scores, masks)."""

    image_size: tuple[int, int]  # (W, H) of the image the boxes were found on
    per_image: list = field(default_factory=list)  # list[list[lsd_runtime.detect.Detection]]

    def to_json(self) -> str:
        return json.dumps({"image_size": list(self.image_size),
                           "images": [[d.to_json() for d in dets] for dets in self.per_image]})


class ScaffoldNoise:
    """ComfyUI NOISE (SamplerCustomAdvanced): the scaffold resampled to the latent being sampled."""

    def __init__(self, scaffold):
        self.scaffold = scaffold
        self.seed = scaffold.seed

    def generate_noise(self, input_latent):
        lat = input_latent["samples"]
        h, w = lat.shape[-2:]
        noise = self.scaffold.latent_for_size(w * 8, h * 8)
        if noise.shape[0] != lat.shape[1]:
            raise InputError(f"input 'scaffold': {noise.shape[0]} latent channels, the latent has {lat.shape[1]}")
        return noise[None].expand(lat.shape[0], -1, -1, -1).clone().to(lat.dtype)


# ---------------------------------------------------------------------- helpers


def _samplers() -> list[str]:
    import comfy.samplers

    from lsd_runtime.api import deterministic

    return [s for s in comfy.samplers.KSampler.SAMPLERS if deterministic(s)]


def _schedulers() -> list[str]:
    import comfy.samplers

    return list(comfy.samplers.KSampler.SCHEDULERS)


def to_canvas(image: torch.Tensor) -> np.ndarray:
    """One ComfyUI image [H, W, C] in 0..1 -> uint8 HxWx3."""
    return (image[..., :3].float().cpu().clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)


def apply_delta(original: torch.Tensor, before: np.ndarray, after: np.ndarray) -> torch.Tensor:
    """The original float image plus what the runtime changed: pixels it did not touch stay bit-exact.
    Only the bounding block of the changed pixels is recomputed."""
    out = original.clone()
    changed = np.any(after != before, axis=-1)
    rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
    if rows.size == 0:
        return out
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    delta = torch.from_numpy(after[y0:y1, x0:x1].astype(np.float32) - before[y0:y1, x0:x1].astype(np.float32))
    block = original[y0:y1, x0:x1, :3].float() + delta / 255.0
    out[y0:y1, x0:x1, :3] = block.clamp(0, 1).to(original.dtype)
    return out


def _check_image(image, what="image") -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 3:
        raise InputError(f"input '{what}': expected a ComfyUI IMAGE [B, H, W, 3]")
    return image


def _scaffold_for(scaffold, w: int, h: int, what: str = "scaffold"):
    """The scaffold over the canvas padded to the 8 px grid; clear errors when it does not cover the image."""
    from lsd_runtime.api import NoiseScaffold

    if not isinstance(scaffold, NoiseScaffold):
        raise InputError(f"input '{what}': connect a Luna Noise Scaffold")
    pw, ph = -(-w // 8) * 8, -(-h // 8) * 8
    sw, sh = scaffold.pixel_size
    if (sw, sh) not in ((w, h), (pw, ph)):
        size = "smaller than" if sw < w or sh < h else "larger than"
        raise InputError(f"input '{what}': the scaffold covers {sw}x{sh} px, {size} the {w}x{h} image; "
                         f"set the Luna Noise Scaffold's width/height to {w}x{h}")
    if (sw, sh) == (pw, ph):
        return scaffold
    return NoiseScaffold(scaffold.seed, (pw, ph), noise=scaffold.noise)


def _progress(total: int):
    """A ComfyUI progress bar updated per batch; also where a user's Cancel stops the node."""
    import comfy.model_management
    import comfy.utils

    bar = comfy.utils.ProgressBar(max(1, total))
    done = [0]

    def step(n: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        done[0] += n
        bar.update_absolute(min(done[0], max(1, total)))

    return step


class _Recording:
    """Wrap a denoiser and keep (input, output) of every item for the debug image."""

    def __init__(self, denoiser, keep: int = 16):
        self.denoiser, self.keep, self.pairs = denoiser, keep, []

    def __call__(self, items):
        out = self.denoiser(items)
        for it, o in zip(items, out):
            if len(self.pairs) < self.keep:
                self.pairs.append((np.asarray(it.image, np.float32), np.asarray(o, np.float32)))
        return out


def debug_image(pairs) -> torch.Tensor:
    """Crops before | after at the working size, one row each, as an IMAGE batch (a black square when
    nothing was refined). No resampling: it shows exactly what the sampler got and gave."""
    if not pairs:
        return torch.zeros(1, 64, 64, 3)
    rows = []
    for before, after in pairs:
        h = before.shape[0]
        gap = np.full((h, 4, 3), 255.0, np.float32)
        rows.append(np.concatenate([np.clip(before, 0, 255), gap, np.clip(after, 0, 255)], axis=1) / 255.0)
    return torch.from_numpy(np.stack(rows).astype(np.float32))


# ---------------------------------------------------------------------- conditioning inputs


def conditioning_inputs() -> dict:
    """Optional inputs shared by the detailer and the refiner (vault / projector anchoring)."""
    return {
        "vault": (folder_choices("luna_vaults"), {"default": NONE, "tooltip": "a vault in models/luna_vaults/ "
                  "(or extra_model_paths.yaml's luna_vaults); none = text only"}),
        "vault_path": ("STRING", {"default": "", "tooltip": "instead of the dropdown: a vault folder, or the shared "
                       "Ray service ray:NAME (luna vault serve)"}),
        "vault_strength": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                           "weight of the retrieved conditioning: (1-s)*positive + s*retrieved, per crop"}),
        "vault_k": ("INT", {"default": 8, "min": 1, "max": 256, "tooltip": "neighbours retrieved per crop"}),
        "category_routing": ("STRING", {"default": "", "tooltip": "per-label vault category, e.g. "
                             "face=faces, hand=hands (empty: the whole vault for every crop)"}),
        "category_settings": ("STRING", {"default": "", "tooltip": "a category_settings.json written by `luna ab "
                              "tune=true`: its label routes, and per-category strength, k, weighting and temperature "
                              "(other crops keep vault_strength / vault_k; category_routing adds routes)"}),
        "projector": (folder_choices("luna_projectors"), {"default": NONE, "tooltip": "a trained projector in "
                      "models/luna_projectors/; none = no projection"}),
        "projector_path": ("STRING", {"default": "", "tooltip": "instead of the dropdown: a projector folder"}),
        "projector_strength": ("FLOAT", {"default": 0.3, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                               "weight of the projected conditioning, blended after the vault's"}),
        "clip_vision": ("CLIP_VISION", {"tooltip": "embeds the crops for the vault/projector (the model they were "
                        "built on, e.g. ViT-H-14)"}),
        "vision_model": ("STRING", {"default": "", "tooltip": "instead of clip_vision: a luna open_clip tower name "
                         "(e.g. ViT-H-14, or tiny)"}),
        "vision_weights": ("STRING", {"default": "", "tooltip": "local weights file of vision_model"}),
        "clip": ("CLIP", {"tooltip": "text encoders of your checkpoint: needed only for prompts-only vaults"}),
        "ip_adapter": (file_choices("ipadapter", ".safetensors"), {"default": NONE, "tooltip": "a plain IP-Adapter "
                       "(.safetensors) in models/ipadapter/: each crop is conditioned on its own image through it "
                       "(embedded by clip_vision / vision_model); none = no IP-Adapter"}),
        "ip_adapter_path": ("STRING", {"default": "", "tooltip": "instead of the dropdown: an IP-Adapter "
                            ".safetensors file"}),
        "ip_adapter_strength": ("FLOAT", {"default": 0.6, "min": 0.0, "max": 2.0, "step": 0.05, "tooltip":
                                "scale of the IP-Adapter's image attention, per crop; 0 = no IP-Adapter"}),
    }


def build_source(positive, clip=None, clip_vision=None, vision_model="", vision_weights="", vault=NONE,
                 vault_path="", vault_strength=0.5, vault_k=8, category_routing="", category_settings="", projector=NONE,
                 projector_path="", projector_strength=0.3, ip_adapter=NONE, ip_adapter_path="",
                 ip_adapter_strength=0.6):
    """The conditioning of a detailer/refiner call: (source, IP-Adapter hook or None). The source gives text,
    vault, projector, or vault-then-projector rows; with an IP-Adapter every row also carries its crop's
    image embedding, which the hook (ComfyDenoiser's `ip_adapter`) turns into that crop's image tokens."""
    from lsd_runtime.api import ConditioningError, VaultSource, WithImageEmbeds, open_projector

    text = ComfyText(positive, clip)
    vault_dir = resolve_folder("luna_vaults", vault, vault_path, "vault")
    proj_dir = resolve_folder("luna_projectors", projector, projector_path, "projector")
    ip_file = resolve_folder("ipadapter", ip_adapter, ip_adapter_path, "ip_adapter")
    use_vault = vault_dir is not None and float(vault_strength) > 0
    use_proj = proj_dir is not None and float(projector_strength) > 0
    use_ip = ip_file is not None and float(ip_adapter_strength) > 0
    if not (use_vault or use_proj or use_ip):
        return text, None
    if clip_vision is not None:
        embedder = ClipVisionEmbedder(clip_vision)
    elif vision_model:
        embedder = tower_embedder(vision_model, vision_weights)
    else:
        raise InputError("input 'clip_vision': a vault, projector or IP-Adapter needs the crops' image embeddings; "
                         "connect a CLIP_VISION (or set vision_model)")
    source = text
    if use_vault:
        v = open_vault_checked(vault_dir, "vault_path" if vault_path else "vault")
        try:
            source = VaultSource(v, text, _EmbedderWithId(embedder, v), k=int(vault_k), weight=float(vault_strength),
                                 weighting="softmax", family="any")  # ComfyUI's CLIP has no luna fingerprint
        except ConditioningError as exc:
            raise InputError(f"input 'vault': {exc}") from exc
        routing = parse_routing(category_routing)
        table = read_category_settings(category_settings)
        if routing or table is not None:
            source = Routed(source, routing, table, "category_settings" if table is not None else "category_routing")
    if use_proj:
        try:
            # "sdxl" in the key: the Vision Translator caches the same folder without the SDXL targets check
            proj = HOST.get("projector", proj_dir, lambda: open_projector(proj_dir, embedder), (embedder.dim, "sdxl"))
        except (ConditioningError, ValueError, OSError) as exc:
            raise InputError(f"input 'projector': {exc}") from exc
        pid = proj.dims.get("vision_model")
        if embedder.model_id is not None and pid and not _same(pid, embedder.model_id):
            raise InputError(f"input 'projector': trained on vision model {pid!r}, the crops are embedded with "
                             f"{embedder.model_id!r}")
        if proj.dims.get("cond_dim") and int(proj.dims["cond_dim"]) != int(text.cond.shape[-1]):
            raise InputError(f"input 'projector': it gives {proj.dims['cond_dim']}-wide conditioning, the positive "
                             f"conditioning is {text.cond.shape[-1]} wide (a projector for another text-encoder family)")
        source = Chained(source, proj, embedder, float(projector_strength))
    if not use_ip:
        return source, None
    what = "ip_adapter_path" if ip_adapter_path and str(ip_adapter_path).strip() else "ip_adapter"
    weights = load_ip_adapter(ip_file, what)
    weights.check_dim(embedder.dim, "clip_vision" if clip_vision is not None else f"vision_model {vision_model!r}", what)
    return WithImageEmbeds(source, embedder), ComfyIPAdapter(weights, float(ip_adapter_strength), what)


def read_category_settings(path) -> object | None:
    """The CategoryTable of input 'category_settings' (None when empty); errors name the input and file."""
    if not path or not str(path).strip():
        return None
    from lsd_runtime.api import CategorySettingsError, CategoryTable

    try:
        return CategoryTable.read(os.path.expanduser(str(path).strip()))
    except (CategorySettingsError, OSError, ValueError) as exc:
        raise InputError(f"input 'category_settings': {exc}") from exc


def _same(a, b) -> bool:
    from lsd_runtime.api import same_vision_model

    return same_vision_model(a, b)


class _EmbedderWithId:
    """A CLIP_VISION embedder whose model id is unknown takes the vault's (the dimension is still checked)."""

    def __init__(self, embedder, vault):
        self.embedder = embedder
        self.model_id = embedder.model_id or vault.info().get("vision_model")
        self.dim = embedder.dim

    def __call__(self, crops):
        return self.embedder(crops)


def conditioning_fingerprint(vault=NONE, vault_path="", projector=NONE, projector_path="", ip_adapter=NONE,
                             ip_adapter_path="", **_) -> str:
    """IS_CHANGED part: the files of the chosen vault/projector/IP-Adapter (a rebuilt one re-runs the node)."""
    return "|".join((fingerprint_of("luna_vaults", vault, vault_path, missing=""),
                     fingerprint_of("luna_projectors", projector, projector_path, missing=""),
                     fingerprint_of("ipadapter", ip_adapter, ip_adapter_path, missing="")))


# ---------------------------------------------------------------------- nodes


class LunaNoiseScaffold:
    """The master noise: one seeded latent noise field over the whole canvas (kept on CPU)."""

    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = ("LUNA_SCAFFOLD", "LATENT", "NOISE")
    RETURN_NAMES = ("scaffold", "draft_latent", "draft_noise")
    OUTPUT_TOOLTIPS = ("the master noise for the detailer and the global refiner",
                       "the scaffold at the draft size, pre-scaled so a KSampler (Advanced) with add_noise disabled "
                       "and full denoise starts from exactly this noise",
                       "the scaffold as NOISE for SamplerCustomAdvanced (resampled to whatever latent it samples)")
    DESCRIPTION = ("Seeded latent noise for the whole canvas (e.g. 4096x4096 -> 4x512x512). The draft, the detailer "
                   "and the global refiner all draw their noise from it (variance-correct resampling), so texture "
                   "stays consistent across scales.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "the model that will sample: gives the latent channels, scale and sigma_max"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "the scaffold's seed"}),
            "width": ("INT", {"default": 4096, "min": 64, "max": MAX_RES, "step": 8, "tooltip": "canvas width (px) "
                      "the detailer and refiner will work on"}),
            "height": ("INT", {"default": 4096, "min": 64, "max": MAX_RES, "step": 8, "tooltip": "canvas height (px)"}),
            "draft_width": ("INT", {"default": 1024, "min": 64, "max": MAX_RES, "step": 8, "tooltip":
                            "width of the draft latent output"}),
            "draft_height": ("INT", {"default": 1024, "min": 64, "max": MAX_RES, "step": 8, "tooltip":
                             "height of the draft latent output"}),
        }}

    def build(self, model, seed, width, height, draft_width, draft_height):
        from lsd_runtime.api import LATENT_CHANNELS, NoiseScaffold

        fmt = model.get_model_object("latent_format")
        channels = int(getattr(fmt, "latent_channels", LATENT_CHANNELS))
        if channels != LATENT_CHANNELS:
            raise InputError(f"input 'model': it samples {channels}-channel latents; the Luna scaffold and detailer "
                             f"support {LATENT_CHANNELS}-channel (SDXL-family) models")
        scaffold = NoiseScaffold(int(seed), (int(width), int(height)))
        noise = scaffold.latent_for_size(int(draft_width), int(draft_height))[None]
        ms = model.get_model_object("model_sampling")
        sigma = ms.sigma_max.float().reshape(1)
        start = ms.noise_scaling(sigma, noise.clone(), torch.zeros_like(noise), max_denoise=True)
        # the KSampler multiplies a non-empty latent by the format's scale (process_latent_in): undo it
        latent = fmt.process_out(start)
        return (scaffold, {"samples": latent}, ScaffoldNoise(scaffold))


class LunaDetector:
    """Find what the detailer should refine: faces (cascade, no download) or text prompts (local models)."""

    CATEGORY = CATEGORY
    FUNCTION = "detect"
    RETURN_TYPES = ("LUNA_DETECTIONS", "MASK", "IMAGE")
    RETURN_NAMES = ("detections", "masks", "preview")
    OUTPUT_TOOLTIPS = ("normalised boxes, labels, scores and masks per image", "one mask per detection",
                       "the image with the boxes drawn")
    DESCRIPTION = ("Detect on the canvas (or a downscaled copy for speed). cascade: OpenCV's face cascade, nothing to "
                   "download; folders in models/luna_detectors/: OWLv2 / Grounding DINO / SAM 3 saved with "
                   "save_pretrained, prompted by text.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "the canvas (a batch is detected image by image)"}),
            "detector": (["cascade"] + folder_choices("luna_detectors", with_none=False), {"default": "cascade",
                         "tooltip": "cascade (faces, built in) or a detector folder in models/luna_detectors/"}),
            "prompts": ("STRING", {"default": "face", "tooltip": "comma-separated things to find (text detectors); "
                        "also the label of cascade faces"}),
            "threshold": ("FLOAT", {"default": 0.3, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                          "minimum score kept"}),
            "max_detections": ("INT", {"default": 16, "min": 1, "max": 256, "tooltip": "keep the best N per image"}),
            "detect_size": ("INT", {"default": 1024, "min": 0, "max": MAX_RES, "step": 8, "tooltip":
                            "detect on a copy whose longer side is this (speed); 0 = full size"}),
        }, "optional": {
            "detections_file": ("STRING", {"default": "", "tooltip": "instead of a detector: a detections JSON "
                                "(luna's format: normalised boxes, labels, scores, mask PNGs beside it)"}),
        }}

    @classmethod
    def IS_CHANGED(cls, detector="cascade", detections_file="", **_):
        from .host import fingerprint

        if detections_file:
            return fingerprint(detections_file)
        if detector == "cascade":
            return "cascade"
        try:
            return fingerprint(resolve_folder("luna_detectors", detector))
        except ValueError:
            return "missing"

    def _detector(self, name: str, threshold: float, detections_file: str = ""):
        from lsd_runtime.api import CascadeFaceDetector, DetectionFileError, FileDetector, make_detector

        if detections_file and detections_file.strip():
            try:
                return FileDetector(detections_file.strip())
            except DetectionFileError as exc:
                raise InputError(f"input 'detections_file': {exc}") from exc
        if name == "cascade":
            return CascadeFaceDetector()
        folder = resolve_folder("luna_detectors", name, what="detector")
        try:
            kind = str(json.loads((_path(folder) / "config.json").read_text()).get("model_type", "")).lower()
        except (OSError, ValueError) as exc:
            raise InputError(f"input 'detector': {folder} has no readable config.json ({exc})") from exc
        key = "sam3" if "sam3" in kind else "zeroshot"
        try:
            return HOST.get("detector", folder, lambda: make_detector(key, weights=folder, threshold=float(threshold)),
                            (key, float(threshold)))
        except ValueError as exc:
            raise InputError(f"input 'detector': {exc}") from exc

    def detect(self, image, detector, prompts, threshold, max_detections, detect_size, detections_file=""):
        from lsd_runtime.api import Detection

        image = _check_image(image)
        labels = [p.strip() for p in str(prompts).split(",") if p.strip()]
        if not labels:
            raise InputError("input 'prompts': give at least one thing to find, e.g. face")
        det = self._detector(detector, threshold, detections_file)
        from_file = bool(detections_file and detections_file.strip())
        b, h, w = image.shape[:3]
        per_image, masks, previews = [], [], []
        for i in range(b):
            pil = Image.fromarray(to_canvas(image[i]))
            small = pil
            if detect_size and max(w, h) > int(detect_size):
                s = int(detect_size) / max(w, h)
                small = pil.resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS)
            found = [d for d in det.detect(small, labels) if float(d.score) >= float(threshold)]
            if detector == "cascade" and not from_file:
                found = [Detection(d.box, d.mask, labels[0], d.score, dict(d.extra)) for d in found]
            found = sorted(found, key=lambda d: -float(d.score))[:int(max_detections)]
            found = [Detection(d.box, None if d.mask is None else _resize_mask(d.mask, w, h), d.label, d.score,
                               dict(d.extra)) for d in found]
            per_image.append(found)
            for d in found:
                masks.append(torch.from_numpy(_det_mask(d, w, h)))
            previews.append(_preview(pil, found))
        mask = torch.stack(masks) if masks else torch.zeros(1, h, w)
        return (LunaDetections((w, h), per_image), mask, torch.stack(previews))


def _path(p):
    from pathlib import Path

    return Path(p)


def _resize_mask(mask, w, h) -> np.ndarray:
    m = np.asarray(mask, np.float32)
    if m.shape == (h, w):
        return m
    return np.asarray(Image.fromarray(m).resize((w, h), Image.BILINEAR), np.float32)


def _det_mask(d, w, h) -> np.ndarray:
    if d.mask is not None:
        return np.clip(np.asarray(d.mask, np.float32), 0, 1)
    m = np.zeros((h, w), np.float32)
    x0, y0, x1, y1 = d.box_px((w, h))
    m[max(0, int(y0)):min(h, int(np.ceil(y1))), max(0, int(x0)):min(w, int(np.ceil(x1)))] = 1.0
    return m


def _preview(pil, dets) -> torch.Tensor:
    im = pil.copy()
    draw = ImageDraw.Draw(im)
    lw = max(1, round(max(im.size) / 256))
    for d in dets:
        x0, y0, x1, y1 = d.box_px(im.size)
        draw.rectangle([x0, y0, x1, y1], outline=(255, 64, 64), width=lw)
        draw.text((x0 + 2, y0 + 2), f"{d.label} {float(d.score):.2f}", fill=(255, 255, 0))
    return torch.from_numpy(np.asarray(im, np.float32) / 255.0)


def sampling_inputs(denoise: float) -> dict:
    return {
        "model": ("MODEL", {"tooltip": "your model, with its LoRAs and patches"}),
        "vae": ("VAE", {"tooltip": "encodes the crops and decodes the result"}),
        "positive": ("CONDITIONING", {"tooltip": "your prompt (CLIPTextEncode); the vault/projector blend into it per crop"}),
        "negative": ("CONDITIONING", {"tooltip": "your negative prompt"}),
        "image": ("IMAGE", {"tooltip": "the canvas to refine"}),
        "scaffold": ("LUNA_SCAFFOLD", {"tooltip": "the Luna Noise Scaffold of this canvas: the only noise used"}),
        "steps": ("INT", {"default": 20, "min": 1, "max": 10000, "tooltip": "sampler steps (as KSampler)"}),
        "cfg": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                          "tooltip": "classifier-free guidance scale"}),
        "sampler_name": (_samplers(), {"tooltip": "ComfyUI samplers that draw no noise of their own (ancestral/SDE "
                                       "ones would add noise besides the scaffold's)"}),
        "scheduler": (_schedulers(), {"default": "normal", "tooltip": "sigma schedule (as KSampler)"}),
        "denoise": ("FLOAT", {"default": denoise, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                    "how much of the schedule runs; 0 returns the image unchanged"}),
        "batch_size": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip": "crops or tiles per sampler call"}),
    }


def _source_kwargs(kw: dict) -> dict:
    keys = ("clip", "clip_vision", "vision_model", "vision_weights", "vault", "vault_path", "vault_strength", "vault_k",
            "category_routing", "category_settings", "projector", "projector_path", "projector_strength", "ip_adapter", "ip_adapter_path",
            "ip_adapter_strength")
    return {k: kw[k] for k in keys if k in kw}


def _denoiser(model, vae, negative, total: int, ip_adapter=None, **sampling):
    """ComfyUI's sampler as the runtime's denoiser, with a progress bar over `total` crops or tiles."""
    from lsd_runtime.api import ComfyDenoiser, DenoiserError

    try:
        return ComfyDenoiser(model, vae, negative, progress=_progress(total), ip_adapter=ip_adapter, **sampling)
    except DenoiserError as exc:
        raise InputError(f"input 'sampler_name': {exc}") from exc


def _each_image(image: torch.Tensor, work_on) -> torch.Tensor:
    """Run `work_on(i, canvas padded to the 8 px grid) -> refined uint8 canvas` on every image of the batch;
    the result is each original plus what changed (untouched pixels bit-exact)."""
    from lsd_runtime.api import pad_to_multiple

    b, h, w = image.shape[:3]
    outs = []
    for i in range(b):
        canvas = to_canvas(image[i])
        padded, _ = pad_to_multiple(Image.fromarray(canvas), 8)
        refined = work_on(i, np.asarray(padded).copy())
        outs.append(apply_delta(image[i], canvas, refined[:h, :w]))
    return torch.stack(outs)


class LunaSemanticDetailer:
    """Refine every detection: square crop -> working size -> scaffold noise -> your sampler -> smoothstep blend."""

    CATEGORY = CATEGORY
    FUNCTION = "detail"
    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("image", "debug")
    OUTPUT_TOOLTIPS = ("the refined canvas (pixels outside every mask unchanged)", "each crop before | after")
    DESCRIPTION = ("luna refine's detailer on your MODEL/VAE: square multiple-of-8 crops resized to crop_size, the "
                   "scaffold's noise for each box (variance-correct), per-crop conditioning (vault/projector), VAE "
                   "encode, your sampler in true batches with the injected noise only, decode, blend back.")

    @classmethod
    def INPUT_TYPES(cls):
        req = sampling_inputs(0.35)
        req["detections"] = ("LUNA_DETECTIONS", {"tooltip": "from Luna Detector, found on this image"})
        req["crop_size"] = ("INT", {"default": 1024, "min": 64, "max": 4096, "step": 8, "tooltip":
                            "working size every crop is resized to (1024 for SDXL)"})
        req["pad"] = ("FLOAT", {"default": 0.25, "min": 0.0, "max": 2.0, "step": 0.05, "tooltip":
                      "context around a box, as a fraction of its longer side"})
        req["feather"] = ("FLOAT", {"default": 32.0, "min": 0.0, "max": 512.0, "step": 1.0, "tooltip":
                          "mask feather in canvas pixels (smoothstep blend)"})
        return {"required": req, "optional": conditioning_inputs()}

    @classmethod
    def IS_CHANGED(cls, **kw):
        return conditioning_fingerprint(**kw)

    def detail(self, model, vae, positive, negative, image, scaffold, steps, cfg, sampler_name, scheduler, denoise,
               batch_size, detections, crop_size, pad, feather, **opt):
        image = _check_image(image)
        out, debug = run_detailer(model, vae, positive, negative, image, detections, scaffold, steps=steps, cfg=cfg,
                                  sampler_name=sampler_name, scheduler=scheduler, denoise=denoise,
                                  batch_size=batch_size, crop_size=crop_size, pad=pad, feather=feather,
                                  **_source_kwargs(opt))
        return (out, debug)


def _check_detections(detections, image) -> list:
    b, h, w = image.shape[:3]
    if not isinstance(detections, LunaDetections):
        raise InputError("input 'detections': connect a Luna Detector")
    if tuple(detections.image_size) != (w, h):
        dw, dh = detections.image_size
        raise InputError(f"input 'detections': found on a {dw}x{dh} image, this image is {w}x{h} "
                         "(detect on the image you refine)")
    if len(detections.per_image) not in (1, b):
        raise InputError(f"input 'detections': {len(detections.per_image)} images of detections for a batch of {b}")
    return detections.per_image * b if len(detections.per_image) == 1 else detections.per_image


def run_detailer(model, vae, positive, negative, image, detections, scaffold, *, steps=20, cfg=5.0,
                 sampler_name="euler", scheduler="normal", denoise=0.35, batch_size=4, crop_size=1024, pad=0.25,
                 feather=32.0, **source_kw):
    """The detailer node's work (also what the benchmark calls): (IMAGE, debug IMAGE)."""
    from lsd_runtime.api import DetailSettings, detail
    from lsd_runtime.api import padded_detections

    per_image = _check_detections(detections, image)
    h, w = image.shape[1:3]
    sc = _scaffold_for(scaffold, w, h)
    if float(denoise) == 0.0 or not any(per_image):
        return image, debug_image([])
    settings = DetailSettings(working_size=int(crop_size), pad=float(pad), feather=float(feather),
                              batch_size=int(batch_size), min_crop=min(64, int(crop_size)))
    try:
        settings.check()
    except ValueError as exc:
        raise InputError(f"input 'crop_size': {exc}") from exc
    source, ip = build_source(positive, **source_kw)
    pw, ph = sc.pixel_size
    total = sum(len(d) for d in per_image)  # at most one crop per detection (tiny ones are skipped)
    den = _Recording(_denoiser(model, vae, negative, total, ip, steps=steps, cfg=cfg, sampler_name=sampler_name,
                               scheduler=scheduler, denoise=denoise))
    out = _each_image(image, lambda i, work: detail(work, padded_detections(per_image[i], (w, h), (pw, ph)), sc,
                                                    source, den, settings, sc.seed)[0])
    return out, debug_image(den.pairs)


class LunaGlobalRefiner:
    """Polish the whole canvas: overlapping tiles in two chessboard passes, scaffold noise sliced 1:1."""

    CATEGORY = CATEGORY
    FUNCTION = "refine"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("the refined canvas",)
    DESCRIPTION = ("luna refine's global pass on your MODEL/VAE: tiles of tile_size with at least `overlap` px overlap "
                   "(5x5 tiles of 1024 on 4096), processed in two chessboard passes in batches, each tile's noise the "
                   "scaffold's own cells, feathered so the result is seamless.")

    @classmethod
    def INPUT_TYPES(cls):
        req = sampling_inputs(0.2)
        req["tile_size"] = ("INT", {"default": 1024, "min": 64, "max": 4096, "step": 8, "tooltip":
                            "tile side in pixels (1024 for SDXL)"})
        req["overlap"] = ("INT", {"default": 256, "min": 0, "max": 2048, "step": 8, "tooltip":
                          "minimum overlap between neighbouring tiles (px); also the feather"})
        return {"required": req, "optional": conditioning_inputs()}

    @classmethod
    def IS_CHANGED(cls, **kw):
        return conditioning_fingerprint(**kw)

    def refine(self, model, vae, positive, negative, image, scaffold, steps, cfg, sampler_name, scheduler, denoise,
               batch_size, tile_size, overlap, **opt):
        image = _check_image(image)
        return (run_refiner(model, vae, positive, negative, image, scaffold, steps=steps, cfg=cfg,
                            sampler_name=sampler_name, scheduler=scheduler, denoise=denoise, batch_size=batch_size,
                            tile_size=tile_size, overlap=overlap, **_source_kwargs(opt)),)


def run_refiner(model, vae, positive, negative, image, scaffold, *, steps=20, cfg=5.0, sampler_name="euler",
                scheduler="normal", denoise=0.2, batch_size=4, tile_size=1024, overlap=256, **source_kw):
    from lsd_runtime.api import RefineTileSettings, refine_tiles
    from lsd_runtime.api import tile_grid

    b, h, w = image.shape[:3]
    sc = _scaffold_for(scaffold, w, h)
    if float(denoise) == 0.0:
        return image
    pw, ph = sc.pixel_size
    if int(overlap) >= min(int(tile_size), pw, ph):
        raise InputError(f"input 'overlap': {overlap} px must be smaller than the tile ({min(int(tile_size), pw, ph)} px)")
    settings = RefineTileSettings(tile=int(tile_size), overlap=int(overlap), batch_size=int(batch_size))
    try:
        settings.check()
    except ValueError as exc:
        raise InputError(f"input 'tile_size': {exc}") from exc
    source, ip = build_source(positive, **source_kw)
    total = b * len(tile_grid((pw, ph), settings.tile, settings.overlap))
    den = _denoiser(model, vae, negative, total, ip, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                    denoise=denoise)
    return _each_image(image, lambda i, work: refine_tiles(work, sc, source, den, settings, sc.seed)[0])


NODE_CLASS_MAPPINGS = {
    "LunaNoiseScaffold": LunaNoiseScaffold,
    "LunaDetector": LunaDetector,
    "LunaSemanticDetailer": LunaSemanticDetailer,
    "LunaGlobalRefiner": LunaGlobalRefiner,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LunaNoiseScaffold": "Luna Noise Scaffold",
    "LunaDetector": "Luna Detector",
    "LunaSemanticDetailer": "Luna Semantic Detailer",
    "LunaGlobalRefiner": "Luna Global Refiner",
}
