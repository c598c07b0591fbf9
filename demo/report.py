"""`report.html`: the demo's results as one self-contained page, built from a plain results dict.

`build_report(results, out_dir)` draws the figures (a PIL sample grid, matplotlib curves and
bars, before/after face crops), writes every PNG to `out_dir/report/`, and writes
`out_dir/report.html` with the same PNGs inlined as base64 data URIs, so the page can be mailed
or opened from anywhere. Every section is optional: a missing key leaves its section out.

results (all plain JSON; image entries are paths of PNG/JPEG files):
  title, subtitle, created, command
  timings:   {stage: seconds}, resumed: [stages skipped because an earlier run finished them]
  campaign:  {name, images, rejected, shards, units, checkpoints: [{name, family, te_fingerprint}],
              counts: {job: {checkpoint: n}}, rejected_reasons: {reason: n}, images_per_s,
              samples: [{job, checkpoint, key, prompt, image}]}
  pairs:     luna pairs-info's dict (images, unique_prompts, bytes, bytes_per_sample, ...)
  vault:     {images, prompts, index, mode, bytes_per_image, categories: [...]}
  retrieval: [{title, sheet, neighbours: [{key, prompt, score, checkpoint}]}]
  training:  {history: [{step, epoch, "train/loss": .., "val/cos_content": .., ...}],
              metrics: {name: value}, parameters, model, wandb_run, epochs}
  refine:    {prompt, original, overlay, box: [x0, y0, x1, y1] px, detections: [...],
              variants: [{name, image, neighbours: [...], seconds}]}
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import shutil
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from luna.files import atomic_path, save_png_atomic

REPORT_NAME = "report.html"
FIGURES_DIR = "report"

# Training curves: (panel title, logged metrics, the vault k-NN baseline drawn as a dashed line).
CURVE_PANELS = (
    ("loss", ("train/loss", "val/loss"), None),
    ("held-out prompts: cosine to the true conditioning",
     ("val/cos_content", "val/cos_pad", "val/cos_pooled"), "val/knn_cos"),
    ("held-out checkpoint: cosine", ("val_ckpt/cos_content", "val_ckpt/cos_pooled"), "val_ckpt/knn_cos"),
)
# The projector against its baselines on the same validation split.
COMPARISON = (
    ("projector", "val/cos_content"),
    ("vault k-NN", "val/knn_cos"),
    ("shuffled targets", "val/cos_shuffled"),
    ("projector (held-out checkpoint)", "val_ckpt/cos_content"),
    ("vault k-NN (held-out checkpoint)", "val_ckpt/knn_cos"),
    ("shuffled (held-out checkpoint)", "val_ckpt/cos_shuffled"),
)
STAGE_COLOURS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]


# ----------------------------------------------------------------------------- small helpers


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _save_png(img: Image.Image, path: Path) -> Path:
    return save_png_atomic(img, path)


def _open_rgb(path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _fit(img: Image.Image, side: int) -> Image.Image:
    """Scale so the longer side is `side` (nearest-neighbour when enlarging tiny images a lot)."""
    s = side / max(img.size)
    size = (max(1, round(img.width * s)), max(1, round(img.height * s)))
    return img.resize(size, Image.NEAREST if s >= 2 else Image.LANCZOS)


def _fmt(x, digits: int = 3) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x):
            return "–"
        return f"{x:,.{digits}f}" if abs(x) < 1e5 else f"{x:,.0f}"
    return str(x)


def _bytes(n) -> str:
    n = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _esc(x) -> str:
    return html.escape(str(x), quote=True)


# ----------------------------------------------------------------------------- figures


def sample_grid(samples: list[dict], per_cell: int = 4, tile: int = 96) -> Image.Image:
    """Rows = jobs, columns = checkpoints; each cell shows up to `per_cell` samples, labelled."""
    jobs = sorted({s["job"] for s in samples})
    ckpts = sorted({s["checkpoint"] for s in samples})
    cols = max(1, min(per_cell, 2))
    rows_in_cell = math.ceil(per_cell / cols)
    gap, label_w, head_h = 4, 110, 28
    cell_w, cell_h = cols * tile + (cols - 1) * gap, rows_in_cell * tile + (rows_in_cell - 1) * gap
    width = label_w + len(ckpts) * (cell_w + 3 * gap) + gap
    height = head_h + len(jobs) * (cell_h + 3 * gap) + gap
    grid = Image.new("RGB", (width, height), (250, 250, 252))
    draw = ImageDraw.Draw(grid)
    font, bold = _font(12), _font(14)
    for c, ck in enumerate(ckpts):
        x = label_w + c * (cell_w + 3 * gap)
        draw.text((x + 2, 7), ck, fill=(30, 30, 60), font=bold)
    for r, job in enumerate(jobs):
        y = head_h + r * (cell_h + 3 * gap)
        draw.text((6, y + cell_h // 2 - 8), job, fill=(30, 30, 60), font=bold)
        for c, ck in enumerate(ckpts):
            x = label_w + c * (cell_w + 3 * gap)
            draw.rectangle([x - 2, y - 2, x + cell_w + 1, y + cell_h + 1], outline=(210, 210, 220))
            cell = [s for s in samples if s["job"] == job and s["checkpoint"] == ck][:per_cell]
            if not cell:
                draw.text((x + 6, y + cell_h // 2 - 6), "no samples", fill=(150, 150, 150), font=font)
            for i, s in enumerate(cell):
                img = _open_rgb(s["image"]).resize((tile, tile), Image.LANCZOS)
                grid.paste(img, (x + (i % cols) * (tile + gap), y + (i // cols) * (tile + gap)))
    return grid


def training_curves(history: list[dict]):
    """Loss and validation cosines against the optimiser step (matplotlib figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(13, 3.8), dpi=100)
    for ax, (title, names, baseline_key) in zip(axes, CURVE_PANELS):
        drawn = 0
        for name in names:
            pts = [(r["step"], r[name]) for r in history
                   if r.get(name) is not None and r.get("step") is not None and not _isnan(r[name])]
            if not pts:
                continue
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, lw=1.6, label=name)
            drawn += 1
        baseline = [r[baseline_key] for r in history if baseline_key and r.get(baseline_key) is not None]
        if baseline:
            ax.axhline(baseline[-1], color="black", ls="--", lw=1.2, label=f"vault k-NN ({baseline_key.split('/')[0]})")
            drawn += 1
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.tight_layout()
    return fig


