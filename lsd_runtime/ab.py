"""`luna ab`: the same crops refined under each conditioning arm, scored, summarised with intervals.

    luna ab crops.images=DIR checkpoint=X.safetensors vault=V projector=P out=DIR
    luna ab crops.shards=SHARDS crops.pairs=PAIRS crops.split=val_combo preset=tiny vault=V projector=P out=DIR
    luna ab ... tune=true          # search per-category settings, write category_settings.json

Arms (`arms=[...]`): none (the user's prompt only), generic (a deliberately vague prompt), vault,
projector, hybrid (both, `hybrid.policy`), hybrid_gate / hybrid_mix (a policy each), ip_adapter,
vault+ip_adapter. An arm whose input is missing (no vault=, no projector=, no ip_adapter.weights=)
is left out and named in `ab.json` ("missing") and on the page.

Every arm refines the same crops with the same noise (row i of one NoiseScaffold, a slice per
crop) and the same per-crop seed; only the conditioning differs. Per crop and arm it records:
  cos_in      cosine of vision embeddings (the configured tower) of input and refined crop
  clip_text   cosine of the refined crop's embedding and the prompt's text embedding, when the
              tower has a text side and the crop's prompt is known
  psnr, ssim  pixel change against the input (scikit-image): an arm that does nothing scores high
  oracle_acc, oracle_joint   attribute accuracy of the refined crop by `oracle` (toy world)
  seconds     conditioning + denoising time per crop

Writes OUT/ab.json, OUT/summary.md (per-arm means with bootstrap 95% intervals and paired
differences against `none`), OUT/ab.html (grid: input, then one column per arm, scores under each),
OUT/images/*.png and, with `logger.wandb=true`, a W&B table (offline unless WANDB_MODE=online).
`run_ab(...)` is the same as a Python call; `render_section(ab)` is the HTML fragment for reports.
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

from lsd_runtime import abstats
from lsd_runtime.arms import (ARMS, METRICS, ABError, Arm, Context, Crop, load_crops, load_oracle,  # noqa: F401
                              plan_arms, refine_crops, score, square, text_side)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


# ---------------------------------------------------------------------- the run


@dataclass
class ABResult:
    summary: dict  # {arm: {metric: {mean, low, high, n, diff}}}
    paths: dict  # ab_json, summary_md, html, images (folder), wandb (run folder or None), settings (tune)
    arms: list
    missing: dict
    record: dict = field(repr=False, default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-able: what a caller (the demo's results.json) keeps; the record itself stays in ab.json."""
        return {"summary": self.summary, "arms": list(self.arms), "missing": dict(self.missing),
                "paths": {k: (str(v) if v is not None else None) for k, v in self.paths.items()},
                "crops": len(self.record.get("crops", [])), "metrics": list(self.record.get("metrics", []))}


def _components(c: dict):
    from lsd_runtime.workflow import load_components

    vis = c.get("vision") or {}
    if c.get("preset") == "tiny" and not vis.get("name") and not vis.get("weights"):
        from lsd_runtime.workflow import tiny_components

        return tiny_components()  # one tiny pipeline (load_components builds a second one for its vision flag)
    return load_components(c.get("checkpoint"), c.get("preset"), c.get("device", "auto"), c.get("dtype", "auto"),
                           vis.get("name"), vis.get("weights"))


def _tower_for(c: dict, components, model_id):
    from lsd_runtime.conditioning import CropEmbedder, same_vision_model
    from luna.models.vision import load_vision

    vis = c.get("vision") or {}
    name = vis.get("name") or (str(model_id).removeprefix("open_clip:") if model_id else None)
    if name is None and components.vision is not None:
        return CropEmbedder(components.vision)
    if name is None:
        return None
    tower = components.vision
    if tower is None or not same_vision_model(tower.model_id, name):
        tower = load_vision(name, vis.get("weights"), device=str(components.sampler.device))
    return CropEmbedder(tower)


