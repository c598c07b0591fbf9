"""`luna demo out=DIR`: the whole loop on the tiny preset, then DIR/report.html.

    models   tiny SDXL checkpoints of two text-encoder families      DIR/models/single/*.safetensors
    factory  the demo campaign across them on local Ray               DIR/factory/shards/*.tar
    extract  image embeddings + SDXL conditionings                    DIR/pairs/pairs-*.h5
    vault    FAISS vault, contact sheets for a few generated crops    DIR/vault/, DIR/demo/retrieval/
    train    a projector, briefly (W&B offline run + Lightning CSV)   DIR/projector/
    refine   skimage's astronaut photo: LBP face cascade, then the    DIR/refine/{vault,projector}/
             face detailed with vault and with projector conditioning
    report   DIR/report.html (self-contained) + DIR/report/*.png

Each stage calls the entry point a user would (`luna factory`, `luna extract`, `luna vault build`,
`luna train` through their `main(argv)`, the runtime's `refine(...)`). A finished stage leaves
DIR/demo/<stage>.json (its settings' hash, wall time and results); a rerun skips stages whose
record matches and the stages themselves resume interrupted work. `fresh=true` wipes DIR first.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable

from luna.files import write_json_atomic

STAGES = ("models", "factory", "extract", "vault", "train", "refine", "report")
RECORD_DIR = "demo"


class DemoError(ValueError):
    """A stage failed, or a setting cannot work (names the stage or key)."""


# ----------------------------------------------------------------------------- helpers


def _q(value) -> str:
    """A value as a quoted Hydra override string (paths with spaces, commas or quotes survive)."""
    s = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{s}'"


def _write_json(obj, path: Path) -> Path:
    return write_json_atomic(path, obj, default=str)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _banner(i: int, stage: str, text: str) -> None:
    print(f"\n== [{i}/{len(STAGES)}] {stage}: {text}", file=sys.stderr, flush=True)


def _call(command: str, main: Callable[[list[str]], int], argv: list[str]) -> None:
    """Run `luna COMMAND argv...` through its entry point in this process; a non-zero exit is a DemoError."""
    line = f"luna {command} " + " ".join(argv)
    print(f"   $ {line}", file=sys.stderr, flush=True)
    code = main(argv)
    if code:
        raise DemoError(f"`{line}` exited with {code} (see the messages above)")


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


def stage_models(cfg: dict, p: Paths) -> dict:
    """Tiny checkpoints as single .safetensors files (the community format), families cycling."""
    from luna.models import tiny
    from luna.models.fingerprint import te_fingerprint

    m = cfg["models"]
    families = tuple(m["families"])
    if len(set(families)) < 2:
        raise DemoError("models.families: the demo needs at least two text-encoder families")
    if int(m["n"]) < len(set(families)):
        raise DemoError(f"models.n={m['n']}: at least one checkpoint per family ({len(set(families))})")
    written = []
    for index in range(int(m["n"])):
        family = families[index % len(families)]
        name = tiny.checkpoint_name(index, family)
        path = tiny.write_single_file(tiny.tiny_pipeline(index, family), p.single / f"{name}.safetensors")
        written.append({"name": name, "family": family, "path": str(path), "te_fingerprint": te_fingerprint(path)})
        print(f"   {name}: family {family}, te {written[-1]['te_fingerprint'][:12]}", file=sys.stderr)
    return {"checkpoints": written}


def write_campaign(cfg: dict, dest: Path) -> Path:
    """campaigns/<name>.yaml with the demo's quota, steps, size and batch size applied."""
    import yaml

    from factory.campaign_file import CAMPAIGNS_DIR

    c = cfg["campaign"]
    src = CAMPAIGNS_DIR / f"{c['name']}.yaml"
    if not src.is_file():
        raise DemoError(f"campaign.name={c['name']!r}: no {src}")
    doc = yaml.safe_load(src.read_text())
    if doc.get("wildcards_dir"):
        raise DemoError(f"{src}: the demo copies the campaign into its folder; use one without wildcards_dir")
    if c.get("quota") is not None:
        for job in doc["jobs"].values():
            job["quota"] = int(c["quota"])
    sampler = doc.setdefault("sampler", {})
    for key, value in (("steps", c.get("steps")), ("width", c.get("size")), ("height", c.get("size")),
                       ("batch_size", c.get("batch_size"))):
        if value is not None:
            sampler[key] = int(value)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_text(f"# written by `luna demo` from {src.name}\n" + yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, dest)
    return dest