def comparison_chart(metrics: dict):
    """Bars: the projector's cosine on held-out prompts against the vault k-NN and shuffled targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(label, float(metrics[key])) for label, key in COMPARISON if metrics.get(key) is not None]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * max(len(rows), 2) + 1.0), dpi=100)
    colours = ["#4C72B0" if lbl.startswith("projector") else "#55A868" if "k-NN" in lbl else "#AAAAAA"
               for lbl, _ in rows]
    ax.barh([r[0] for r in rows][::-1], [r[1] for r in rows][::-1], color=colours[::-1])
    for i, (_, v) in enumerate(rows[::-1]):
        ax.text(v, i, f" {v:.3f}", va="center", fontsize=8)
    ax.set_xlabel("content-token cosine to the true conditioning")
    ax.grid(axis="x", alpha=0.3)
    lo = min([0.0] + [v for _, v in rows])
    ax.set_xlim(lo, max([1.0] + [v * 1.15 for _, v in rows]))
    fig.tight_layout()
    return fig


def timing_chart(timings: dict, resumed=()):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(timings)
    vals = [float(timings[n]) for n in names]
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * max(len(names), 2) + 1.0), dpi=100)
    colours = [STAGE_COLOURS[i % len(STAGE_COLOURS)] for i in range(len(names))]
    ax.barh(names[::-1], vals[::-1], color=colours[::-1])
    for i, (n, v) in enumerate(zip(names[::-1], vals[::-1])):
        ax.text(v, i, f" {v:.1f} s" + (" (earlier run)" if n in resumed else ""), va="center", fontsize=8)
    ax.set_xlabel(f"seconds (total {sum(vals):.1f} s)")
    ax.set_xlim(0, max(vals + [1.0]) * 1.3)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def face_strip(images: list[tuple[str, Image.Image]], box, side: int = 220) -> Image.Image:
    """The same region (`box`, pixels, grown by 25 %) cut from each image, side by side, labelled."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    W, H = images[0][1].size
    grow = 0.25 * max(w, h)
    region = (max(0, int(x0 - grow)), max(0, int(y0 - grow)), min(W, int(x1 + grow)), min(H, int(y1 + grow)))
    gap, label_h = 8, 22
    strip = Image.new("RGB", (len(images) * (side + gap) - gap, side + label_h), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for i, (name, img) in enumerate(images):
        crop = img.crop(region).resize((side, side), Image.LANCZOS)
        strip.paste(crop, (i * (side + gap), label_h))
        draw.text((i * (side + gap) + 2, 3), name, fill=(30, 30, 60), font=_font(14))
    return strip


def _isnan(x) -> bool:
    try:
        return math.isnan(float(x))
    except (TypeError, ValueError):
        return True


def _save_fig(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return _save_png(Image.open(buf).convert("RGB"), path)


# ----------------------------------------------------------------------------- HTML


class _Page:
    """Collects sections; every image goes to report/NAME.png and inline as a data URI."""

    def __init__(self, fig_dir: Path):
        self.fig_dir = fig_dir
        self.parts: list[str] = []
        self.images: list[Path] = []

    def image(self, img_or_path, name: str, alt: str, css: str = "") -> str:
        dest = self.fig_dir / f"{name}.png"
        if isinstance(img_or_path, Image.Image):
            _save_png(img_or_path, dest)
        else:
            src = Path(img_or_path)
            if src.suffix.lower() == ".png":
                if src.resolve() != dest.resolve():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, dest)
            else:
                _save_png(_open_rgb(src), dest)
        self.images.append(dest)
        data = base64.b64encode(dest.read_bytes()).decode("ascii")
        style = f' style="{css}"' if css else ""
        return (f'<img src="data:image/png;base64,{data}" alt="{_esc(alt)}" title="{_esc(alt)}" '
                f'data-file="{FIGURES_DIR}/{_esc(dest.name)}"{style}>')

    def section(self, anchor: str, title: str, body: str) -> None:
        self.parts.append(f'<section id="{anchor}"><h2>{_esc(title)}</h2>\n{body}\n</section>')


def _table(rows: list[tuple], head: tuple | None = None, cls: str = "") -> str:
    out = [f'<table class="{cls}">']
    if head:
        out.append("<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr>")
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _kv(pairs: list[tuple[str, object]]) -> str:
    return _table([(_esc(k), _esc(_fmt(v))) for k, v in pairs], cls="kv")


def _stat_cards(items: list[tuple[str, object]]) -> str:
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="num">{_esc(_fmt(v))}</div><div class="lbl">{_esc(k)}</div></div>'
        for k, v in items) + "</div>"