def prepare(c: dict) -> tuple[Context, dict]:
    """Load checkpoint, vault, projector, vision tower; returns the context and what is available."""
    from lsd_runtime.conditioning import open_projector
    from lsd_runtime.sampler import SamplerSettings

    components = _components(c)
    vault = projector = None
    model = None
    if c.get("vault"):
        from vault.service import open_vault

        vault = open_vault(str(c["vault"]))
        model = vault.info().get("vision_model")
    if c.get("projector"):
        path = Path(str(c["projector"]))
        cfg_file = (path if path.is_dir() else path.parent) / "projector.json"
        if model is None and cfg_file.is_file():
            model = json.loads(cfg_file.read_text()).get("vision_model")
    embedder = _tower_for(c, components, model)
    if c.get("projector"):
        if embedder is None:
            raise ABError("set vision.name (and vision.weights) to the tower the projector was trained on")
        projector = open_projector(c["projector"], embedder, device=str(components.sampler.device))
    d = c["detail"]
    ws = int(d["working_size"])
    if ws % 8 or ws < 8:
        raise ABError(f"detail.working_size={ws}: must be a positive multiple of 8")
    ctx = Context(components, embedder, vault, projector, dict(c.get("retrieval") or {}),
                  SamplerSettings(int(d["steps"]), float(d["strength"]), float(d["cfg"]), str(d.get("sampler", "euler"))),
                  ws, max(1, int(d.get("batch_size") or 4)), int(c["seed"]), c.get("negative"),
                  dict(c.get("ip_adapter") or {}))
    have = {"vault": vault is not None, "projector": projector is not None,
            "ip_adapter": bool((c.get("ip_adapter") or {}).get("weights"))}
    return ctx, have


def evaluate(ctx: Context, arms: list[Arm], crops: list[Crop], user_prompt, oracle, text_fn,
             ret: dict | None = None, on_arm: Callable | None = None) -> tuple[list[dict], dict]:
    """Refine and score `crops` under every arm; returns (result rows, {arm: refined images})."""
    from tqdm.auto import tqdm

    rows, images = [], {}
    loaded_ip = False
    try:
        for arm in tqdm(arms, desc="luna ab: arms", unit="arm", disable=len(arms) < 2):
            if arm.ip and not loaded_ip:
                _load_ip(ctx)
                loaded_ip = True
            refined, secs, recs = refine_crops(ctx, arm, crops, user_prompt, ret)
            prompts = [c.prompt if user_prompt is None else user_prompt for c in crops]
            scores = score(ctx, crops, refined, oracle, text_fn, prompts)
            images[arm.name] = refined
            for i, (s, sec, rec) in enumerate(zip(scores, secs, recs)):
                rows.append({"crop": i, "arm": arm.name, **{m: s.get(m) for m in METRICS if m != "seconds"},
                             "seconds": sec, "conditioning": rec})
            if on_arm:
                on_arm(arm, refined)
    finally:
        if loaded_ip:
            ctx.components.pipe.unload_ip_adapter()
    return rows, images


def _load_ip(ctx: Context) -> None:
    from lsd_runtime.ip_adapter import IPAdapterError, load_ip_adapter

    dim = load_ip_adapter(ctx.components.pipe, ctx.ip["weights"], float(ctx.ip.get("scale", 0.6)))
    if ctx.embedder is None or dim != ctx.embedder.dim:
        got = f"{ctx.embedder.model_id!r} gives {ctx.embedder.dim}-d" if ctx.embedder else "no vision tower is set"
        ctx.components.pipe.unload_ip_adapter()
        raise IPAdapterError(f"{ctx.ip['weights']}: the IP-Adapter takes {dim}-d image embeddings, {got} "
                             "(set vision.name / vision.weights)")


