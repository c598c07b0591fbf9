"""`luna demo out=DIR [models.preset=toy|tiny]`: the whole loop, then DIR/report.html.

    models   two SDXL checkpoints of two text-encoder families       DIR/models/single/*.safetensors
             (toy: the committed toy weights; tiny: random weights)
    factory  the toy (tiny: demo) campaign across them on local Ray   DIR/factory/shards/*.tar
    extract  image embeddings + SDXL conditionings                    DIR/pairs/pairs-*.h5
    vault    FAISS vault, contact sheets for a few crops              DIR/vault/, DIR/demo/retrieval/
    train    a projector, briefly (W&B offline run + Lightning CSV)   DIR/projector/
    refine   toy: held-out crops degraded on purpose, refined with    DIR/refine/
             text-only, vault and projector conditioning, oracle verdicts
             tiny: skimage's astronaut photo, face detailed (vault, projector)
    quality  toy: the oracle's measures of every stage (demo/toy_quality.py)
    report   DIR/report.html (self-contained) + DIR/report/*.png

Each stage calls the Python entry point behind its subcommand with the config `luna SUB` would
compose (`luna.cli.compose`: conf/<sub>.yaml, group choices such as `preset=tiny`, the demo's
values merged on top as data). A finished stage leaves
DIR/demo/<stage>.json (its settings' hash, wall time and results); a rerun skips stages whose
record matches and the stages themselves resume interrupted work. `fresh=true` wipes DIR first.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
import shutil
import sys
import time
from pathlib import Path

from luna.files import atomic_path, write_json_atomic

STAGES = ("models", "factory", "extract", "vault", "train", "refine", "quality", "ab", "report")
PRESETS = ("toy", "tiny")
RECORD_DIR = "demo"


class DemoError(ValueError):
    """A stage failed, or a setting cannot work (names the stage or key)."""


# ----------------------------------------------------------------------------- helpers


def _write_json(obj, path: Path) -> Path:
    return write_json_atomic(path, obj, default=str)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _banner(number: int, stage: str, text: str) -> None:
    print(f"\n== [{number}/{len(STAGES)}] {stage}: {text}", file=sys.stderr, flush=True)


def preset_of(cfg: dict) -> str:
    preset = str((cfg.get("models") or {}).get("preset") or "toy")
    if preset not in PRESETS:
        raise DemoError(f"preset={preset!r}: the demo runs one of {list(PRESETS)}")
    return preset


def _compose(command: str, overrides=(), values=None):
    """The config `luna COMMAND overrides...` would run with, the demo's `values` merged on top."""
    from luna.cli import compose

    print(f"   luna {command} " + " ".join(overrides), file=sys.stderr, flush=True)
    return compose(command.replace(" ", "_"), overrides, values)


class Paths:
    def __init__(self, out: Path):
        self.out = out
        self.records = out / RECORD_DIR
        self.models = out / "models"
        self.single = self.models / "single"
        self.factory = out / "factory"
        self.shards = self.factory / "shards"
        self.campaign = out / "campaign.yaml"
        self.pairs = out / "pairs"
        self.vault = out / "vault"
        self.projector = out / "projector"
        self.refine = out / "refine"
        self.samples = self.records / "samples"
        self.retrieval = self.records / "retrieval"


# ----------------------------------------------------------------------------- stages


def toy_weights(cfg: dict) -> Path:
    from demo.toy import toy_weights as folder

    return folder(cfg)


def toy_tower(cfg: dict):
    from demo.toy import toy_tower as tower

    return tower(cfg)