def _neighbours_table(neighbours: list[dict]) -> str:
    cols = [("score", lambda n: f"{float(n.get('score', 0)):.3f}"), ("weight", lambda n: f"{float(n['weight']):.2f}"),
            ("checkpoint", lambda n: _esc(n["checkpoint"])), ("prompt", lambda n: _esc(n.get("prompt", ""))),
            ("attributes", lambda n: _esc(n["attributes"]))]  # toy: the query's attributes the neighbour shares
    cols = [(h, f) for h, f in cols if h in ("score", "prompt") or any(n.get(h) not in (None, "") for n in neighbours)]
    rows = [(str(i + 1), *[f(n) if h in ("score", "prompt") or n.get(h) not in (None, "") else "" for h, f in cols])
            for i, n in enumerate(neighbours)]
    return _table(rows, ("#", *[h for h, _ in cols]), cls="nb")


def _campaign_section(page: _Page, c: dict, per_cell: int) -> None:
    body = [_stat_cards([("images", c.get("images", 0)), ("rejected", c.get("rejected", 0)),
                         ("shards", c.get("shards", 0)), ("checkpoints", len(c.get("checkpoints", [])))])]
    if c.get("checkpoints"):
        body.append(_table([(_esc(k["name"]), _esc(k.get("family", "")), f"<code>{_esc(k.get('te_fingerprint', ''))[:12]}</code>")
                            for k in c["checkpoints"]], ("checkpoint", "family", "text-encoder fingerprint")))
    counts = c.get("counts") or {}
    if counts:
        ckpts = sorted({ck for per in counts.values() for ck in per})
        rows = [(_esc(job), *[_fmt(per.get(ck, 0)) for ck in ckpts], _fmt(sum(per.values())))
                for job, per in sorted(counts.items())]
        body.append("<h3>Images per job and checkpoint</h3>" + _table(rows, ("job", *ckpts, "total")))
    extra = [(k, c[k]) for k in ("name", "units", "images_per_s", "steps", "size") if c.get(k) is not None]
    if c.get("rejected_reasons"):
        extra.append(("rejection reasons", ", ".join(f"{k}: {v}" for k, v in c["rejected_reasons"].items())))
    if extra:
        body.append(_kv(extra))
    samples = c.get("samples") or []
    if samples:
        body.append("<h3>Samples per job (rows) and checkpoint (columns)</h3>")
        body.append(page.image(sample_grid(samples, per_cell), "samples_grid", "sample grid", "max-width:100%"))
        first = {}
        for s in samples:
            first.setdefault((s["job"], s["checkpoint"]), s)
        if c.get("preset") == "toy":
            from demo.toy_figures import sample_sheet

            body.append("<h3>Samples with their prompts and the oracle's reading</h3>")
            body.append(page.image(sample_sheet(samples), "samples_oracle", "samples read by the oracle", "max-width:100%"))
        body.append("<details><summary>prompts of the first sample in each cell</summary>" + _table(
            [(_esc(j), _esc(k), _esc(s.get("prompt", ""))) for (j, k), s in sorted(first.items())],
            ("job", "checkpoint", "prompt")) + "</details>")
    page.section("campaign", "1 · Campaign (factory)", "\n".join(body))