def run_ab(out, *, crops=None, images=None, shards=None, checkpoint=None, preset=None, vault=None, projector=None,
           ip_adapter=None, arms=None, oracle=None, prompt=None, config: dict | None = None, **overrides) -> ABResult:
    """`luna ab` as a function (the demo's entry point). Returns the summary and the written paths.

    `crops`: a list of `Crop` (or PIL images) to use as they are; else `images=` (paths) or
    `shards=` (folder). `config` is a full plain config (conf/ab.yaml composed); keyword
    `overrides` use dotted keys with "__" for "." (detail__steps=2).
    """
    from luna.cli import compose
    from luna.settings import plain

    c = plain(compose("ab", [f"preset={preset}"] if preset else [])) if config is None else json.loads(json.dumps(config))
    c.update({k: v for k, v in {"checkpoint": checkpoint, "preset": preset, "vault": vault, "projector": projector,
                                "oracle": oracle, "prompt": prompt}.items() if v is not None})
    c["out"] = str(out)
    if arms is not None:
        c["arms"] = list(arms)
    if ip_adapter is not None:
        c["ip_adapter"]["weights"] = str(ip_adapter)
    if images is not None:
        c["crops"]["images"] = [str(p) for p in images] if isinstance(images, (list, tuple)) else str(images)
    if shards is not None:
        c["crops"]["shards"] = str(shards)
    for k, v in overrides.items():
        node, parts = c, k.split("__")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = v
    return run(c, crops=crops)


DEMO_ARMS = ("none", "generic", "vault", "projector", "hybrid")


def demo_stage(out, *, shards, vault=None, projector=None, pairs=None, split: str = "val", val_prompts: float = 0.1,
               val_checkpoints: int = 1, combinations=None, preset: str = "tiny", n: int = 4, size: int = 64,
               oracle=None, degrade=None, seed: int = 0, arms=DEMO_ARMS, **overrides) -> dict:
    """What `luna demo` runs: `luna ab` on `n` held-out crops of its own shards (with `pairs`: images of
    the projector's validation split `split`, split exactly as `luna train` split them, so the same
    `val_prompts` / `val_checkpoints` / `seed`) under the arms it has. Writes OUT/ab.json, ab.html,
    summary.md, images/; returns `ABResult.as_dict()` (the report shows `render_section(d["paths"]["ab_json"])`)."""
    crops = {"n": n, "size": size, "degrade": degrade}
    if pairs is not None:
        crops.update(pairs=str(pairs), split=split, val_prompts=val_prompts, val_checkpoints=val_checkpoints,
                     combinations=combinations or [])
    c_over = {f"crops__{k}": v for k, v in crops.items()}
    res = run_ab(out, shards=shards, vault=vault, projector=projector, preset=preset, oracle=oracle, arms=list(arms),
                 seed=seed, detail__working_size=size, **c_over, **overrides)
    return res.as_dict()


def with_tuned(arms: list[Arm], tuned: list[Arm]) -> list[Arm]:
    """The run's arms with tune=true's two: its `vault` (routed by label as the search was, global
    settings) in place of the plain one (or added), then `vault_tuned`; IP-Adapter arms stay last, since
    loading the adapter changes the UNet for every later call."""
    base, tuned_arm = tuned
    out = [base if a.name == "vault" else a for a in arms]
    if base not in out:
        out.append(base)
    out.append(tuned_arm)
    return sorted(out, key=lambda a: a.ip)  # stable


def check_config(c: dict) -> None:
    """The settings `luna ab` can refuse before loading anything: arm names, the working size, tune_*."""
    unknown = [a for a in (c.get("arms") or ARMS) if a not in ARMS]
    if unknown:
        raise ABError(f"arms: unknown {unknown}; known {list(ARMS)}")
    ws = int(c["detail"]["working_size"])
    if ws % 8 or ws < 8:
        raise ABError(f"detail.working_size={ws}: must be a positive multiple of 8")
    if c.get("tune"):
        from lsd_runtime.tune import check_settings

        try:
            check_settings(c)
        except ValueError as e:
            raise ABError(str(e)) from e