def stage_models(cfg: dict, paths: Paths) -> dict:
    """The checkpoints as single .safetensors files (the community format): the toy weights copied
    (every stage then loads them as it loads a user's files), or tiny ones written, families cycling."""
    from luna.models.fingerprint import te_fingerprint

    if preset_of(cfg) == "toy":
        from luna.models.toy import models as toy_models

        written = []
        for name, src in toy_models.checkpoint_paths(toy_weights(cfg)).items():
            family, style = toy_models.CHECKPOINTS[name]
            dest = paths.single / src.name
            with atomic_path(dest) as tmp:
                shutil.copyfile(src, tmp)
            written.append({"name": name, "family": family, "style": style, "path": str(dest),
                            "te_fingerprint": te_fingerprint(dest)})
            print(f"   {name}: family {family}, {style} shapes, te {written[-1]['te_fingerprint'][:12]}",
                  file=sys.stderr)
        return {"checkpoints": written, "source": str(toy_weights(cfg))}
    from luna.models import tiny

    models = cfg["models"]
    families = tuple(models["families"])
    if len(set(families)) < 2:
        raise DemoError("models.families: the demo needs at least two text-encoder families")
    if int(models["n"]) < len(set(families)):
        raise DemoError(f"models.n={models['n']}: at least one checkpoint per family ({len(set(families))})")
    written = []
    for index in range(int(models["n"])):
        family = families[index % len(families)]
        name = tiny.checkpoint_name(index, family)
        path = tiny.write_single_file(tiny.tiny_pipeline(index, family), paths.single / f"{name}.safetensors")
        written.append({"name": name, "family": family, "path": str(path), "te_fingerprint": te_fingerprint(path)})
        print(f"   {name}: family {family}, te {written[-1]['te_fingerprint'][:12]}", file=sys.stderr)
    return {"checkpoints": written}


def write_campaign(cfg: dict, dest: Path) -> dict:
    """The campaign file `campaign.name` with the demo's quota, steps, size and batch size applied,
    written atomically to `dest`; returns the written document."""
    import yaml

    from luna import CAMPAIGNS_DIR

    campaign = dict(cfg["campaign"])
    toy = preset_of(cfg) == "toy"
    campaign["name"] = campaign.get("name") or ("toy" if toy else "demo")
    if toy and campaign.get("quota") is None:
        campaign["quota"] = (cfg.get("toy") or {}).get("quota")
    src = CAMPAIGNS_DIR / f"{campaign['name']}.yaml"
    if not src.is_file():
        raise DemoError(f"campaign.name={campaign['name']!r}: no {src}")
    doc = yaml.safe_load(src.read_text())
    if doc.get("wildcards_dir"):
        raise DemoError(f"{src}: the demo copies the campaign into its folder; use one without wildcards_dir")
    if campaign.get("quota") is not None:
        for job in doc["jobs"].values():
            job["quota"] = int(campaign["quota"])
    sampler = doc.setdefault("sampler", {})
    for key, value in (("steps", campaign.get("steps")), ("width", campaign.get("size")),
                       ("height", campaign.get("size")), ("batch_size", campaign.get("batch_size"))):
        if value is not None:
            sampler[key] = int(value)
    with atomic_path(dest) as tmp:
        tmp.write_text(f"# written by `luna demo` from {src.name}\n" + yaml.safe_dump(doc, sort_keys=False))
    return doc


def read_shards(shards_dir: Path, per_cell: int, samples_dir: Path) -> dict:
    """Campaign statistics from the finished shards (their stats files and each sample's key.json)
    and the images of up to `per_cell` samples per (job, checkpoint), copied to `samples_dir`."""
    from factory.shards import complete_shards, read_shard, read_stats

    counts: dict[str, dict[str, int]] = {}
    rejected, reasons, units, shards = 0, {}, 0, 0
    samples, taken = [], {}
    samples_dir.mkdir(parents=True, exist_ok=True)
    for tar_path in complete_shards(shards_dir):  # unfinished writes are the factory's to redo
        stats = read_stats(tar_path)
        shards += 1
        units += len(stats.get("unit_ids", []))
        rejected += int(stats.get("failed", 0))
        for rejection in stats.get("rejected", []):
            for reason in {why for attempt in rejection.get("reasons", []) for why in attempt}:
                reasons[reason] = reasons.get(reason, 0) + 1
        for sample in read_shard(tar_path):
            if "json" not in sample:
                continue
            meta = json.loads(sample["json"])
            job, ckpt = str(meta.get("job")), str(meta.get("checkpoint"))
            counts.setdefault(job, {}).setdefault(ckpt, 0)
            counts[job][ckpt] += 1
            if taken.get((job, ckpt), 0) >= per_cell:
                continue
            ext = next((kind for kind in ("png", "jpg", "webp") if kind in sample), None)
            if ext is None:
                continue
            # the key names the file only after it is reduced to safe characters (never a tar path)
            safe = re.sub(r"[^A-Za-z0-9_-]", "_", str(meta.get("key", sample["__key__"])))[:80]
            dest = samples_dir / f"{safe}.{ext}"
            dest.write_bytes(sample[ext])
            taken[(job, ckpt)] = taken.get((job, ckpt), 0) + 1
            samples.append({"job": job, "checkpoint": ckpt, "key": meta.get("key"),
                            "prompt": meta.get("prompt", ""), "image": str(dest)})
    images = sum(sum(per_checkpoint.values()) for per_checkpoint in counts.values())
    return {"images": images, "rejected": rejected, "rejected_reasons": reasons, "units": units, "shards": shards,
            "counts": counts, "samples": samples}