def _pairs_section(page: _Page, p: dict, v: dict | None) -> None:
    body = [_stat_cards([("images", p.get("images", 0)), ("unique prompts", p.get("unique_prompts", 0)),
                         ("bytes / sample", _bytes(p.get("bytes_per_sample", 0))),
                         ("pairs folder", _bytes(p.get("bytes", 0)))])]
    kv = [(k, p[k]) for k in ("vision_model", "vision_dim", "parts") if k in p]
    if "text_dims" in p:
        kv.append(("text dims", " + ".join(map(str, p["text_dims"])) if isinstance(p["text_dims"], list) else p["text_dims"]))
    for k, n in (p.get("text_encoders") or {}).items():
        kv.append((f"prompts encoded by {k[:12]}", n))
    body.append(_kv(kv))
    if p.get("categories"):
        body.append(_table([(_esc(k), _fmt(n)) for k, n in p["categories"].items()], ("category", "images")))
    page.section("pairs", "2 · Pairs (extraction)", "\n".join(body))
    if v:
        kv = [(k, v[k]) for k in ("images", "prompts", "index", "mode", "recall_at_10") if k in v]
        if "bytes_per_image" in v:
            kv.append(("bytes / image", _bytes(v["bytes_per_image"])))
        if v.get("categories"):
            kv.append(("category indices", ", ".join(v["categories"])))
        page.section("vault", "3 · Vault", _kv(kv))


def _retrieval_section(page: _Page, items: list[dict]) -> None:
    body = ["<p>Each row: the query crop, then its nearest vault images (score = cosine of the image "
            "embeddings). The conditioning the detailer receives is the blend of these prompts'.</p>"]
    for i, it in enumerate(items):
        body.append(f"<h3>{_esc(it.get('title', f'query {i + 1}'))}</h3>")
        if it.get("sheet"):
            body.append(page.image(it["sheet"], f"retrieval_{i}", it.get("title", "contact sheet"), "max-width:100%"))
        if it.get("neighbours"):
            body.append(_neighbours_table(it["neighbours"]))
    page.section("retrieval", "4 · Retrieval: what the vault finds for a crop", "\n".join(body))


