"""What every file in a model folder is, and whether the project can use it (and why not).

One row per single file or diffusers folder: kind (from tensor names and shapes), family,
prediction type and distillation (each with the evidence it came from), the text-encoder
fingerprint, and a status (used, or skipped with the reason). The factory's inventory and
extraction both use it; `luna inventory dirs=[...]` prints it.

Evidence order for family and prediction (first that speaks wins, `unknown` if none does):
  1. the safetensors `__metadata__` (`modelspec.*`: title, architecture, prediction_type; kohya
     training keys such as `ss_v_parameterization`, `ss_zero_terminal_snr`, `ss_sd_model_name`),
  2. marker keys in the state dict (`v_pred`, `ztsnr`, `edm_mean`/`edm_std`, `edm_vpred.*`),
  3. the text-encoder fingerprint looked up in `families.yaml` (family only),
  4. the file's own name (never a folder above it).
A base-architecture SDXL checkpoint without any prediction evidence is epsilon (SDXL's own).

Facts read from a file are cached (path, size, mtime), so a rescan reads no weights.

Each usable row carries `model_id`: prediction type, text-encoder fingerprint and the UNet/VAE
probe (luna.models.fingerprint.model_probe), the same for a single file and a diffusers folder of
one model. The factory joins the nodes' scans by it (factory/inventory.py merge).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import yaml

from luna import CONF_DIR

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CACHE_VERSION = 2  # 2: distilled SDXL files (SSD-1B, Vega) are no longer "full"
DEFAULT_FAMILIES = CONF_DIR / "families.yaml"

KINDS = {
    "sdxl": "SDXL base architecture",
    "sdxl-refiner": "SDXL refiner",
    "sdxl-inpainting": "SDXL inpainting",
    "sd1": "SD 1.x",
    "sd2": "SD 2.x",
    "sd3": "SD 3",
    "flux": "Flux",
    "lora": "LoRA",
    "vae": "VAE only",
    "text-encoders": "text encoders only",
    "unreadable": "unreadable",
    "pickle": "pickle",
    "other": "not a checkpoint this project knows",
}
PREDICTIONS = ("epsilon", "v", "v+ztsnr", "edm")  # what the samplers support; "v-edm" is recognised, not supported
MARKERS = ("v_pred", "ztsnr", "edm_mean", "edm_std", "edm_vpred.sigma_max", "edm_vpred.sigma_min")
# words that mark few-step distilled checkpoints, in metadata or the file name
FEW_STEP_WORDS = ("lightning", "turbo", "lcm", "dmd2", "dmd", "hyper sd", "hyper sdxl", "hyper xl", "hypersd", "pcm")
_STEPS_RE = re.compile(r"\b(\d{1,2}) ?steps?\b")
_TOKEN_RE = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")
_FAMILY_META_KEYS = ("modelspec.title", "modelspec.architecture", "ss_sd_model_name", "ss_output_name")
_DISTILL_META_KEYS = ("modelspec.title", "modelspec.description", "modelspec.usage_hint", "modelspec.tags",
                      "ss_output_name", "ss_training_comment")


class InventoryError(ValueError):
    """No usable checkpoint, a folder setting that names nothing, or an unreadable families file (says which)."""


# --------------------------------------------------------------------------- words


def words(text: str) -> str:
    """' pony diffusion v 6 xl ' from 'ponyDiffusionV6XL': camelCase, digits and separators split, lower case,
    padded with spaces so that ' word ' matches whole words only."""
    return " " + " ".join(t.lower() for t in _TOKEN_RE.findall(text)) + " "


def _has(text_words: str, phrase: str) -> bool:
    return f" {' '.join(words(phrase).split())} " in text_words


# --------------------------------------------------------------------------- families.yaml


@dataclass
class Families:
    """families.yaml: text-encoder fingerprint -> family, and the words that name each family."""

    fingerprints: dict[str, str] = field(default_factory=dict)
    names: dict[str, list[str]] = field(default_factory=dict)
    source: str = ""

    @classmethod
    def load(cls, path=None) -> "Families":
        path = Path(path).expanduser() if path else DEFAULT_FAMILIES
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except OSError as e:
            raise InventoryError(f"families file {path}: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise InventoryError(f"families file {path} is not valid YAML: {e}") from None
        fps, names = raw.get("fingerprints") or {}, raw.get("names") or {}
        if not isinstance(fps, Mapping) or not isinstance(names, Mapping):
            raise InventoryError(f"families file {path}: `fingerprints` and `names` must be mappings")
        for fam, ws in names.items():
            if not isinstance(ws, list) or not all(isinstance(w, str) and w.strip() for w in ws):
                raise InventoryError(f"families file {path}: names.{fam} must be a list of words")
        return cls({str(k): str(v) for k, v in fps.items()}, {str(k): list(v) for k, v in names.items()}, str(path))

    def named_in(self, text: str) -> str | None:
        """The family whose words occur in `text` (longest match first), or None."""
        w = words(text)
        hits = sorted(((len(p), fam) for fam, ps in self.names.items() for p in ps if _has(w, p)), reverse=True)
        return hits[0][1] if hits else None

    def fingerprints_of(self, family: str) -> list[str]:
        return sorted(fp for fp, fam in self.fingerprints.items() if fam == family)


# --------------------------------------------------------------------------- reading one file


def read_header(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """({tensor: {dtype, shape, data_offsets}}, __metadata__) of a safetensors file; a truncated file is an error."""
    from luna.models.sdxl import read_safetensors_header

    header = read_safetensors_header(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n)).get("__metadata__") or {}
    end = max((int(v.get("data_offsets", [0, 0])[1]) for v in header.values()), default=0)
    have = path.stat().st_size - 8 - n
    if end > have:
        raise ValueError(f"truncated: the header lists {end} bytes of tensor data, the file holds {have}")
    return header, {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def _is_lora(keys: list[str], meta: dict) -> bool:
    return (any(("lora_down" in k or "lora_up" in k or ".lora_A." in k or ".lora_B." in k or k.startswith("lora_")) for k in keys)
            or "ss_network_module" in meta or meta.get("modelspec.architecture", "").endswith("/lora"))


def classify_tensors(shapes: dict[str, tuple[int, ...]], meta: Mapping[str, str] | None = None) -> tuple[str, str | None, str]:
    """(kind, size, reason) of a single file from its tensor names and shapes (and metadata for LoRAs)."""
    from luna.models.sdxl import classify_shapes

    meta = meta or {}
    keys = list(shapes)
    arch = meta.get("modelspec.architecture", "")
    if _is_lora(keys, meta):
        return "lora", None, "LoRA weights (lora_up/lora_down or ss_network_module), not a whole checkpoint"
    body = [k.removeprefix("model.diffusion_model.") for k in keys]
    if any(k.startswith("double_blocks.") for k in body) or arch.startswith("flux"):
        return "flux", None, "Flux transformer (double_blocks/single_blocks), not SDXL"
    if any(k.startswith("joint_blocks.") for k in body) or arch.startswith("stable-diffusion-3"):
        return "sd3", None, "SD 3 MMDiT (joint_blocks), not SDXL"
    unet = "model.diffusion_model.input_blocks.0.0.weight"
    if unet not in shapes:
        if any(k.startswith(("conditioner.", "cond_stage_model.", "text_model.", "te1.", "te2.", "clip_l.", "clip_g."))
               for k in keys):
            return "text-encoders", None, "text encoders only, no UNet (model.diffusion_model.*)"
        vae = [k.removeprefix("first_stage_model.") for k in keys]
        if "encoder.conv_in.weight" in vae and "decoder.conv_out.weight" in vae:
            return "vae", None, "VAE only (encoder/decoder), no UNet"
        if any(k.startswith(("down_blocks.", "up_blocks.", "mid_block.")) for k in keys):
            return "other", None, "a diffusers-layout component file, not a whole single-file checkpoint"
        return "other", None, "no Stable Diffusion UNet (model.diffusion_model.input_blocks.0.0.weight)"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1", None, "SD 1.x checkpoint (one CLIP-L text encoder), not SDXL"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2", None, "SD 2.x checkpoint (OpenCLIP-H text encoder), not SDXL"
    if "conditioner.embedders.0.model.text_projection" in shapes or (
            any(k.startswith("conditioner.embedders.0.model.") for k in keys)
            and not any(k.startswith("conditioner.embedders.1.") for k in keys)):
        return "sdxl-refiner", None, "SDXL refiner (bigG text encoder only); the factory renders with base models"
    channels = shapes[unet][1] if len(shapes[unet]) > 1 else 0
    if channels == 9:
        return "sdxl-inpainting", None, "SDXL inpainting UNet (9 input channels: latents, mask, masked image)"
    family, size, reason = classify_shapes(shapes)
    if family == "sdxl":
        return "sdxl", size, reason
    return "other", None, reason


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def classify_folder(path: Path) -> tuple[str, str | None, str]:
    """(kind, size, reason) of a diffusers pipeline folder from model_index.json and component configs."""
    from luna.models.sdxl import detect_architecture

    cls = _read_json(path / "model_index.json").get("_class_name", "")
    unet = _read_json(path / "unet" / "config.json")
    if cls.startswith("StableDiffusionXL"):
        if not (path / "text_encoder").is_dir() and (path / "text_encoder_2").is_dir():
            return "sdxl-refiner", None, "SDXL refiner folder (text_encoder_2 only); the factory renders with base models"
        if unet.get("in_channels", 4) == 9:
            return "sdxl-inpainting", None, "SDXL inpainting UNet (9 input channels)"
        info = detect_architecture(path)
        return ("sdxl" if info.family == "sdxl" else "other"), info.size, info.reason
    if cls == "StableDiffusionPipeline":
        te = _read_json(path / "text_encoder" / "config.json")
        if te.get("hidden_size", 768) == 768:
            return "sd1", None, "diffusers SD 1.x pipeline, not SDXL"
        return "sd2", None, "diffusers SD 2.x pipeline, not SDXL"
    if cls.startswith("StableDiffusion3"):
        return "sd3", None, f"diffusers {cls}, not SDXL"
    if cls.startswith("Flux"):
        return "flux", None, f"diffusers {cls}, not SDXL"
    return "other", None, f"diffusers pipeline {cls or '(no _class_name)'!r}, not an SDXL pipeline"


def _truthy(v: str | None) -> bool:
    return str(v).strip().lower() in ("true", "1", "yes")


def prediction_evidence(meta: Mapping[str, str], keys: Iterable[str], name: str,
                        scheduler: Mapping | None = None) -> tuple[str, str]:
    """(prediction type, evidence): metadata, then marker keys (or a folder's scheduler config), then the file name."""
    keys = set(keys)
    ztsnr_meta = _truthy(meta.get("ss_zero_terminal_snr")) or _truthy(meta.get("modelspec.zero_terminal_snr"))
    pt = meta.get("modelspec.prediction_type", "").strip().lower().replace("-", "_")
    if pt in ("v", "v_prediction", "vpred", "v_pred"):
        z = ztsnr_meta or "ztsnr" in keys
        return ("v+ztsnr" if z else "v"), f"metadata modelspec.prediction_type={meta['modelspec.prediction_type']!r}" + (
            " + zero terminal SNR" if z else "")
    if pt in ("epsilon", "eps"):
        return "epsilon", f"metadata modelspec.prediction_type={meta['modelspec.prediction_type']!r}"
    if pt == "edm":
        return "edm", "metadata modelspec.prediction_type='edm'"
    if _truthy(meta.get("ss_v_parameterization")):
        z = ztsnr_meta or "ztsnr" in keys
        return ("v+ztsnr" if z else "v"), "training metadata ss_v_parameterization=True" + (" + zero terminal SNR" if z else "")
    if "edm_mean" in keys and "edm_std" in keys:
        return "edm", "marker keys edm_mean/edm_std (Playground v2.5 latent statistics)"
    if "edm_vpred.sigma_max" in keys:
        return "v-edm", "marker key edm_vpred.sigma_max (EDM v-prediction, CosXL style)"
    if "v_pred" in keys:
        return ("v+ztsnr", "marker keys v_pred + ztsnr") if "ztsnr" in keys else ("v", "marker key v_pred")
    if scheduler:
        cls = str(scheduler.get("_class_name", ""))
        if cls.startswith("EDM"):
            return ("v-edm" if scheduler.get("prediction_type") == "v_prediction" else "edm"), f"scheduler config {cls}"
        if scheduler.get("prediction_type") == "v_prediction":
            z = bool(scheduler.get("rescale_betas_zero_snr"))
            return ("v+ztsnr" if z else "v"), "scheduler config prediction_type=v_prediction" + (
                ", rescale_betas_zero_snr" if z else "")
    w = words(name)
    if any(_has(w, p) for p in ("vpred", "v pred", "v prediction", "v param")):
        z = any(_has(w, p) for p in ("ztsnr", "zsnr", "zero snr"))
        return ("v+ztsnr" if z else "v"), f"file name {name!r}"
    return "epsilon", "no v/EDM metadata, marker or name: SDXL's own epsilon"


def distillation_evidence(meta: Mapping[str, str], name: str) -> tuple[str, str]:
    """('few-step' | 'none', evidence) from metadata text, then the file name."""
    for key in _DISTILL_META_KEYS:
        if key in meta:
            hit = _few_step_hit(meta[key])
            if hit:
                return "few-step", f"metadata {key} mentions {hit!r}"
    hit = _few_step_hit(name)
    if hit:
        return "few-step", f"file name {name!r} ({hit!r})"
    return "none", ""


def _few_step_hit(text: str) -> str | None:
    w = words(text)
    for p in FEW_STEP_WORDS:
        if _has(w, p):
            return p
    m = _STEPS_RE.search(w)
    if m and int(m.group(1)) <= 12:
        return m.group(0).strip()
    return None


def family_evidence(meta: Mapping[str, str], keys: Iterable[str], te_fp: str | None, name: str,
                    families: Families) -> tuple[str, str]:
    """(family, evidence): metadata, marker keys, families.yaml by fingerprint, the file name; else 'unknown'."""
    for key in _FAMILY_META_KEYS:
        fam = families.named_in(meta.get(key, ""))
        if fam:
            return fam, f"metadata {key}={meta[key]!r}"
    keys = set(keys)
    if "edm_mean" in keys and "playground" in families.names:
        return "playground", "marker keys edm_mean/edm_std (Playground v2.5)"
    if te_fp and te_fp in families.fingerprints:
        return families.fingerprints[te_fp], f"text-encoder fingerprint {te_fp} in {Path(families.source).name}"
    fam = families.named_in(name)
    if fam:
        return fam, f"file name {name!r}"
    return "unknown", ""


# --------------------------------------------------------------------------- facts of one path (cached)


def _stamp(path: Path) -> list[int]:
    """[size, mtime_ns] of a file; for a folder, summed sizes and the newest mtime of the files in it."""
    if path.is_file():
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    size, mtime = 0, path.stat().st_mtime_ns
    for dirpath, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            size, mtime = size + st.st_size, max(mtime, st.st_mtime_ns)
    return [size, mtime]


def read_facts(path: Path) -> dict:
    """Everything the inventory needs from one file or folder, as plain data (what the cache stores)."""
    from luna.models.fingerprint import file_fingerprint, te_fingerprint

    path = Path(path)
    facts: dict = {"format": "unknown", "kind": "unreadable", "size": None, "reason": "", "meta": {}, "markers": [],
                   "scheduler": None, "te_fingerprint": None, "fingerprint": None, "probe": None}
    if path.is_dir():
        facts["format"] = "diffusers"
        facts["kind"], facts["size"], facts["reason"] = classify_folder(path)
        facts["scheduler"] = _read_json(path / "scheduler" / "scheduler_config.json") or None
        vae = _read_json(path / "vae" / "config.json")
        if vae.get("latents_mean") and vae.get("latents_std"):
            facts["markers"] = ["edm_mean", "edm_std"]
    elif path.suffix.lower() in PICKLE_SUFFIXES:
        facts.update(format="pickle", kind="pickle",
                     reason="pickle checkpoint (.ckpt/.pt/.bin): unpickling can run code; convert it to .safetensors")
        return facts
    else:
        facts["format"] = "single_file"
        try:
            header, meta = read_header(path)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            facts["reason"] = f"not a readable safetensors file ({e})"
            return facts
        facts["meta"] = meta
        facts["markers"] = [k for k in MARKERS if k in header]
        facts["kind"], facts["size"], facts["reason"] = classify_tensors(
            {k: tuple(v["shape"]) for k, v in header.items()}, meta)
    try:
        facts["fingerprint"] = file_fingerprint(path)
        if facts["kind"] == "sdxl" and facts["size"]:
            facts["te_fingerprint"] = te_fingerprint(path)
    except Exception as e:  # noqa: BLE001 - a damaged tensor must not stop the scan
        facts.update(kind="unreadable", reason=f"unreadable tensors ({type(e).__name__}: {e})")
        return facts
    facts["probe"] = _probe(path) if facts.get("te_fingerprint") else None
    return facts


def _probe(path) -> str | None:
    """The UNet/VAE probe of `model_id`; None when it cannot be read (e.g. a folder holding only the text
    encoders and configs, enough for extraction): the row stays usable and the factory joins nodes by
    its file fingerprint instead."""
    from luna.models.fingerprint import model_probe

    try:
        return model_probe(path)
    except Exception:  # noqa: BLE001 - the probe only joins nodes; it never decides whether a file is usable
        return None


class FactsCache:
    """Facts per path, valid while the path's size and mtime are unchanged (a JSON file, written atomically)."""

    def __init__(self, path=None):
        self.path = Path(path).expanduser() if path else default_cache_path()
        self.entries: dict[str, dict] = {}
        self.dirty = False
        try:
            raw = json.loads(self.path.read_text())
            if raw.get("version") == CACHE_VERSION:
                self.entries = raw.get("entries", {})
        except (OSError, ValueError, AttributeError):
            pass  # no cache yet, or an unreadable one: start afresh

    def get(self, path: Path, stamp: list[int]) -> dict | None:
        e = self.entries.get(str(path))
        return e["facts"] if e and e.get("stamp") == stamp else None

    def put(self, path: Path, stamp: list[int], facts: dict) -> None:
        self.entries[str(path)] = {"stamp": stamp, "facts": facts}
        self.dirty = True

    def save(self) -> None:
        if self.dirty:
            from luna.files import write_json_atomic

            try:
                write_json_atomic(self.path, {"version": CACHE_VERSION, "entries": self.entries})
            except OSError:
                pass  # a read-only cache folder costs a rescan next time, nothing else
            self.dirty = False


def default_cache_path() -> Path:
    root = os.environ.get("LUNA_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "luna")
    return Path(root).expanduser() / "inventory.json"


def cached_facts(path: Path, cache: FactsCache | None) -> dict:
    try:
        stamp = _stamp(path)
    except OSError as e:
        return {"format": "unknown", "kind": "unreadable", "size": None, "reason": f"cannot stat ({e})", "meta": {},
                "markers": [], "scheduler": None, "te_fingerprint": None, "fingerprint": None, "probe": None}
    facts = cache.get(path, stamp) if cache else None
    if facts is None:
        facts = read_facts(path)
        if cache:
            cache.put(path, stamp, facts)
    elif "probe" not in facts:  # cached before the probe existed: read only the probe, not the rest again
        facts = dict(facts, probe=_probe(path) if facts["kind"] == "sdxl" and facts["te_fingerprint"] else None)
        cache.put(path, stamp, facts)
    return facts


# --------------------------------------------------------------------------- rows


@dataclass
class Row:
    """One file or folder of the inventory."""

    path: str
    name: str
    format: str  # single_file | diffusers | pickle | unknown
    kind: str  # a key of KINDS
    size: str | None  # full | tiny | custom (SDXL base only)
    family: str
    family_evidence: str
    prediction: str  # epsilon | v | v+ztsnr | edm | v-edm (not supported)
    prediction_evidence: str
    distillation: str  # none | few-step
    distillation_evidence: str
    te_fingerprint: str | None
    fingerprint: str | None
    status: str  # used | skipped
    reason: str
    duplicate_of: str | None = None
    model_id: str | None = None  # prediction/te_fingerprint/probe: one model in any format (used rows only)

    @property
    def used(self) -> bool:
        return self.status == "used"

    def to_dict(self) -> dict:
        return asdict(self)


def row_from_facts(path: Path, facts: dict, families: Families) -> Row:
    name = path.stem if facts["format"] != "diffusers" else path.name
    keys = facts["markers"]
    pred, pred_ev = prediction_evidence(facts["meta"], keys, name, facts.get("scheduler"))
    dist, dist_ev = distillation_evidence(facts["meta"], name)
    fam, fam_ev = family_evidence(facts["meta"], keys, facts["te_fingerprint"], name, families)
    kind, reason = facts["kind"], facts["reason"]
    status = "skipped"
    if kind == "sdxl" and facts["size"] is None:
        reason = f"SDXL base architecture but {reason}"
    elif kind == "sdxl" and not facts["te_fingerprint"]:
        reason = "SDXL base architecture without readable text encoders"
    elif kind == "sdxl" and pred not in PREDICTIONS:
        reason = f"prediction type {pred} ({pred_ev}): no sampler here supports it"
    elif kind == "sdxl":
        status = "used"
        reason = ("few-step distilled: the campaign needs sampler_overrides (steps/cfg) for it" if dist == "few-step"
                  else "")
    elif kind not in ("unreadable", "pickle"):
        reason = f"{KINDS[kind]}: {reason}"
    if kind not in ("sdxl", "sdxl-inpainting", "sdxl-refiner"):
        pred, pred_ev = "n/a", ""
    model_id = (f"{pred}/{facts['te_fingerprint']}/{facts['probe']}" if status == "used" and facts.get("probe")
                else None)
    return Row(str(path), name, facts["format"], kind, facts["size"], fam, fam_ev, pred, pred_ev, dist, dist_ev,
               facts["te_fingerprint"], facts["fingerprint"], status, reason, model_id=model_id)


# --------------------------------------------------------------------------- folders


def find_candidates(root: Path) -> list[Path]:
    """Single files (.safetensors and pickles) and diffusers folders (model_index.json) under root."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        d = Path(dirpath)
        if "model_index.json" in filenames:
            found.append(d)
            dirnames[:] = []  # its component files are not checkpoints of their own
            continue
        # hidden and temporary folders are half-written copies (tiny.write_* uses `name.tmp`)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and not n.endswith(".tmp"))
        for f in sorted(filenames):
            low = f.lower()
            if not f.startswith(".") and (low.endswith(".safetensors") or low.endswith(PICKLE_SUFFIXES)):
                found.append(d / f)
    return found


def _mark_duplicates(rows: list[Row]) -> None:
    """Same model twice (a copy, or a single file and a diffusers folder): keep one, skip the others.

    Candidates share a text-encoder fingerprint and prediction type (marker keys change how a model
    is sampled, so the same weights with other markers are another checkpoint); a cheap probe (UNet and VAE 1-D tensors) then the
    digests of every UNet and VAE tensor decide. The single file is kept (sorted path among equals)."""
    from luna.models.fingerprint import component_digests

    groups: dict[str, list[Row]] = {}
    for r in rows:
        if r.used:
            groups.setdefault(f"{r.te_fingerprint}/{r.prediction}", []).append(r)
    for group in groups.values():
        if len(group) < 2:
            continue
        group.sort(key=lambda r: (r.format != "single_file", r.path))
        ident: dict[int, tuple] = {}

        def key(r: Row, full: bool):
            return tuple(component_digests(r.path, c, small_only=not full)[0] for c in ("unet", "vae"))

        for i, r in enumerate(group):
            for keeper in group[:i]:
                if keeper.duplicate_of:
                    continue
                same = os.path.realpath(r.path) == os.path.realpath(keeper.path)  # a symlink to it
                if not same:
                    try:
                        ident.setdefault((id(keeper), 0), key(keeper, False))
                        ident.setdefault((id(r), 0), key(r, False))
                        if ident[(id(keeper), 0)] == ident[(id(r), 0)]:
                            ident.setdefault((id(keeper), 1), key(keeper, True))
                            ident.setdefault((id(r), 1), key(r, True))
                            same = ident[(id(keeper), 1)] == ident[(id(r), 1)]
                    except Exception:  # noqa: BLE001 - unreadable components: not provably the same
                        same = False
                if same:
                    r.status, r.duplicate_of = "skipped", keeper.path
                    r.reason = f"same model as {keeper.path} (every UNet, VAE and text-encoder tensor identical)"
                    break


def scan(dirs: Iterable, families: Families | None = None, cache: FactsCache | None = None,
         progress: bool = False, dedupe: bool = True) -> list[Row]:
    """One row per candidate under `dirs` (a missing folder is an InventoryError), sorted by path."""
    families = families or Families.load()
    paths: list[Path] = []
    for d in dirs:
        root = Path(str(d)).expanduser()
        if not root.is_dir():
            raise InventoryError(f"checkpoint folder {root} does not exist (or is not a folder)")
        paths += find_candidates(root)
    paths = sorted(dict.fromkeys(paths))
    bar = None
    if progress and paths:
        import sys

        from tqdm import tqdm

        bar = tqdm(total=len(paths), unit="file", desc="inventory", dynamic_ncols=True, file=sys.stderr)
    rows = []
    try:
        for p in paths:
            rows.append(row_from_facts(p, cached_facts(p, cache), families))
            if bar:
                bar.set_postfix_str(p.name[-32:], refresh=False)
                bar.update()
    finally:
        if bar:
            bar.close()
        if cache:
            cache.save()
    if dedupe:
        _mark_duplicates(rows)
    return rows


def format_table(rows: list[Row]) -> str:
    """The terminal table: used rows first, then skipped ones with their reasons."""
    used = [r for r in rows if r.used]
    lines = [f"{len(used)} usable SDXL checkpoint(s), {len(rows) - len(used)} skipped, of {len(rows)} scanned",
             f"  {'name':<34} {'kind':<16} {'family':<12} {'prediction':<10} {'distilled':<9} {'te fingerprint':<24}"]
    for r in used:
        lines.append(f"  {r.name[:34]:<34} {r.kind:<16} {r.family:<12} {r.prediction:<10} {r.distillation:<9} "
                     f"{r.te_fingerprint or '-':<24}")
        for what, ev in (("family", r.family_evidence), ("prediction", r.prediction_evidence),
                         ("distilled", r.distillation_evidence)):
            if ev:
                lines.append(f"      {what}: {ev}")
        if r.reason:
            lines.append(f"      note: {r.reason}")
    skipped = [r for r in rows if not r.used]
    if skipped:
        lines.append("skipped:")
        lines += [f"  {r.path}\n      {r.kind}: {r.reason}" for r in skipped]
    return "\n".join(lines)