def stage_factory(cfg: dict, paths: Paths) -> dict:
    from factory.errors import FactoryRunError
    from factory.run import run as run_factory
    from luna.settings import plain

    doc = write_campaign(cfg, paths.campaign)
    cluster = {key: value for key, value in (cfg.get("cluster") or {}).items() if value is not None}
    factory_cfg = _compose("factory", values={
        "campaign_file": str(paths.campaign), "checkpoints": {"dirs": [str(paths.single)]}, "out": str(paths.factory),
        "progress": bool(cfg.get("progress", True)), "cluster": cluster})
    try:
        run_factory(plain(factory_cfg))
    except FactoryRunError as error:
        raise DemoError(f"stage factory: {error}") from error
    stats = read_shards(paths.shards, int(cfg["report"]["samples_per_cell"]), paths.samples)
    stats.update(name=doc.get("campaign"), steps=doc["sampler"].get("steps"),
                 size=f"{doc['sampler'].get('width')}x{doc['sampler'].get('height')}")
    if stats["images"] == 0:
        raise DemoError(f"stage factory: no finished shard in {paths.shards}")
    return stats


def stage_extract(cfg: dict, paths: Paths) -> dict:
    from extraction.cli_info import pairs_info
    from extraction.extract import extract

    settings = cfg["extract"]
    values = {"shards": str(paths.shards), "out": str(paths.pairs), "checkpoints": {"dirs": [str(paths.single)]},
              "batch_size": int(settings["batch_size"]), "workers": settings["workers"],
              "progress": bool(cfg.get("progress", True))}
    toy = preset_of(cfg) == "toy"
    if toy:
        from luna.models.toy import models as toy_models

        values["vision"] = {"weights": str(toy_weights(cfg) / toy_models.VISION_FILE.name)}
    result = extract(_compose("extract", [f"vision={'toy' if toy else 'tiny'}", "text=per_checkpoint"], values))
    if result.corrupt:
        raise DemoError(f"stage extract: corrupt shard(s): {[bad['shard'] for bad in result.corrupt]}")
    info = pairs_info(paths.pairs)
    info["prompts_encoded"] = (result.text or {}).get("prompts_encoded")
    return info


def _center_crop(img, frac: float = 0.7):
    w, h = img.size
    cw, ch = int(w * frac), int(h * frac)
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return img.crop((x0, y0, x0 + cw, y0 + ch))


