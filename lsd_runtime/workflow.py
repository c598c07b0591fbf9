"""The Luna Semantic Detailer end to end: `refine(image, prompt, ...) -> RefineResult(image, record)`.

    [from_draft: 1K draft from the downscaled scaffold -> 1.5K smoothing -> upscale to the canvas]
    pad to the 8 px grid -> detect -> detail (batched crops) -> global refine (chessboard tiles)
    -> unpad [-> final downscale]

Every stage takes its initial noise from one NoiseScaffold over the (padded) canvas. Models are
passed in as `Components` (a pipeline's UNet, VAE, text encoders, plus a vision tower when a
vault or projector conditions the crops); nothing here loads weights by itself except
`load_components` (a checkpoint path or the tiny preset).
"""
from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image

from lsd_runtime.blend import resize_lanczos
from lsd_runtime.detailer import DetailSettings, crop_json, detail
from lsd_runtime.geometry import pad_to_multiple, unpad
from lsd_runtime.refiner import RefineTileSettings, refine_tiles
from lsd_runtime.denoiser import DiffusersDenoiser
from lsd_runtime.sampler import DenoiseItem, Sampler, SamplerError, SamplerSettings, auto_batch_size, time_ids
from lsd_runtime.scaffold import NoiseScaffold
from luna.settings import resolve_device

FORMAT_VERSION = 2  # 2: record.settings shaped as conf/refine.yaml (detail, refine, draft)
TILE_CONDITIONING = ("text", "same")  # refine.conditioning: the prompt's row, or the crops' source per tile


class ImageReadError(ValueError):
    """An input image that cannot be read (names the file)."""


@dataclass
class Components:
    """The models the runtime needs, passed in (never globals)."""

    pipe: object  # a StableDiffusionXLPipeline: unet, vae, tokenizers, text encoders, scheduler
    sampler: Sampler
    encoders: object  # luna.models.sdxl.TextEncoders
    vision: object | None = None  # luna.models.vision.VisionTower (vault / projector / IP-Adapter)
    name: str = ""
    checkpoint: dict | None = None  # the inventory's facts of a loaded file: prediction, distillation, evidence

    @functools.cached_property
    def te_fingerprint(self) -> str:
        """The loaded text encoders' fingerprint (equal to their file's; luna.models.fingerprint)."""
        from luna.models.fingerprint import te_fingerprint_of_encoders

        return te_fingerprint_of_encoders(self.encoders.text_encoder, self.encoders.text_encoder_2)

    @classmethod
    def from_pipeline(cls, pipe, vision=None, name: str = "", **sampler_kw) -> "Components":
        from luna.models.sdxl import TextEncoders

        return cls(pipe, Sampler.from_pipeline(pipe, **sampler_kw), TextEncoders.from_pipeline(pipe), vision, name)


def pick_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[str, torch.dtype]:
    """cuda with bf16 (fp16 where bf16 is missing) when there is a GPU; cpu with fp32 otherwise."""
    device = resolve_device(device)
    if dtype == "auto":
        if str(device).startswith("cuda"):
            return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return device, torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"dtype={dtype!r}: choose auto, float32, float16 or bfloat16")
    return device, table[dtype]


@functools.lru_cache(maxsize=2)
def tiny_components(vision: bool = True) -> Components:
    """The tiny preset (deterministic weights, CPU, fp32), built once per process."""
    from luna.models.tiny import tiny_pipeline
    from luna.models.vision import load_vision

    pipe = tiny_pipeline(0, "base")
    return Components.from_pipeline(pipe, load_vision("tiny") if vision else None, name="tiny-base-0")


class CheckpointRefused(ValueError):
    """A checkpoint the runtime cannot sample correctly (the message names the file and why)."""


def checkpoint_facts(path) -> dict:
    """What the inventory (luna.models.inventory) says about one checkpoint: kind, family, prediction
    type, distillation, each with its evidence; CheckpointRefused with the inventory's reason when the
    runtime cannot sample it correctly (another kind, an unsupported prediction type, unreadable)."""
    from pathlib import Path

    from luna.models import inventory as inv

    path = Path(str(path)).expanduser()
    if not path.exists():
        raise CheckpointRefused(f"checkpoint {path}: no such file or folder")
    row = inv.row_from_facts(path, inv.cached_facts(path, inv.FactsCache()), inv.Families.load())
    if not row.used:
        raise CheckpointRefused(f"checkpoint {path}: {row.reason or row.kind}")
    facts = {k: getattr(row, k) for k in ("kind", "family", "family_evidence", "prediction", "prediction_evidence",
                                           "distillation", "distillation_evidence", "te_fingerprint")}
    if row.distillation == "few-step":  # sampled as asked, but the steps/cfg are the user's to fit (recorded)
        facts["warning"] = (f"few-step distilled ({row.distillation_evidence}): use its own steps/cfg "
                            "(e.g. detail.steps=6 detail.cfg=1.5), 20 steps at cfg 5 burn its images")
    return facts