def read_shards(shards_dir: Path, per_cell: int, samples_dir: Path) -> dict:
    """Campaign statistics from the finished shards (their _stats.json and each sample's key.json)
    and the images of up to `per_cell` samples per (job, checkpoint), copied to `samples_dir`."""
    counts: dict[str, dict[str, int]] = {}
    rejected, reasons, units, shards = 0, {}, 0, 0
    samples, taken = [], {}
    samples_dir.mkdir(parents=True, exist_ok=True)
    for tar_path in sorted(shards_dir.glob("*.tar")):
        stats_path = tar_path.parent / f"{tar_path.stem}_stats.json"
        if tar_path.name.startswith(".") or not stats_path.is_file():
            continue  # an unfinished write: the factory redoes it on the next run
        st = json.loads(stats_path.read_text())
        shards += 1
        units += len(st.get("unit_ids", []))
        rejected += int(st.get("failed", 0))
        for r in st.get("rejected", []):
            for reason in {x for attempt in r.get("reasons", []) for x in attempt}:
                reasons[reason] = reasons.get(reason, 0) + 1
        with tarfile.open(tar_path) as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            for name, member in members.items():
                if not name.endswith(".json"):
                    continue
                meta = json.loads(tar.extractfile(member).read())
                job, ckpt = str(meta.get("job")), str(meta.get("checkpoint"))
                counts.setdefault(job, {}).setdefault(ckpt, 0)
                counts[job][ckpt] += 1
                if taken.get((job, ckpt), 0) >= per_cell:
                    continue
                stem = name[: -len(".json")]
                img = next((members[f"{stem}.{e}"] for e in ("png", "jpg", "webp") if f"{stem}.{e}" in members), None)
                if img is None:
                    continue
                # the key names the file only after it is reduced to safe characters (never a tar path)
                safe = re.sub(r"[^A-Za-z0-9_-]", "_", str(meta.get("key", stem)))[:80]
                dest = samples_dir / f"{safe}{Path(img.name).suffix}"
                dest.write_bytes(tar.extractfile(img).read())
                taken[(job, ckpt)] = taken.get((job, ckpt), 0) + 1
                samples.append({"job": job, "checkpoint": ckpt, "key": meta.get("key"),
                                "prompt": meta.get("prompt", ""), "image": str(dest)})
    images = sum(sum(v.values()) for v in counts.values())
    return {"images": images, "rejected": rejected, "rejected_reasons": reasons, "units": units, "shards": shards,
            "counts": counts, "samples": samples}


def stage_factory(cfg: dict, p: Paths) -> dict:
    from factory.cli import main as factory_main

    campaign = write_campaign(cfg, p.campaign)
    argv = [f"campaign_file={_q(campaign)}", f"checkpoints.dirs=[{_q(p.single)}]", f"out={_q(p.factory)}",
            f"progress={str(bool(cfg.get('progress', True))).lower()}"]
    for key, value in (cfg.get("cluster") or {}).items():
        if value is not None:
            argv.append(f"cluster.{key}={_q(value) if isinstance(value, str) else json.dumps(value)}")
    _call("factory", factory_main, argv)
    import yaml

    stats = read_shards(p.shards, int(cfg["report"]["samples_per_cell"]), p.samples)
    c = cfg["campaign"]
    doc = yaml.safe_load(campaign.read_text())
    stats.update(name=doc.get("campaign", c["name"]), steps=doc["sampler"].get("steps"),
                 size=f"{doc['sampler'].get('width')}x{doc['sampler'].get('height')}")
    if stats["images"] == 0:
        raise DemoError(f"stage factory: no finished shard in {p.shards}")
    return stats


def stage_extract(cfg: dict, p: Paths) -> dict:
    from extraction.cli import main as extract_main
    from extraction.cli_info import pairs_info

    e = cfg["extract"]
    argv = [f"shards={_q(p.shards)}", f"out={_q(p.pairs)}", "vision=tiny", "text=per_checkpoint",
            f"checkpoints.dirs=[{_q(p.single)}]", f"batch_size={int(e['batch_size'])}", f"workers={int(e['workers'])}",
            f"progress={str(bool(cfg.get('progress', True))).lower()}"]
    _call("extract", extract_main, argv)
    info = pairs_info(p.pairs)
    report = p.pairs / "extract_report.json"
    if report.is_file():
        text = json.loads(report.read_text()).get("text") or {}
        info["prompts_encoded"] = text.get("prompts_encoded")
    return info


def _center_crop(img, frac: float = 0.7):
    w, h = img.size
    cw, ch = int(w * frac), int(h * frac)
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return img.crop((x0, y0, x0 + cw, y0 + ch))