def run(c: dict, crops: list | None = None) -> ABResult:
    """The task body over a plain config dict."""
    out = Path(str(c["out"]))
    if crops is None:
        crops = load_crops(c)
    else:
        crops = [cr if isinstance(cr, Crop) else Crop(f"crop{i:03d}", square(cr, int(c["crops"]["size"])),
                                                      square(cr, int(c["crops"]["size"])))
                 for i, cr in enumerate(crops)]
    if not crops:
        raise ABError("no crops to compare")
    check_config(c)  # before any model is loaded
    ctx, have = prepare(c)
    arms, missing = plan_arms(c, have)
    if not arms:
        raise ABError(f"no arm can run: {missing}")
    oracle = load_oracle(c.get("oracle"))
    if oracle is not None:
        from lsd_runtime.arms import as_attributes

        for cr in crops:
            cr.truth = cr.truth or as_attributes(oracle(cr.original))
    text_fn = text_side(ctx.embedder.tower) if ctx.embedder is not None else None
    out.mkdir(parents=True, exist_ok=True)
    tuned = None
    eval_crops = crops
    if c.get("tune"):
        from lsd_runtime.tune import tune_categories

        if ctx.vault is None:
            raise ABError("tune=true searches the vault's per-category settings: give vault=DIR")
        tuned = tune_categories(ctx, c, crops, oracle, text_fn, out)
        eval_crops = tuned["eval_crops"]
        arms = with_tuned(arms, tuned["arms"])
    rows, images = evaluate(ctx, arms, eval_crops, c.get("prompt"), oracle, text_fn)
    return write_outputs(c, out, eval_crops, arms, missing, rows, images, tuned)


# ---------------------------------------------------------------------- outputs


def _png(img: Image.Image, path: Path) -> Path:
    from luna.files import save_png_atomic

    return save_png_atomic(img, path)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def write_outputs(c: dict, out: Path, crops, arms, missing, rows, images, tuned=None) -> ABResult:
    from luna.files import atomic_path, write_json_atomic

    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    crop_rows = []
    for i, cr in enumerate(crops):
        rel = f"images/{i:03d}_input.png"
        _png(cr.image, out / rel)
        crop_rows.append({"index": i, "key": cr.key, "prompt": cr.prompt, "label": cr.label, "truth": cr.truth,
                          "input": rel})
    for r in rows:
        rel = f"images/{r['crop']:03d}_{_safe(r['arm'])}.png"
        _png(images[r["arm"]][r["crop"]], out / rel)
        r["image"] = rel
    metrics = [m for m in METRICS if any(r.get(m) is not None for r in rows)]
    summary = abstats.summarise(rows, metrics, "none", seed=int(c.get("seed", 0)))
    arm_names = [a.name for a in arms]
    record = {"format_version": FORMAT_VERSION, "arms": arm_names, "missing": missing, "metrics": metrics,
              "crops": crop_rows, "results": rows, "summary": summary,
              "settings": {k: c.get(k) for k in ("checkpoint", "preset", "vault", "projector", "seed", "prompt",
                                                 "generic_prompt", "oracle")}
              | {"detail": c.get("detail"), "retrieval": c.get("retrieval"), "hybrid": c.get("hybrid"),
                 "crops": {k: v for k, v in (c.get("crops") or {}).items()}}}
    if tuned:
        record["tune"] = {k: v for k, v in tuned.items() if k not in ("eval_crops", "arms")}
        pair = [r for r in rows if r["arm"] in ("vault", "vault_tuned")]  # tuned vs the global setting, same crops
        record["tune"]["vs_default"] = abstats.summarise(pair, metrics, "vault", seed=int(c.get("seed", 0))).get(
            "vault_tuned", {})
    paths = {"ab_json": out / "ab.json", "summary_md": out / "summary.md", "html": out / "ab.html",
             "images": img_dir, "wandb": None, "settings": Path(tuned["settings_file"]) if tuned else None}
    with atomic_path(paths["summary_md"]) as tmp:
        Path(tmp).write_text(summary_markdown(record))
    page = "<!doctype html><html><head><meta charset='utf-8'><title>luna ab</title></head><body>" \
           + render_section(record, out) + "</body></html>"
    with atomic_path(paths["html"]) as tmp:
        Path(tmp).write_text(page)
    if (c.get("logger") or {}).get("wandb"):
        paths["wandb"] = log_wandb(record, out, (c.get("logger") or {}).get("project", "luna-ab"))
    record["files"] = {k: (str(Path(v).relative_to(out)) if v and Path(v).is_relative_to(out) else v)
                       for k, v in paths.items()}
    write_json_atomic(paths["ab_json"], record, default=str)  # the json last: a folder with ab.json is complete
    return ABResult(summary, paths, arm_names, missing, record)