def load_components(checkpoint=None, preset: str | None = None, device: str = "auto", dtype: str = "auto",
                    vision_name: str | None = None, vision_weights=None) -> Components:
    """A checkpoint (single file or diffusers folder; SDXL only: NotSDXLError otherwise), or preset=tiny
    (in-memory deterministic weights; any other preset names its checkpoint file).

    A checkpoint's scheduler follows its prediction type as the inventory reads it (v-prediction,
    zero terminal SNR, EDM with its latent statistics: luna.models.sampling, as the factory's
    worker); a file the runtime cannot sample correctly is refused (CheckpointRefused)."""
    if preset == "tiny":
        comps = tiny_components(vision=False)
        if vision_name or vision_weights:
            from luna.models.vision import load_vision

            comps = Components(comps.pipe, comps.sampler, comps.encoders,
                               load_vision(vision_name or "tiny", vision_weights), comps.name)
        else:
            comps = tiny_components(vision=True)
        return comps
    if checkpoint is None and preset not in (None, "", "none"):
        raise ValueError(f"preset={preset!r} names no checkpoint (its conf/preset/{preset}.yaml sets `checkpoint:`)")
    if checkpoint is None:
        raise ValueError("give checkpoint=PATH (an SDXL .safetensors or diffusers folder) or preset=tiny")
    from luna.models.sampling import latent_statistics
    from luna.models.sdxl import load_sdxl

    facts = checkpoint_facts(checkpoint)
    mean, std = latent_statistics(checkpoint) if facts["prediction"] == "edm" else (None, None)
    dev, dt = pick_device_dtype(device, dtype)
    pipe = load_sdxl(checkpoint, device=dev, dtype=dt)
    vision = None
    if vision_name:
        from luna.models.vision import load_vision

        vision = load_vision(vision_name, vision_weights, device=dev)
    comps = Components.from_pipeline(pipe, vision, name=str(checkpoint), prediction=facts["prediction"],
                                     latents_mean=mean, latents_std=std)
    comps.checkpoint = facts
    return comps


# ---------------------------------------------------------------------- settings


@dataclass
class DraftSettings:
    """`draft.*`: from_draft=true builds the canvas from a 1K draft before detailing."""
    canvas: int = 4096  # longer side of the canvas the draft is upscaled to
    draft: int = 1024  # longer side of the draft
    smooth: int = 1536  # longer side of the smoothing pass
    draft_strength: float = 0.6  # img2img strength of the draft (1.0 when there is no input image)
    smooth_strength: float = 0.3
    steps: int = 20


@dataclass
class DetailStage(SamplerSettings, DetailSettings):
    """`detail.*`: where the crops go (DetailSettings) and how they are sampled (SamplerSettings)."""
    batch_size: Any = "auto"  # crops per batch; auto: by free GPU memory (4 on CPU)

    def check(self) -> None:
        DetailSettings.check(self)
        _check_sampler(self, "detail")


@dataclass
class RefineStage(SamplerSettings, RefineTileSettings):
    """`refine.*`: the global tiled pass: its tiles (RefineTileSettings) and sampler (SamplerSettings)."""
    strength: float = 0.2
    batch_size: Any = "auto"  # tiles per batch; auto: by free GPU memory (4 on CPU)
    enabled: bool = True
    conditioning: str = "text"  # TILE_CONDITIONING: text | same (the crops' source, per tile)

    def check(self) -> None:
        RefineTileSettings.check(self)
        _check_sampler(self, "refine")
        if self.conditioning not in TILE_CONDITIONING:
            raise ValueError(f"refine.conditioning={self.conditioning!r}: choose one of {TILE_CONDITIONING}")