def _training_section(page: _Page, t: dict) -> None:
    m = t.get("metrics") or {}
    body = [_stat_cards([("parameters", t.get("parameters", "–")), ("epochs", t.get("epochs", "–")),
                         ("val cos (content)", m.get("val/cos_content", float("nan"))),
                         ("vault k-NN cos", m.get("val/knn_cos", float("nan")))])]
    if t.get("history"):
        body.append(page.image(_save_fig(training_curves(t["history"]), page.fig_dir / "training_curves.png"),
                               "training_curves", "training curves", "max-width:100%"))
    if any(m.get(k) is not None for _, k in COMPARISON):
        body.append("<h3>Projector against the vault k-NN baseline (same validation split)</h3>")
        body.append(page.image(_save_fig(comparison_chart(m), page.fig_dir / "projector_vs_vault.png"),
                               "projector_vs_vault", "projector against vault baseline", "max-width:100%"))
        body.append(_table([(_esc(k), _fmt(float(v))) for k, v in sorted(m.items()) if not _isnan(v)],
                           ("metric", "value"), cls="kv"))
    labels = {"model": "model", "wandb_run": "W&B offline run", "run_dir": "run folder"}
    kv = [(labels[k], t[k]) for k in labels if t.get(k)]
    if t.get("wandb_run"):
        kv.append(("upload it", f"wandb sync {t['wandb_run']}"))
    if kv:
        body.append(_kv(kv))
    page.section("training", "5 · Projector training", "\n".join(body))


def _toy_refine_section(page: _Page, r: dict) -> None:
    st = r.get("settings") or {}
    body = [f"<p>{_fmt(st.get('n'))} held-out scenes of the toy world, rendered, then damaged on purpose "
            f"(Gaussian blur σ={_fmt(st.get('blur'), 1)} px, faded {_fmt(100 * float(st.get('fade', 0)), 0)}% towards grey) "
            f"and refined by img2img (the runtime's denoiser, {_fmt(st.get('steps'))} steps, strength "
            f"{_fmt(st.get('strength'), 2)}, cfg {_fmt(st.get('cfg'), 1)}, checkpoint {_esc(r.get('checkpoint', ''))}) "
            f"with the generic prompt <q>{_esc(st.get('prompt', ''))}</q> alone (text only), or blended "
            f"(weight {_fmt(st.get('weight'), 2)}) with the vault's {_fmt(st.get('k'))} neighbours or the projector's row "
            "for the damaged crop's embedding. The same noise for every arm. Under each image: the oracle's "
            "verdict on shape, colour, background, size and position.</p>"]
    if r.get("grid"):
        body.append(page.image(r["grid"], "toy_refinement", "degraded crops refined with each conditioning", "max-width:100%"))
    rows = [("clean render", r.get("clean", {}).get("accuracy")), ("degraded", r.get("degraded", {}).get("accuracy"))]
    rows += [(f"refined · {name}", arm.get("accuracy")) for name, arm in (r.get("arms") or {}).items()]
    body.append(_accuracy_table(rows))
    if r.get("vs_text"):
        body.append(_table([(f"{_esc(name)} − text only", _pct(d["diff"]), f"[{_pct(d['ci95'][0])}, {_pct(d['ci95'][1])}]",
                             _fmt(d["n"])) for name, d in r["vs_text"].items()],
                           ("joint accuracy, paired difference", "points", "bootstrap 95% CI", "crops")))
    page.section("refine", "6 · Refinement of degraded crops", "\n".join(body))


def _pct(x) -> str:
    return "–" if x is None or _isnan(x) else f"{100 * float(x):+.1f}" if float(x) < 0 else f"{100 * float(x):.1f}"


def _accuracy_table(rows: list[tuple[str, dict | None]], attributes=("shape", "color", "background", "size", "position")) -> str:
    """Rows of per-attribute and joint oracle accuracy (percent)."""
    shown = [a for a in attributes if any(acc and a in acc for _, acc in rows)]
    cells = [(_esc(name), *[_pct(acc.get(a)) if acc else "–" for a in shown],
              f"<b>{_pct(acc.get('joint'))}</b>" if acc else "–", _fmt(acc.get("n")) if acc and "n" in acc else "")
             for name, acc in rows]
    return _table(cells, ("", *shown, "joint", "n"))