def stage_vault(cfg: dict, p: Paths, samples: list[dict]) -> dict:
    import logging

    from PIL import Image

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is not news

    from vault import Vault
    from vault.cli import main as vault_main
    from vault.contact_sheet import contact_sheet

    argv = ["build", f"pairs={_q(p.pairs)}", f"out={_q(p.vault)}", f"shards={_q(p.shards)}"]
    _call("vault", vault_main, argv)
    manifest = json.loads((p.vault / "manifest.json").read_text())
    size = sum(f.stat().st_size for f in p.vault.rglob("*") if f.is_file())
    count = int(manifest.get("count", 0)) or 1
    info = {"images": manifest.get("count"), "prompts": manifest.get("num_prompts"),
            "index": manifest.get("index_spec"),
            "mode": manifest.get("mode"), "categories": sorted(manifest.get("categories") or {}),
            "bytes": size, "bytes_per_image": size / count}
    # contact sheets for a few generated crops: one sample of each job, centre-cropped
    vault = Vault.open(p.vault, use_gpu=False)
    picks, seen = [], set()
    for s in samples:
        if s["job"] not in seen:
            seen.add(s["job"])
            picks.append(s)
    picks = picks[: int(cfg["retrieval"]["samples"])]
    crops = []
    for s in picks:
        with Image.open(s["image"]) as im:
            crops.append(_center_crop(im.convert("RGB")))
    retrieval = []
    if crops:
        res = vault.query_images(crops, k=int(cfg["retrieval"]["k"]))
        p.retrieval.mkdir(parents=True, exist_ok=True)
        for i, (s, crop, nbs) in enumerate(zip(picks, crops, res.neighbours)):
            sheet, _ = contact_sheet(crop, list(nbs), [str(p.shards)], p.retrieval / f"sample_{i}.png", tile=128)
            retrieval.append({"title": f"centre crop of {s['key']} ({s['job']}, {s['checkpoint']})",
                              "sheet": str(sheet), "neighbours": _plain_neighbours(nbs)})
    info["retrieval"] = retrieval
    return info


def _plain_neighbours(nbs) -> list[dict]:
    keep = ("key", "prompt", "score", "weight", "checkpoint", "category")
    return [{k: (float(n[k]) if k in ("score", "weight") else n[k]) for k in keep if k in n} for n in nbs]


def stage_train(cfg: dict, p: Paths) -> dict:
    from projector.cli import main as train_main

    t = cfg["train"]
    if p.projector.exists():  # a changed setting retrains from scratch (a stale checkpoint would resume)
        shutil.rmtree(p.projector)
    loggers = [str(x) for x in (t.get("loggers") or [])]
    argv = [f"pairs={_q(p.pairs)}", f"out={_q(p.projector)}", f"experiment={t['experiment']}",
            f"logger=[{','.join(loggers)}]" if loggers else "logger=none",
            f"trainer.max_epochs={int(t['epochs'])}", "trainer.log_every_n_steps=1",
            f"trainer.enable_progress_bar={str(bool(cfg.get('progress', True))).lower()}",
            f"data.batch_size={int(t['batch_size'])}", "data.num_workers=0", *[str(o) for o in t.get("overrides") or []]]
    _call("train", train_main, argv)
    meta = json.loads((p.projector / "projector.json").read_text())
    history = read_csv_history(p.projector)
    runs = sorted((p.projector / "wandb").glob("offline-run-*")) + sorted((p.projector / "wandb").glob("run-*"))
    trained = meta.get("trained") or {}
    return {"metrics": meta.get("metrics") or {}, "parameters": meta.get("parameters"),
            "model": (meta.get("architecture") or {}).get("net", {}).get("class")
            or (meta.get("architecture") or {}).get("net", {}).get("_target_"),
            "epochs": trained.get("epochs", int(t["epochs"])), "global_step": trained.get("global_step"),
            "history": history, "wandb_run": str(runs[-1]) if runs else None, "run_dir": str(p.projector)}


def read_csv_history(run_dir: Path) -> list[dict]:
    """Lightning CSVLogger rows (newest version folder) as dicts of floats; empty cells dropped."""
    import csv

    files = sorted(run_dir.glob("csv/version_*/metrics.csv"), key=lambda f: f.stat().st_mtime)
    if not files:
        return []
    rows = []
    with open(files[-1], newline="") as f:
        for row in csv.DictReader(f):
            d = {}
            for k, v in row.items():
                if v not in (None, ""):
                    try:
                        d[k] = float(v)
                    except ValueError:
                        continue
            if "step" in d:
                d["step"] = int(d["step"])
            rows.append(d)
    return rows