def _check_sampler(stage: SamplerSettings, key: str) -> None:
    """SamplerSettings.check, its error naming the stage's key (refine.steps=0, not steps=0)."""
    try:
        SamplerSettings.check(stage)
    except SamplerError as e:
        raise SamplerError(f"{key}.{e}") from None


@dataclass
class RefineSettings:
    """Everything `refine` is told, shaped as conf/refine.yaml's keys (see `settings_from_config`)."""
    seed: int = 0
    detect_prompts: list = field(default_factory=lambda: ["face"])
    detail: DetailStage = field(default_factory=DetailStage)
    refine: RefineStage = field(default_factory=RefineStage)
    from_draft: bool = False
    draft: DraftSettings = field(default_factory=DraftSettings)
    final_size: Optional[int] = None  # longer side of the written image; None = the canvas


def settings_from_config(cfg, **values) -> RefineSettings:
    """RefineSettings from a composed refine config (conf/refine.yaml + preset + overrides): its keys
    that are RefineSettings fields, type-checked by OmegaConf against the dataclasses (a wrong type
    or unknown key is a ValueError naming it); `values` win (e.g. detect_prompts)."""
    from dataclasses import fields

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from luna.settings import plain

    names = {f.name for f in fields(RefineSettings)}
    node = {k: v for k, v in (plain(cfg) or {}).items() if k in names}
    node.update(values)
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RefineSettings), node))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ValueError(f"{key + ': ' if key else ''}{str(e).splitlines()[0]}") from e


def _resolve_batches(settings: RefineSettings, sampler: Sampler) -> RefineSettings:
    """batch_size=auto of the crops and the tiles, by the sampler's free memory."""
    def size(value, working: int, cfg: float) -> int:
        return auto_batch_size(sampler, working, cfg > 1.0) if value in (None, "auto") else int(value)

    detail = replace(settings.detail, batch_size=size(settings.detail.batch_size, settings.detail.working_size,
                                                       settings.detail.cfg))
    tiles = replace(settings.refine, batch_size=size(settings.refine.batch_size, settings.refine.tile,
                                                     settings.refine.cfg))
    return replace(settings, detail=detail, refine=tiles)


@dataclass
class RefineResult:
    image: Image.Image
    record: dict
    masks: dict = field(default_factory=dict)  # name -> HxW float32 canvas-frame mask
    overlays: dict = field(default_factory=dict)  # name -> PIL image
    scaffold: NoiseScaffold | None = None
    detections: list = field(default_factory=list)  # the detections used, in the frame of the image detected on
    # (before padding): record.write_outputs writes them as detections.json, which detect=file reads back


# ---------------------------------------------------------------------- helpers