def stage_vault(cfg: dict, paths: Paths, samples: list[dict]) -> dict:
    import logging

    from PIL import Image

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is not news

    from vault import Vault
    from vault.cli import run as run_vault
    from vault.contact_sheet import contact_sheet

    run_vault(_compose("vault build", values={"pairs": str(paths.pairs), "out": str(paths.vault),
                                              "shards": str(paths.shards)}))
    manifest = json.loads((paths.vault / "manifest.json").read_text())
    size = sum(path.stat().st_size for path in paths.vault.rglob("*") if path.is_file())
    count = int(manifest.get("count", 0)) or 1
    info = {"images": manifest.get("count"), "prompts": manifest.get("num_prompts"),
            "index": manifest.get("index_spec"),
            "mode": manifest.get("mode"), "categories": sorted(manifest.get("categories") or {}),
            "bytes": size, "bytes_per_image": size / count}
    if preset_of(cfg) == "toy":
        info["retrieval"] = toy_retrieval(cfg, paths, Vault.open(paths.vault, use_gpu=False, vision=toy_tower(cfg)))
        return info
    # contact sheets for a few generated crops: one sample of each job, centre-cropped
    vault = Vault.open(paths.vault, use_gpu=False)
    picks, seen = [], set()
    for sample in samples:
        if sample["job"] not in seen:
            seen.add(sample["job"])
            picks.append(sample)
    picks = picks[: int(cfg["retrieval"]["samples"])]
    crops = []
    for sample in picks:
        with Image.open(sample["image"]) as im:
            crops.append(_center_crop(im.convert("RGB")))
    retrieval = []
    if crops:
        res = vault.query_images(crops, k=int(cfg["retrieval"]["k"]))
        paths.retrieval.mkdir(parents=True, exist_ok=True)
        for number, (sample, crop, nbs) in enumerate(zip(picks, crops, res.neighbours)):
            sheet, _ = contact_sheet(crop, list(nbs), [str(paths.shards)], paths.retrieval / f"sample_{number}.png",
                                     tile=128)
            retrieval.append({"title": f"centre crop of {sample['key']} ({sample['job']}, {sample['checkpoint']})",
                              "sheet": str(sheet), "neighbours": _plain_neighbours(nbs)})
    info["retrieval"] = retrieval
    return info


def toy_retrieval(cfg: dict, paths: Paths, vault) -> list[dict]:
    """Contact sheets for held-out renders of the toy world (scenes and jitter no image of the vault
    was generated from): each neighbour's prompt against the query's attributes."""
    from PIL import Image

    from demo import toy_quality
    from luna.models.toy import world
    from vault.contact_sheet import contact_sheet

    n = int(cfg["retrieval"]["samples"])
    scenes = toy_quality.held_out_scenes(n, seed=1)
    images = [world.render(s, toy_quality.SIZE, toy_quality.HELD_OUT_SEED + i, world.STYLES[i % 2])
              for i, s in enumerate(scenes)]
    res = vault.query_images(toy_quality.to_pil(images), k=int(cfg["retrieval"]["k"]))
    paths.retrieval.mkdir(parents=True, exist_ok=True)
    out = []
    for number, (scene, image, nbs) in enumerate(zip(scenes, images, res.neighbours)):
        sheet, _ = contact_sheet(Image.fromarray(image), list(nbs), [str(paths.shards)],
                                 paths.retrieval / f"toy_{number}.png", tile=128)
        plain = _plain_neighbours(nbs)
        for found, parsed in zip(plain, toy_quality.neighbour_scenes(nbs)):
            found["attributes"] = _shared(scene, parsed)
        out.append({"title": f"held-out render ({world.STYLES[number % 2]}): {world.prompt(scene)}",
                    "sheet": str(sheet), "neighbours": plain})
    return out


def _shared(scene, other) -> str:
    """'5/5' when `other` has every scene attribute of `scene`, else '4/5: colour blue' (what differs)."""
    from luna.models.toy import world

    if other is None:
        return "not a toy prompt"
    differ = [f"{a} {getattr(other, a)}" for a in world.SCENE_ATTRIBUTES if getattr(other, a) != getattr(scene, a)]
    n = len(world.SCENE_ATTRIBUTES)
    return f"{n - len(differ)}/{n}" + (f": {', '.join(differ)}" if differ else "")


def _plain_neighbours(nbs) -> list[dict]:
    keep = ("key", "prompt", "score", "weight", "checkpoint", "category")
    return [{key: (float(found[key]) if key in ("score", "weight") else found[key]) for key in keep if key in found}
            for found in nbs]