def stage_refine(cfg: dict, p: Paths, checkpoints: list[dict]) -> dict:
    """The astronaut photo: detect the face once, then detail it with vault and with projector rows."""
    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    from lsd_runtime.conditioning import CropEmbedder, ProjectorSource, TextSource, VaultSource, open_projector
    from lsd_runtime.detailer import DetailSettings
    from lsd_runtime.detect import make_detector
    from lsd_runtime.record import detection_overlay, write_outputs
    from lsd_runtime.sampler import SamplerSettings
    from lsd_runtime.workflow import RefineSettings, load_components, refine
    from vault import Vault
    from vault.contact_sheet import contact_sheet

    r = cfg["refine"]
    p.refine.mkdir(parents=True, exist_ok=True)
    original = Image.fromarray(skdata.astronaut()).convert("RGB")
    orig_path = p.refine / "astronaut.png"
    original.save(orig_path)
    ckpt = checkpoints[0]  # the first family's checkpoint refines; the vault answers in its dialect
    comps = load_components(checkpoint=ckpt["path"], device="cpu", dtype="float32", vision_name="tiny")
    detections = make_detector("cascade").detect(original, ["face"])
    if not detections:
        raise DemoError("stage refine: the LBP cascade found no face in the astronaut photo")
    detections = detections[:1]
    force = comps.sampler.force_zeros_for_empty_prompt
    text = TextSource(comps.encoders, r["prompt"], r.get("negative") or None, force_zeros_for_empty_prompt=force)
    embedder = CropEmbedder(comps.vision)
    vault = Vault.open(p.vault, use_gpu=False)
    sources = {
        "vault": VaultSource(vault, text, embedder, k=int(r["k"]), weight=float(r["vault_weight"]),
                             filters={"te_fingerprint": ckpt["te_fingerprint"]}),
        "projector": ProjectorSource(open_projector(p.projector, embedder), text, embedder,
                                     weight=float(r["projector_weight"])),
    }
    settings = RefineSettings.tiny(
        seed=int(r["seed"]), global_refine=bool(r.get("global_refine", False)),
        detail_sampler=SamplerSettings(steps=int(r["steps"]), strength=float(r["strength"]), cfg=float(r["cfg"])),
        detail=DetailSettings(working_size=int(r["working_size"]), min_crop=32, feather=12.0, batch_size=1))
    from tqdm.auto import tqdm

    variants, box = [], None
    for name, source in tqdm(list(sources.items()), desc="refine", unit="variant",
                             disable=not cfg.get("progress", True)):
        t0 = time.perf_counter()
        result = refine(original, r["prompt"], components=comps, detections=detections, conditioning=source,
                        settings=settings, negative=r.get("negative") or None)
        files = write_outputs(result, p.refine / name)
        crop = result.record["crops"][0] if result.record.get("crops") else None
        box = box or (crop["crop_box"] if crop else None)
        nbs = (crop or {}).get("conditioning", {}).get("neighbours", [])
        variants.append({"name": name, "image": files["image"], "record": str(Path(files["record"])),
                         "seconds": round(time.perf_counter() - t0, 2), "neighbours": nbs,
                         "changed_pixels": int((np.asarray(result.image) != np.asarray(original)).any(-1).sum())})
        print(f"   {name}: {files['image']} ({variants[-1]['seconds']:.1f} s)", file=sys.stderr)
    record = json.loads(Path(variants[0]["record"]).read_text())
    overlay = p.refine / "detections.png"
    detection_overlay(original, record).save(overlay)
    info = {"prompt": r["prompt"], "original": str(orig_path), "overlay": str(overlay), "box": box,
            "checkpoint": ckpt["name"], "detections": record.get("detections", []), "variants": variants,
            "note": "The tiny preset's UNet and VAE have random weights, so the detailed face is texture noise: "
                    "what the demo shows is the plumbing (detection, square crop, per-crop conditioning from the "
                    "vault or the projector, feathered paste that leaves every pixel outside the crop untouched). "
                    "With a real SDXL checkpoint (`luna refine checkpoint=...`) the same path refines the face."}
    # the face crop's own contact sheet: what the vault finds for it in the refining checkpoint's dialect
    if box:
        face = original.crop(tuple(box))
        res = vault.query_images([face], k=int(r["k"]), filters={"te_fingerprint": ckpt["te_fingerprint"]})
        sheet, _ = contact_sheet(face, list(res.neighbours[0]), [str(p.shards)], p.retrieval / "astronaut_face.png",
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
    p = Paths(out)
    p.records.mkdir(parents=True, exist_ok=True)
    _write_json(cfg, p.records / "config.json")
    import torch

    saved_threads = torch.get_num_threads()
    if cfg.get("threads"):  # tiny models gain nothing from threads; spin-waiting OpenMP threads slow a shared CPU
        torch.set_num_threads(int(cfg["threads"]))
    try:
        return _run_stages(cfg, out, p)
    finally:
        torch.set_num_threads(saved_threads)


def _run_stages(cfg: dict, out: Path, p: Paths) -> dict:
    run_stage = {
        "models": lambda c, p, s: stage_models(c, p),
        "factory": lambda c, p, s: stage_factory(c, p),
        "extract": lambda c, p, s: stage_extract(c, p),
        "vault": lambda c, p, s: stage_vault(c, p, s["factory"]["samples"]),
        "train": lambda c, p, s: stage_train(c, p),
        "refine": lambda c, p, s: stage_refine(c, p, s["models"]["checkpoints"]),
    }
    results: dict = {"title": "Luna Foundry · demo", "subtitle": "the whole loop on the tiny preset",
                     "command": "luna demo " + f"out={out}", "timings": {}, "resumed": [],
                     "report": dict(cfg.get("report") or {})}
    sections = {"models": ("models",), "factory": ("campaign", "cluster", "report"), "extract": ("extract",),
                "vault": ("retrieval",), "train": ("train",), "refine": ("refine",), "report": ()}
    key = ""
    state: dict = {}
    t_all = time.perf_counter()
    for i, stage in enumerate(STAGES, 1):
        key = _hash([key, stage, {s: cfg.get(s) for s in sections[stage]}])
        record_path = p.records / f"{stage}.json"
        done = json.loads(record_path.read_text()) if record_path.is_file() else None
        if stage != "report" and done and done.get("key") == key:
            _banner(i, stage, f"done by an earlier run ({done['seconds']:.1f} s), skipped")
            state[stage] = done["result"]
            results["timings"][stage] = done["seconds"]
            results["resumed"].append(stage)
            continue
        _banner(i, stage, {"models": "tiny checkpoints", "factory": "campaign on Ray", "extract": "pairs",
                           "vault": "FAISS vault + retrieval", "train": "projector", "refine": "astronaut photo",
                           "report": "report.html"}[stage])
        t0 = time.perf_counter()
        if stage == "report":  # the page shows the stages before it; its own time is in results.json
            result = {"report": str(_build(_assemble(results, state), out))}
        else:
            result = run_stage[stage](cfg, p, state)
        seconds = round(time.perf_counter() - t0, 2)
        state[stage] = result
        results["timings"][stage] = seconds
        _write_json({"key": key, "seconds": seconds, "result": result,
                     "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}, record_path)
        print(f"   {stage} done in {seconds:.1f} s", file=sys.stderr, flush=True)
    results["total_seconds"] = round(time.perf_counter() - t_all, 2)
    results["report_path"] = state["report"]["report"]
    _write_json(results, p.records / "results.json")
    return results


def _assemble(results: dict, state: dict) -> dict:
    f, m = state["factory"], state["models"]
    results["campaign"] = dict(f, checkpoints=[{k: c[k] for k in ("name", "family", "te_fingerprint")}
                                                for c in m["checkpoints"]])
    results["pairs"] = state["extract"]
    results["vault"] = {k: v for k, v in state["vault"].items() if k != "retrieval"}
    retrieval = list(state["vault"].get("retrieval") or [])
    if state["refine"].get("retrieval"):
        retrieval.insert(0, state["refine"]["retrieval"])
    results["retrieval"] = retrieval
    results["training"] = state["train"]
    results["refine"] = {k: v for k, v in state["refine"].items() if k != "retrieval"}
    results["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return results


def _build(results: dict, out: Path) -> Path:
    from luna.report import build_report

    return build_report(results, out)


def main(argv: list[str] | None = None) -> int:
    from omegaconf import OmegaConf

    from luna.cli import run_hydra

    argv = list(sys.argv[1:] if argv is None else argv)
    holder: dict = {}

    def task(cfg) -> None:
        holder["cfg"] = OmegaConf.to_container(cfg, resolve=True)

    try:
        run_hydra(task, "demo", argv, prog="luna demo")
    except SystemExit as e:  # Hydra printed what was wrong with the overrides
        return 2 if e.code not in (0, None) else 0
    if "cfg" not in holder:  # --help, --cfg: Hydra answered without running the task
        return 0
    t0 = time.perf_counter()
    try:
        results = run_demo(holder["cfg"])
    except DemoError as e:
        print(f"luna demo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nluna demo: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    print("\nstage times: " + ", ".join(f"{k} {v:.1f}s" for k, v in results["timings"].items())
          + f" (this run {time.perf_counter() - t0:.1f}s)")
    print(f"report: {results['report_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