def _quality_section(page: _Page, q: dict) -> None:
    body = ["<p>Every number below is read from pixels by the toy world's oracle "
            "(<code>luna/models/toy/oracle.py</code>, written from the world's rendering rules), on images "
            "and prompts the stage under test did not see, unless said otherwise. Percent.</p>"]
    gen = q.get("generation") or {}
    if gen:
        body.append("<h3>Generation: the factory's images against their prompts</h3>")
        rows = [(f"checkpoint {k}", v) for k, v in (gen.get("per_checkpoint") or {}).items()]
        rows.append(("all", gen.get("all")))
        body.append(_accuracy_table(rows))
    if q.get("vision_nn"):
        body.append("<h3>Vision tower: does an image's nearest neighbour (cosine) share its attributes?</h3>")
        body.append(_accuracy_table([("held-out renders, both styles", q["vision_nn"])],
                                    ("shape", "color", "background", "size", "position", "mark")))
    if q.get("vault"):
        v = q["vault"]
        body.append(f"<h3>Vault: precision@{_fmt(v.get('k'))} of the neighbours' prompt attributes for held-out renders</h3>")
        body.append(_accuracy_table([("held-out renders (prompts not in the vault)", v)]))
    if q.get("projector"):
        pr = q["projector"]
        body.append("<h3>Projector: images generated from the projected conditioning of held-out prompts' renders</h3>")
        body.append(_accuracy_table([(f"projected ({_esc(pr.get('model') or 'projector')})", dict(pr["projected"], n=pr.get("n"))),
                                     ("the prompt itself (upper bound)", dict(pr["prompt"], n=pr.get("n")))]))
        if pr.get("val_cos_content") is not None:
            body.append(_kv([("val cosine (content tokens, held-out prompts)", pr["val_cos_content"])]))
    ref = q.get("refinement")
    if ref:
        body.append("<h3>Refinement of degraded crops (section 6): joint accuracy per conditioning</h3>")
        rows = [("degraded", ref.get("degraded"))] + [(f"refined · {k}", v) for k, v in ref["arms"].items()]
        body.append(_accuracy_table(rows))
    page.section("quality", "7 · Meaning, measured by the oracle", "\n".join(body))


def _refine_section(page: _Page, r: dict) -> None:
    if r.get("kind") == "toy":
        _toy_refine_section(page, r)
        return
    body = []
    if r.get("prompt"):
        body.append(f"<p>Prompt: <q>{_esc(r['prompt'])}</q>"
                    + (f" · checkpoint {_esc(r['checkpoint'])}" if r.get("checkpoint") else "") + "</p>")
    if r.get("note"):
        body.append(f'<p class="note">{_esc(r["note"])}</p>')
    variants = r.get("variants") or []
    row = [("original", r["original"])] if r.get("original") else []
    if r.get("overlay"):
        row.append(("detections", r["overlay"]))
    row += [(f"refined · {v['name']}", v["image"]) for v in variants]
    figs = []
    for i, (name, path) in enumerate(row):
        slug = name.replace("refined · ", "refined_").replace(" ", "_")
        figs.append(f'<figure>{page.image(path, f"refine_{i}_{slug}", name)}<figcaption>{_esc(name)}</figcaption></figure>')
    if figs:
        body.append('<div class="row">' + "".join(figs) + "</div>")
    if r.get("box") and r.get("original") and variants:
        imgs = [("before", _open_rgb(r["original"]))] + [(v["name"], _open_rgb(v["image"])) for v in variants]
        body.append("<h3>The detected face, before and after</h3>")
        body.append(page.image(face_strip(imgs, r["box"]), "refine_face_strip", "face before and after"))
    if r.get("detections"):
        body.append(_table([(_esc(d.get("label", "")), f"{float(d.get('score', 0)):.2f}",
                             _esc(", ".join(f"{float(x):.3f}" for x in d.get("box", []))))
                            for d in r["detections"]], ("label", "score", "box (normalised x0, y0, x1, y1)")))
    for v in variants:
        if v.get("neighbours"):
            body.append(f"<h3>Conditioning of the face crop · {_esc(v['name'])}</h3>" + _neighbours_table(v["neighbours"]))
    page.section("refine", "6 · Refinement of a real photo", "\n".join(body))