def stage_train(cfg: dict, paths: Paths) -> dict:
    from projector.cli import train

    settings = cfg["train"]
    if paths.projector.exists():  # a changed setting retrains from scratch (a stale checkpoint would resume)
        shutil.rmtree(paths.projector)
    loggers = [str(name) for name in (settings.get("loggers") or [])]
    choices = [f"experiment={settings['experiment']}", f"logger=[{','.join(loggers)}]" if loggers else "logger=none",
               *[str(override) for override in settings.get("overrides") or []]]
    train(_compose("train", choices, {
        "pairs": str(paths.pairs), "out": str(paths.projector),
        "trainer": {"max_epochs": int(settings["epochs"]), "log_every_n_steps": 1,
                    "enable_progress_bar": bool(cfg.get("progress", True))},
        "data": {"batch_size": int(settings["batch_size"]), "num_workers": 0}}))
    meta = json.loads((paths.projector / "projector.json").read_text())
    history = read_csv_history(paths.projector)
    runs = sorted((paths.projector / "wandb").glob("offline-run-*")) + sorted((paths.projector / "wandb").glob("run-*"))
    trained = meta.get("trained") or {}
    return {"metrics": meta.get("metrics") or {}, "parameters": meta.get("parameters"),
            "model": (meta.get("architecture") or {}).get("net", {}).get("class")
            or (meta.get("architecture") or {}).get("net", {}).get("_target_"),
            "epochs": trained.get("epochs", int(settings["epochs"])), "global_step": trained.get("global_step"),
            "history": history, "wandb_run": str(runs[-1]) if runs else None, "run_dir": str(paths.projector)}


def read_csv_history(run_dir: Path) -> list[dict]:
    """Lightning CSVLogger rows (newest version folder) as dicts of floats; empty cells dropped."""
    import csv

    files = sorted(run_dir.glob("csv/version_*/metrics.csv"), key=lambda path: path.stat().st_mtime)
    if not files:
        return []
    rows = []
    with open(files[-1], newline="") as fh:
        for line in csv.DictReader(fh):
            row = {}
            for key, value in line.items():
                if value not in (None, ""):
                    try:
                        row[key] = float(value)
                    except ValueError:
                        continue
            if "step" in row:
                row["step"] = int(row["step"])
            rows.append(row)
    return rows


def stage_refine(cfg: dict, paths: Paths, checkpoints: list[dict]) -> dict:
    """The astronaut photo: detect the face once, then detail it with vault and with projector rows."""
    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    from lsd_runtime.conditioning import CropEmbedder, ProjectorSource, TextSource, VaultSource, open_projector
    from lsd_runtime.detect import make_detector
    from lsd_runtime.record import detection_overlay, write_outputs
    from lsd_runtime.workflow import load_components, refine, settings_from_config
    from vault import Vault
    from vault.contact_sheet import contact_sheet

    refine_cfg = cfg["refine"]
    paths.refine.mkdir(parents=True, exist_ok=True)
    original = Image.fromarray(skdata.astronaut()).convert("RGB")
    orig_path = paths.refine / "astronaut.png"
    original.save(orig_path)
    ckpt = checkpoints[0]  # the first family's checkpoint refines; the vault answers in its dialect
    comps = load_components(checkpoint=ckpt["path"], device="cpu", dtype="float32", vision_name="tiny")
    detections = make_detector("cascade").detect(original, ["face"])
    if not detections:
        raise DemoError("stage refine: the LBP cascade found no face in the astronaut photo")
    detections = detections[:1]
    force = comps.sampler.force_zeros_for_empty_prompt
    text = TextSource(comps.encoders, refine_cfg["prompt"], refine_cfg.get("negative") or None,
                      force_zeros_for_empty_prompt=force)
    embedder = CropEmbedder(comps.vision)
    vault = Vault.open(paths.vault, use_gpu=False)
    sources = {
        "vault": VaultSource(vault, text, embedder, k=int(refine_cfg["k"]), weight=float(refine_cfg["vault_weight"]),
                             filters={"te_fingerprint": ckpt["te_fingerprint"]}),
        "projector": ProjectorSource(open_projector(paths.projector, embedder), text, embedder,
                                     weight=float(refine_cfg["projector_weight"])),
    }
    settings = settings_from_config(_compose("refine", ["preset=tiny"], {
        "seed": int(refine_cfg["seed"]), "detail": dict(refine_cfg.get("detail") or {}),
        "refine": {"enabled": bool(refine_cfg.get("global_refine", False))}}), detect_prompts=["face"])
    from tqdm.auto import tqdm

    variants, box = [], None
    for name, source in tqdm(list(sources.items()), desc="refine", unit="variant",
                             disable=not cfg.get("progress", True)):
        t0 = time.perf_counter()
        result = refine(original, refine_cfg["prompt"], components=comps, detections=detections, conditioning=source,
                        settings=settings, negative=refine_cfg.get("negative") or None)
        files = write_outputs(result, paths.refine / name)
        crop = result.record["crops"][0] if result.record.get("crops") else None
        box = box or (crop["crop_box"] if crop else None)
        nbs = (crop or {}).get("conditioning", {}).get("neighbours", [])
        variants.append({"name": name, "image": files["image"], "record": str(Path(files["record"])),
                         "seconds": round(time.perf_counter() - t0, 2), "neighbours": nbs,
                         "changed_pixels": int((np.asarray(result.image) != np.asarray(original)).any(-1).sum())})
        print(f"   {name}: {files['image']} ({variants[-1]['seconds']:.1f} s)", file=sys.stderr)
    record = json.loads(Path(variants[0]["record"]).read_text())
    overlay = paths.refine / "detections.png"
    detection_overlay(original, record).save(overlay)
    info = {"prompt": refine_cfg["prompt"], "original": str(orig_path), "overlay": str(overlay), "box": box,
            "checkpoint": ckpt["name"], "detections": record.get("detections", []), "variants": variants,
            "note": "The tiny preset's UNet and VAE have random weights, so the detailed face is texture noise: "
                    "what the demo shows is the plumbing (detection, square crop, per-crop conditioning from the "
                    "vault or the projector, feathered paste that leaves every pixel outside the crop untouched). "
                    "With a real SDXL checkpoint (`luna refine checkpoint=...`) the same path refines the face."}
    # the face crop's own contact sheet: what the vault finds for it in the refining checkpoint's dialect
    if box:
        face = original.crop(tuple(box))
        res = vault.query_images([face], k=int(refine_cfg["k"]), filters={"te_fingerprint": ckpt["te_fingerprint"]})
        sheet, _ = contact_sheet(face, list(res.neighbours[0]), [str(paths.shards)],
                                 paths.retrieval / "astronaut_face.png",
                                 tile=128)
        info["retrieval"] = {"title": f"the astronaut's detected face (neighbours from {ckpt['family']}-family "
                                      "checkpoints, whose text encoders the refiner uses)",
                             "sheet": str(sheet), "neighbours": _plain_neighbours(res.neighbours[0])}
    return info