METRIC_LABELS = {"cos_in": "fidelity (vision cos)", "clip_text": "text-image", "psnr": "PSNR", "ssim": "SSIM",
                 "oracle_acc": "oracle acc", "oracle_joint": "oracle joint", "seconds": "s / crop"}


def summary_markdown(record: dict) -> str:
    metrics, summ = record["metrics"], record["summary"]
    lines = ["# luna ab", "", "Means with bootstrap 95% intervals over crops; Δ = paired difference to `none`.", ""]
    head = ["arm"] + [METRIC_LABELS.get(m, m) for m in metrics] + [f"Δ {METRIC_LABELS.get(m, m)}" for m in metrics
                                                                   if m != "seconds"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in record["arms"]:
        s = summ.get(arm, {})
        cells = [arm] + [abstats.fmt(s.get(m)) for m in metrics]
        cells += [abstats.fmt((s.get(m) or {}).get("diff")) for m in metrics if m != "seconds"]
        lines.append("| " + " | ".join(cells) + " |")
    t = record.get("tune")
    if t:
        m = t["metric"]
        lines += ["", f"## Per-category tuning ({t['method']}, metric `{m}`, rule `{t.get('rule', 'best')}`, "
                  f"{len(t['search_indices'])} search crops, {len(t['eval_indices'])} evaluation crops)", "",
                  "| category | n | default | search's best | its paired gain (one-sided bound) | kept | settings |",
                  "|---|---|---|---|---|---|---|"]
        for cat, e in t["categories"].items():
            top, g = e.get("search_best") or {}, e.get("gain") or {}
            gain = (f"{g['mean']:+.4f} (> {g['low']:+.4f} at {100 * g['level']:.2f}%)"
                    if g and g.get("mean") == g.get("mean") else "-")
            lines.append(f"| {cat} | {e['n']} | {e['default_score']:.4f} | {top.get('score', e['best_score']):.4f} | "
                         f"{gain} | {'tuned' if e.get('departed', True) else 'global'} | {e['best']} |")
        d = (t.get("vs_default", {}).get(m) or {}).get("diff")
        lines += ["", f"`vault_tuned` - `vault` on the evaluation crops, `{m}`: {abstats.fmt(d)}",
                  f"Settings file: `{t['settings_file']}`"]
    if record.get("missing"):
        lines += ["", "Arms left out (missing inputs): " + "; ".join(f"`{a}`: {r}" for a, r in record["missing"].items())]
    return "\n".join(lines) + "\n"


def _data_uri(path: Path, side: int = 128) -> str:
    img = Image.open(path).convert("RGB")
    if max(img.size) != side:
        img = img.resize((side, side), Image.NEAREST if max(img.size) < side else Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


CSS = """<style>
.luna-ab table{border-collapse:collapse;font:12px sans-serif;margin:8px 0}
.luna-ab td,.luna-ab th{border:1px solid #ccc;padding:4px;vertical-align:top;text-align:center}
.luna-ab .sc{font-size:11px;color:#333;text-align:left;white-space:nowrap}
.luna-ab .pos{color:#070}.luna-ab .neg{color:#a00}.luna-ab .miss{color:#a60}
.luna-ab caption{text-align:left;font-weight:bold}
</style>"""


def render_section(record, root=None, thumb: int = 128) -> str:
    """The HTML fragment of an `ab.json` record (dict or path): the per-arm table with intervals and
    paired differences, the arms left out, and the grid (input, then one column per arm, scores under
    each). Images are inlined (data URIs), so the fragment can be pasted into any page."""
    if not isinstance(record, dict):
        root = Path(record).parent if root is None else root
        record = json.loads(Path(record).read_text())
    root = Path(root) if root is not None else Path(".")
    esc = html.escape
    metrics = record["metrics"]
    summ = record["summary"]
    parts = [CSS, '<div class="luna-ab">']
    head = "".join(f"<th>{esc(METRIC_LABELS.get(m, m))}</th>" for m in metrics)
    dhead = "".join(f"<th>Δ {esc(METRIC_LABELS.get(m, m))}</th>" for m in metrics if m != "seconds")
    parts.append("<table><caption>Per arm: mean [95% bootstrap interval]; Δ = paired difference to "
                 f"<code>none</code> (green: interval above 0)</caption><tr><th>arm</th>{head}{dhead}</tr>")
    for arm in record["arms"]:
        s = summ.get(arm, {})
        cells = "".join(f"<td>{esc(abstats.fmt(s.get(m)))}</td>" for m in metrics)
        for m in metrics:
            if m == "seconds":
                continue
            d = (s.get(m) or {}).get("diff")
            cls = "pos" if d and d["low"] > 0 else "neg" if d and d["high"] < 0 else ""
            cells += f'<td class="{cls}">{esc(abstats.fmt(d))}</td>'
        parts.append(f"<tr><th>{esc(arm)}</th>{cells}</tr>")
    parts.append("</table>")
    if record.get("missing"):
        items = "".join(f"<li><b>{esc(a)}</b>: {esc(r)}</li>" for a, r in record["missing"].items())
        parts.append(f'<p class="miss">Arms left out (missing inputs):</p><ul class="miss">{items}</ul>')
    by = {(r["crop"], r["arm"]): r for r in record["results"]}
    parts.append("<table><caption>Crops: input, then one column per arm</caption><tr><th>input</th>"
                 + "".join(f"<th>{esc(a)}</th>" for a in record["arms"]) + "</tr>")
    short = {"cos_in": "cos", "clip_text": "txt", "psnr": "psnr", "ssim": "ssim", "oracle_acc": "oracle",
             "seconds": "s"}
    for cr in record["crops"]:
        label = esc(f"{cr.get('label') or ''} {cr.get('prompt') or ''}".strip()[:80])
        row = [f'<td><img src="{_data_uri(root / cr["input"], thumb)}" width="{thumb}"><div class="sc">{label}</div></td>']
        for arm in record["arms"]:
            r = by.get((cr["index"], arm))
            if r is None:
                row.append("<td>-</td>")
                continue
            sc = "<br>".join(f"{short[m]} {r[m]:.3f}" for m in short if r.get(m) is not None)
            row.append(f'<td><img src="{_data_uri(root / r["image"], thumb)}" width="{thumb}">'
                       f'<div class="sc">{sc}</div></td>')
        parts.append("<tr>" + "".join(row) + "</tr>")
    parts.append("</table></div>")
    return "\n".join(parts)


def log_wandb(record: dict, out: Path, project: str) -> str | None:
    """A W&B run (offline unless WANDB_MODE=online) with the grid as a table and the summary."""
    import os

    import wandb

    mode = "online" if os.environ.get("WANDB_MODE", "offline").lower() == "online" else "offline"
    run = wandb.init(project=project, dir=str(out), mode=mode, job_type="ab", reinit=True,
                     config={"arms": record["arms"], "missing": record["missing"]})
    try:
        cols = ["crop", "key", "arm", "image"] + record["metrics"]
        table = wandb.Table(columns=cols)
        keys = {c["index"]: c["key"] for c in record["crops"]}
        for r in record["results"]:
            table.add_data(r["crop"], keys[r["crop"]], r["arm"], wandb.Image(str(out / r["image"])),
                           *[r.get(m) for m in record["metrics"]])
        flat = {f"{arm}/{m}": v["mean"] for arm, ms in record["summary"].items() for m, v in ms.items()}
        run.log({"ab": table, **flat})
        return str(Path(run.dir).parent)
    finally:
        run.finish()


# ---------------------------------------------------------------------- CLI


def _task(cfg) -> None:
    from luna.settings import plain

    c = plain(cfg)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    res = run(c)
    print(f"luna ab: {len(res.arms)} arms ({', '.join(res.arms)}) on {len(res.record['crops'])} crops -> "
          f"{res.paths['ab_json']}, {res.paths['html']}")
    for arm, reason in res.missing.items():
        print(f"luna ab: arm {arm} left out: {reason}")
    if res.paths.get("settings"):
        print(f"luna ab: tuned per-category settings -> {res.paths['settings']}")


def main(argv: list[str] | None = None) -> int:
    from luna.cli import run_stage

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(__doc__.split("\n\n")[1])
        return 0
    return run_stage("luna ab", "ab", _task, argv, interrupted="nothing is written until every arm is done; run it again")


if __name__ == "__main__":
    sys.exit(main())