def _ab_section(page: _Page, ab: dict) -> None:
    """`luna ab` inside the demo: its per-arm table and grid (lsd_runtime.ab.render_section), and each
    memory arm's oracle accuracy against the generic prompt (the toy world's target), paired by crop."""
    from lsd_runtime import abstats
    from lsd_runtime.ab import render_section

    path = Path(str((ab.get("paths") or {}).get("ab_json", "")))
    if not path.is_file():
        page.section("ab", "8 · A/B: the arms side by side", f"<p>ab.json not found: {_esc(path)}</p>")
        return
    record = json.loads(path.read_text())
    body = [f"<p>{len(record['crops'])} crops of the demo's own images whose prompts the projector held out, "
            f"degraded ({_esc(((record.get('settings') or {}).get('crops') or {}).get('degrade'))}) and refined from the same "
            "scaffold slice and seed under each arm (<code>luna ab</code>, docs/ab.md), every arm with the prompt "
            f"<i>{_esc((record.get('settings') or {}).get('prompt') or 'of its own sample')}</i> "
            f"(<code>generic</code>: <i>{_esc((record.get('settings') or {}).get('generic_prompt'))}</i>). Files: "
            f"<code>{_esc(path)}</code>, <code>{_esc(path.with_name('ab.html'))}</code>.</p>"]
    if "oracle_acc" in record["metrics"] and "generic" in record["arms"]:
        vs = abstats.summarise(record["results"], ["oracle_acc"], baseline="generic")
        rows = [(_esc(arm), abstats.fmt((vs.get(arm, {}).get("oracle_acc") or {}).get("diff")))
                for arm in record["arms"] if arm not in ("generic",)]
        body.append("<h3>Oracle accuracy against the generic prompt (paired by crop, 95% interval)</h3>"
                    + _table(rows, ("arm", "Δ oracle accuracy vs generic")))
    body.append(render_section(record, root=path.parent, thumb=96))
    page.section("ab", "8 · A/B: the arms side by side", "\n".join(body))