# ----------------------------------------------------------------------------- driver


def _prepare_out(out: Path, fresh: bool) -> None:
    if fresh and out.exists():
        if any(out.iterdir()) and not (out / RECORD_DIR).is_dir():
            raise DemoError(f"fresh=true would delete {out}, which holds files but no {RECORD_DIR}/ folder "
                            "of an earlier demo; choose another out=")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def run_demo(cfg: dict) -> dict:
    """Run (or resume) every stage; returns the results dict the report is built from."""
    out = Path(str(cfg["out"])).expanduser().resolve()
    _prepare_out(out, bool(cfg.get("fresh", False)))
    paths = Paths(out)
    paths.records.mkdir(parents=True, exist_ok=True)
    _write_json(cfg, paths.records / "config.json")
    import torch

    saved_threads = torch.get_num_threads()
    if cfg.get("threads"):  # tiny models gain nothing from threads; spin-waiting OpenMP threads slow a shared CPU
        torch.set_num_threads(int(cfg["threads"]))
    try:
        return _run_stages(cfg, out, paths)
    finally:
        torch.set_num_threads(saved_threads)


def _run_stages(cfg: dict, out: Path, paths: Paths) -> dict:
    run_stage = {
        "models": lambda cfg, paths, state: stage_models(cfg, paths),
        "factory": lambda cfg, paths, state: stage_factory(cfg, paths),
        "extract": lambda cfg, paths, state: stage_extract(cfg, paths),
        "vault": lambda cfg, paths, state: stage_vault(cfg, paths, state["factory"]["samples"]),
        "train": lambda cfg, paths, state: stage_train(cfg, paths),
        "refine": lambda cfg, paths, state: (toy_stages.stage_refine if toy else stage_refine)(
            cfg, paths, state["models"]["checkpoints"]),
        "quality": lambda cfg, paths, state: toy_stages.stage_quality(cfg, paths, state) if toy else {},
        "ab": lambda cfg, paths, state: toy_stages.stage_ab(cfg, paths, state) if toy else {},
    }
    preset = preset_of(cfg)
    toy = preset == "toy"
    from demo import toy as toy_stages

    subtitle = ("the whole loop on the toy preset: trained checkpoints of a procedural world, read by its oracle"
                if toy else "the whole loop on the tiny preset (random weights: the plumbing, not the pictures)")
    results: dict = {"title": "Luna Foundry · demo", "subtitle": subtitle, "preset": preset,
                     "command": "luna demo " + f"out={out}" + ("" if toy else " models.preset=tiny"), "timings": {},
                     "resumed": [], "report": dict(cfg.get("report") or {})}
    # every stage's key covers the preset and the settings it reads (and, chained, every earlier stage's)
    sections = {"models": ("preset", "models"), "factory": ("campaign", "cluster", "report", "toy"),
                "extract": ("extract",), "vault": ("retrieval",), "train": ("train",), "refine": ("refine", "toy"),
                "quality": ("toy",), "ab": ("ab",), "report": ()}
    key = ""
    state: dict = {}
    t_all = time.perf_counter()
    for number, stage in enumerate(STAGES, 1):
        key = _hash([key, stage, {section: cfg.get(section) for section in sections[stage]}])
        record_path = paths.records / f"{stage}.json"
        done = json.loads(record_path.read_text()) if record_path.is_file() else None
        if stage != "report" and done and done.get("key") == key:
            _banner(number, stage, f"done by an earlier run ({done['seconds']:.1f} s), skipped")
            state[stage] = done["result"]
            results["timings"][stage] = done["seconds"]
            results["resumed"].append(stage)
            continue
        _banner(number, stage, {"models": f"{preset} checkpoints", "factory": "campaign on Ray", "extract": "pairs",
                                "vault": "FAISS vault + retrieval", "train": "projector",
                                "refine": "degraded toy crops" if toy else "astronaut photo",
                                "quality": "the oracle's measures" if toy else "nothing to measure (random weights)",
                                "ab": "luna ab: arms side by side" if toy else "nothing to compare (random weights)",
                                "report": "report.html"}[stage])
        t0 = time.perf_counter()
        if stage == "report":  # the page shows the stages before it; its own time is in results.json
            result = {"report": str(_build(_assemble(results, state), out))}
        else:
            result = run_stage[stage](cfg, paths, state)
        seconds = round(time.perf_counter() - t0, 2)
        state[stage] = result
        results["timings"][stage] = seconds
        _write_json({"key": key, "seconds": seconds, "result": result,
                     "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}, record_path)
        print(f"   {stage} done in {seconds:.1f} s", file=sys.stderr, flush=True)
    results["total_seconds"] = round(time.perf_counter() - t_all, 2)
    results["report_path"] = state["report"]["report"]
    _write_json(results, paths.records / "results.json")
    return results


def _assemble(results: dict, state: dict) -> dict:
    factory, models = state["factory"], state["models"]
    results["campaign"] = dict(factory, preset=results.get("preset"),
                               checkpoints=[{key: ckpt[key] for key in ("name", "family", "te_fingerprint")}
                                            for ckpt in models["checkpoints"]])
    results["pairs"] = state["extract"]
    results["vault"] = {key: value for key, value in state["vault"].items() if key != "retrieval"}
    retrieval = list(state["vault"].get("retrieval") or [])
    if state["refine"].get("retrieval"):
        retrieval.insert(0, state["refine"]["retrieval"])
    results["retrieval"] = retrieval
    results["training"] = state["train"]
    results["refine"] = {key: value for key, value in state["refine"].items() if key != "retrieval"}
    if state.get("quality"):
        results["quality"] = state["quality"]
    if state.get("ab"):
        results["ab"] = state["ab"]
    results["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return results


def _build(results: dict, out: Path) -> Path:
    from demo.report import build_report

    return build_report(results, out)


def _task(cfg) -> None:
    from luna.settings import plain

    t0 = time.perf_counter()
    results = run_demo(plain(cfg))
    print("\nstage times: " + ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in results["timings"].items())
          + f" (this run {time.perf_counter() - t0:.1f}s)")
    print(f"report: {results['report_path']}")


def main(argv: list[str] | None = None) -> int:
    from luna.cli import run_stage

    argv = list(sys.argv[1:] if argv is None else argv)
    return run_stage("luna demo", "demo", _task, argv, interrupted="rerun the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