def read_image(path) -> Image.Image:
    """An RGB PIL image from a file, or ImageReadError naming it."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError as exc:
        raise ImageReadError(f"{path}: no such image file") from exc
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"{path}: not a readable image ({exc})") from exc


def as_rgb(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        arr = image if image.dtype == np.uint8 else np.clip(np.rint(image), 0, 255).astype(np.uint8)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        return Image.fromarray(arr[..., :3]).convert("RGB")
    return read_image(image)


def _fit(size_wh, long_side: int) -> tuple[int, int]:
    w, h = size_wh
    s = long_side / max(w, h)
    return max(8, int(round(w * s / 8)) * 8), max(8, int(round(h * s / 8)) * 8)


def _whole_image_pass(components: Components, image: Image.Image, noise: torch.Tensor, row, negative,
                      settings: SamplerSettings, seed: int) -> Image.Image:
    """One img2img pass over a whole image (the draft and the smoothing pass)."""
    w, h = image.size
    item = DenoiseItem(image=np.asarray(image, dtype=np.float32), noise=noise, row=row, seed=seed,
                       time_ids=time_ids((h, w))[0])
    out = DiffusersDenoiser(components.sampler, settings, negative)([item])[0]
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def draft_canvas(components: Components, image: Image.Image | None, text, scaffold: NoiseScaffold,
                 settings: RefineSettings) -> tuple[Image.Image, dict]:
    """1K draft from the downscaled scaffold -> 1.5K smoothing -> Lanczos upscale to the canvas.

    `text` is the text source (rows(images) -> one row per image); the negative is its text's.
    """
    d = settings.draft
    cw, ch = scaffold.pixel_size
    negative = getattr(text, "text", text).negative_row
    timings = {}
    t = time.perf_counter()
    dw, dh = _fit((cw, ch), d.draft)
    strength = d.draft_strength
    if image is None:
        start, strength = Image.new("RGB", (dw, dh), (127, 127, 127)), 1.0
    else:
        start = resize_lanczos(image, (dw, dh))
    row = text.rows([start])[0]
    ss = SamplerSettings(steps=d.steps, strength=strength, cfg=settings.detail.cfg, sampler=settings.detail.sampler)
    draft = _whole_image_pass(components, start, scaffold.latent_for_size(dw, dh), row, negative, ss, settings.seed)
    timings["draft"] = time.perf_counter() - t
    t = time.perf_counter()
    sw, sh = _fit((cw, ch), d.smooth)
    ss = SamplerSettings(steps=d.steps, strength=d.smooth_strength, cfg=settings.detail.cfg,
                         sampler=settings.detail.sampler)
    smooth_in = resize_lanczos(draft, (sw, sh))
    smooth = _whole_image_pass(components, smooth_in, scaffold.latent_for_size(sw, sh), text.rows([smooth_in])[0],
                               negative, ss, settings.seed + 1)
    timings["smooth"] = time.perf_counter() - t
    return resize_lanczos(smooth, (cw, ch)), {"draft_size": [dw, dh], "smooth_size": [sw, sh], "timings": timings}


def _padded_detections(detections, orig_wh, padded_wh):
    """Boxes (and masks) of the unpadded image re-expressed on the padded canvas."""
    from lsd_runtime.detect import Detection

    (w, h), (pw, ph) = orig_wh, padded_wh
    if (w, h) == (pw, ph):
        return list(detections)
    sx, sy = w / pw, h / ph
    out = []
    for d in detections:
        mask = None
        if d.mask is not None:
            m = np.asarray(Image.fromarray(np.asarray(d.mask, np.float32)).resize((w, h), Image.BILINEAR))
            mask = np.zeros((ph, pw), np.float32)
            mask[:h, :w] = m
        x0, y0, x1, y1 = d.box
        out.append(Detection(box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy), mask=mask, label=d.label, score=d.score,
                             extra=dict(d.extra)))
    return out


# ---------------------------------------------------------------------- the API


def refine(image, prompt: str, *, components: Components, detector=None, detections=None, conditioning=None,
           settings: RefineSettings | None = None, negative: str | None = None, scaffold: NoiseScaffold | None = None,
           denoise: Callable | None = None, tile_denoise: Callable | None = None) -> RefineResult:
    """Refine `image` (PIL, array or path; None with settings.from_draft) and return the image and its record.

    detector: anything with `detect(PIL, prompts)`; detections: a ready list (wins over detector);
    conditioning: a source with `rows(crops)` (conditioning.TextSource/VaultSource/ProjectorSource);
    the text source is built from `prompt` when None. `denoise`/`tile_denoise` replace the sampler
    (tests inject an identity denoiser).
    """
    from lsd_runtime.conditioning import TextSource, WithImageEmbeds

    settings = _resolve_batches(settings or RefineSettings(), components.sampler)
    settings.detail.check()  # every setting is refused before any detection or denoising, not after the crops
    if settings.refine.enabled:
        settings.refine.check()
    if denoise is None:  # a checkpoint that cannot be sampled with a stage's sampler is refused before any work
        components.sampler.scheduler_plan(settings.detail.sampler)
    if settings.refine.enabled and tile_denoise is None and denoise is None:
        components.sampler.scheduler_plan(settings.refine.sampler)
    t_all = time.perf_counter()
    timings: dict = {}
    force = components.sampler.force_zeros_for_empty_prompt
    text = conditioning if isinstance(conditioning, TextSource) else getattr(conditioning, "text", None)
    text = text or TextSource(components.encoders, prompt, negative, force_zeros_for_empty_prompt=force)
    source = conditioning or text
    plain = text  # the text rows of the draft and the global pass
    if components.sampler.has_ip_adapter and denoise is None:
        embedder = getattr(source, "embedder", None)
        if embedder is None:
            raise ValueError("an IP-Adapter is loaded: give conditioning=WithImageEmbeds(source, CropEmbedder(tower)) "
                             "so every crop and tile has its own image embedding")
        plain = WithImageEmbeds(text, embedder)
        source = source if isinstance(source, WithImageEmbeds) else WithImageEmbeds(source, embedder)
    record: dict = {"format_version": FORMAT_VERSION, "prompt": prompt, "negative": negative, "seed": settings.seed,
                    "checkpoint": components.name, "settings": _settings_json(settings)}
    if components.checkpoint:  # prediction type (the scheduler it got), family, distillation, with evidence
        record["checkpoint_facts"] = dict(components.checkpoint)

    draft_info = None
    if settings.from_draft:
        src = None if image is None else as_rgb(image)
        cw, ch = _fit(src.size if src is not None else (1, 1), settings.draft.canvas)
        scaffold = scaffold or NoiseScaffold(settings.seed, (cw, ch))
        if tuple(scaffold.pixel_size) != (cw, ch):
            raise ValueError(f"scaffold covers {scaffold.pixel_size}, the draft canvas is {(cw, ch)}")
        rgb, draft_info = draft_canvas(components, src, plain, scaffold, settings)
        timings.update(draft_info.pop("timings"))
        record["draft"] = draft_info
    else:
        if image is None:
            raise ValueError("refine needs an image (or from_draft=true)")
        rgb = as_rgb(image)
    orig_wh = rgb.size
    canvas_img, _ = pad_to_multiple(rgb, 8)
    canvas = np.asarray(canvas_img).copy()
    before = canvas_img
    ph, pw = canvas.shape[:2]
    scaffold = scaffold or NoiseScaffold(settings.seed, (pw, ph))
    if tuple(scaffold.pixel_size) != (pw, ph):
        raise ValueError(f"scaffold covers {scaffold.pixel_size[0]}x{scaffold.pixel_size[1]} px, "
                         f"the padded canvas is {pw}x{ph}")
    record.update({"image_size": list(orig_wh), "canvas_size": [pw, ph], "padded": [pw - orig_wh[0], ph - orig_wh[1]],
                   "scaffold": {"seed": scaffold.seed, "pixel_size": list(scaffold.pixel_size),
                                "latent": list(scaffold.noise.shape)}})

    t = time.perf_counter()
    if detections is None:
        detections = detector.detect(rgb, list(settings.detect_prompts)) if detector is not None else []
    used = list(detections)  # normalised to `rgb`: what detections.json holds (FileDetector on this image)
    detections = _padded_detections(detections, orig_wh, (pw, ph))
    timings["detect"] = time.perf_counter() - t
    record["detections"] = [d.to_json() for d in detections]

    injected = denoise
    denoise = denoise or DiffusersDenoiser(components.sampler, settings.detail, text.negative_row)
    t = time.perf_counter()
    canvas, crops, skipped = detail(canvas, detections, scaffold, source, denoise, settings.detail, settings.seed)
    timings["detail"] = time.perf_counter() - t
    record["crops"] = [crop_json(c) for c in crops]
    record["skipped"] = skipped
    record["conditioning"] = {"source": getattr(source, "name", "text"),
                              "vision_model": getattr(getattr(source, "embedder", None), "model_id", None)}

    masks = {}
    for c in crops:
        full = np.zeros((ph, pw), np.float32)
        x0, y0, x1, y1 = c.box
        full[y0:y1, x0:x1] = c.mask
        masks[f"crop_{c.index:03d}"] = full[:orig_wh[1], :orig_wh[0]]

    tiles = []
    if settings.refine.enabled:
        t = time.perf_counter()
        tile_source = source if settings.refine.conditioning == "same" else plain
        tile_denoise = tile_denoise or injected or DiffusersDenoiser(components.sampler, settings.refine,
                                                                     text.negative_row)
        canvas, tiles = refine_tiles(canvas, scaffold, tile_source, tile_denoise, settings.refine, settings.seed)
        timings["global_refine"] = time.perf_counter() - t
    record["tiles"] = tiles

    out = unpad(Image.fromarray(canvas), orig_wh)
    if settings.final_size and max(out.size) != int(settings.final_size):
        out = resize_lanczos(out, _fit(out.size, int(settings.final_size)))
    record["output_size"] = list(out.size)
    timings["total"] = time.perf_counter() - t_all
    record["timings"] = {k: round(v, 4) for k, v in timings.items()}
    from lsd_runtime.record import detection_overlay, tile_overlay

    overlays = {"detections": detection_overlay(unpad(before, orig_wh), record),
                "tiles": tile_overlay(unpad(before, orig_wh), record)}
    return RefineResult(out, record, masks, overlays, scaffold, used)


def _settings_json(s: RefineSettings) -> dict:
    return asdict(s)