def _timing_section(page: _Page, timings: dict, resumed) -> None:
    body = [page.image(_save_fig(timing_chart(timings, resumed), page.fig_dir / "timings.png"), "timings",
                       "time per stage", "max-width:100%")]
    rows = [(_esc(k), f"{float(v):.1f} s", "earlier run" if k in resumed else "") for k, v in timings.items()]
    rows.append(("<b>total</b>", f"<b>{sum(float(v) for v in timings.values()):.1f} s</b>", ""))
    body.append(_table(rows, ("stage", "wall time", "")))
    page.section("timings", "9 · Time per stage", "\n".join(body))


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;background:#f3f4f8;color:#1d2233}
header{background:linear-gradient(90deg,#1d2b5a,#36508f);color:#fff;padding:22px 36px}
header h1{margin:0 0 4px;font-size:26px} header p{margin:2px 0;opacity:.85}
nav{padding:8px 36px;background:#fff;border-bottom:1px solid #dde}
nav a{margin-right:16px;color:#36508f;text-decoration:none;font-size:14px}
main{padding:8px 36px 40px;max-width:1200px}
section{background:#fff;border-radius:10px;padding:14px 22px 18px;margin:18px 0;box-shadow:0 1px 3px rgba(0,0,0,.08)}
h2{margin:4px 0 12px;font-size:20px;color:#1d2b5a} h3{font-size:15px;margin:16px 0 8px;color:#36508f}
table{border-collapse:collapse;margin:8px 0;font-size:13px} td,th{border-bottom:1px solid #e4e6ee;padding:4px 10px;text-align:left}
th{background:#f0f2f8} table.kv td:first-child{color:#555} table.nb td:last-child{max-width:640px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:6px 0 10px}
.card{background:#f0f3fb;border-radius:8px;padding:10px 16px;min-width:120px}
.card .num{font-size:22px;font-weight:600;color:#1d2b5a} .card .lbl{font-size:12px;color:#556}
.row{display:flex;gap:14px;flex-wrap:wrap} figure{margin:0} figure img{width:260px;border-radius:6px}
figcaption{font-size:13px;color:#445;text-align:center;margin-top:4px}
code{background:#eef;padding:1px 4px;border-radius:3px} footer{color:#778;font-size:12px;padding:0 36px 24px}
details{margin:6px 0;font-size:13px}
.flow{font-size:13px;color:#445;margin:14px 0 0}
.note{background:#fff7e0;border-left:4px solid #e0b030;padding:8px 12px;font-size:13px;border-radius:4px}
"""

# After load, count the images that decoded (naturalWidth > 0) and write the count into the page:
# the report test reads it back through Chromium's --dump-dom.
CHECK_SCRIPT = """
<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (im) { return im.complete && im.naturalWidth > 0; }).length;
  var el = document.getElementById('image-check');
  el.setAttribute('data-loaded', ok); el.setAttribute('data-total', imgs.length);
  el.textContent = ok + ' of ' + imgs.length + ' images loaded';
});
</script>
"""


def build_report(results: dict, out_dir) -> Path:
    """Write `out_dir/report.html` (self-contained) and its PNGs in `out_dir/report/`; returns the HTML path."""
    out_dir = Path(out_dir)
    fig_dir = out_dir / FIGURES_DIR
    fig_dir.mkdir(parents=True, exist_ok=True)
    page = _Page(fig_dir)
    per_cell = int((results.get("report") or {}).get("samples_per_cell", 4))
    if results.get("campaign"):
        _campaign_section(page, results["campaign"], per_cell)
    if results.get("pairs") or results.get("vault"):
        _pairs_section(page, results.get("pairs") or {}, results.get("vault"))
    if results.get("retrieval"):
        _retrieval_section(page, results["retrieval"])
    if results.get("training"):
        _training_section(page, results["training"])
    if results.get("refine"):
        _refine_section(page, results["refine"])
    if results.get("quality"):
        _quality_section(page, results["quality"])
    if results.get("ab"):
        _ab_section(page, results["ab"])
    if results.get("timings"):
        _timing_section(page, results["timings"], set(results.get("resumed") or ()))

    title = results.get("title", "Luna Foundry demo")
    created = results.get("created") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    sub = [_esc(results.get("subtitle", "the whole loop on the tiny preset")), f"created {_esc(created)}"]
    if results.get("timings"):
        total = sum(float(v) for v in results["timings"].values())
        sub.append(f"{len(results['timings'])} stages in {total:.0f} s"
                   + (f" ({len(results.get('resumed') or [])} finished by an earlier run)" if results.get("resumed") else ""))
    if results.get("command"):
        sub.append(f"<code style='background:rgba(255,255,255,.15);color:#fff'>{_esc(results['command'])}</code>")
    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in (
        ("campaign", "campaign"), ("pairs", "pairs"), ("vault", "vault"), ("retrieval", "retrieval"),
        ("training", "training"), ("refine", "refinement"), ("quality", "quality"), ("ab", "a/b"), ("timings", "timings"))
        if f'id="{a}"' in "".join(page.parts))
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>
<body><header><h1>{_esc(title)}</h1>{''.join(f'<p>{s}</p>' for s in sub)}</header>
<nav>{nav}</nav>
<main>
<p class="flow">campaign YAML → <b>factory</b> (Ray actors × checkpoints) → WebDataset shards → <b>extraction</b>
(image embeddings + SDXL conditionings) → pairs → <b>vault</b> (k-NN) and <b>projector</b> (learned) →
<b>detailer</b> (per-crop conditioning)</p>
{chr(10).join(page.parts)}
</main>
<footer>Luna Foundry · images also in <code>{FIGURES_DIR}/</code> beside this file ·
<span id="image-check" data-loaded="" data-total="{len(page.images)}">{len(page.images)} images</span></footer>
{CHECK_SCRIPT}
</body></html>
"""
    with atomic_path(out_dir / REPORT_NAME) as tmp:
        tmp.write_text(doc, encoding="utf-8")
    return out_dir / REPORT_NAME


def main(argv: list[str] | None = None) -> int:
    """`python -m demo.report RESULTS.json [OUT_DIR]`: rebuild a report from a saved results dict."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m demo.report DIR/demo/results.json [OUT_DIR]", file=sys.stderr)
        return 2
    results = json.loads(Path(argv[0]).read_text())
    out = Path(argv[1]) if len(argv) > 1 else Path(argv[0]).resolve().parent.parent
    print(build_report(results, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
