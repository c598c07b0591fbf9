"""The pieces of `luna ab`: crops (images, shards, degradation), arms, refining a batch of crops under
one arm with the run's shared noise, and scoring the results (see lsd_runtime/ab.py).

Every arm refines the same crops with the same noise: crop i takes row i of one NoiseScaffold
(a slice per crop) and a seed derived from (run seed, i); only the conditioning differs.
"""
from __future__ import annotations

import importlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

from luna.models.vision import TextSide, text_agreement, text_side  # noqa: F401 (re-exported)

ARMS = ("none", "generic", "vault", "projector", "hybrid", "hybrid_gate", "hybrid_mix", "ip_adapter",
        "vault+ip_adapter")
METRICS = ("cos_in", "clip_text", "psnr", "ssim", "oracle_acc", "oracle_joint", "seconds")
DEGRADES = ("blur", "grey", "noise")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ABError(ValueError):
    """A setting or input of `luna ab` the user can fix (names the key or file)."""


# ---------------------------------------------------------------------- crops


@dataclass
class Crop:
    key: str
    image: Image.Image  # what every arm refines (degraded when crops.degrade is set)
    original: Image.Image  # before degradation: the oracle's ground truth comes from here
    prompt: str | None = None  # the sample's own prompt when known
    label: str = ""  # detection label (routes the crop to a vault category)
    truth: dict | None = None  # attribute -> value, from the sample's metadata when it has them


def square(img: Image.Image, size: int) -> Image.Image:
    """Centre square of `img`, Lanczos-resized to `size`."""
    w, h = img.size
    s = min(w, h)
    x0, y0 = (w - s) // 2, (h - s) // 2
    return img.convert("RGB").crop((x0, y0, x0 + s, y0 + s)).resize((size, size), Image.LANCZOS)


def degrade(img: Image.Image, kind: str | None, amount: float = 2.0, seed: int = 0) -> Image.Image:
    """A crop degraded on purpose, so refinement has something to restore."""
    if not kind:
        return img
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(float(amount)))
    if kind == "grey":
        return img.convert("L").convert("RGB")
    if kind == "noise":
        rng = np.random.default_rng(seed)
        arr = np.asarray(img, np.float32) + rng.normal(0, 8.0 * float(amount), (img.size[1], img.size[0], 3))
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    raise ABError(f"crops.degrade={kind!r}: choose null or one of {DEGRADES}")


def _image_files(spec) -> list[Path]:
    items = spec if isinstance(spec, (list, tuple)) else [spec]
    files: list[Path] = []
    for it in items:
        p = Path(str(it)).expanduser()
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."))
        elif p.is_file():
            files.append(p)
        else:
            raise ABError(f"crops.images: {p} is neither an image file nor a folder")
    if not files:
        raise ABError(f"crops.images={spec}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def crops_from_images(spec, size: int, label: str | None = None) -> list[Crop]:
    from lsd_runtime.workflow import read_image

    out = []
    for f in _image_files(spec):
        img = square(read_image(f), size)
        out.append(Crop(key=f.stem, image=img, original=img, prompt=None, label=label or ""))
    return out


def crops_from_shards(folder, size: int, n: int, seed: int = 0, keys: set | None = None,
                      label: str | None = None) -> list[Crop]:
    """`n` samples of a shards folder (seeded choice; only `keys` when given), their prompts and labels."""
    from factory.shards import CorruptShard, complete_shards, read_shard

    shards = complete_shards(folder)
    if not shards:
        raise ABError(f"crops.shards={folder}: no finished shards (*.tar with a _stats.json)")
    found = []
    for path in shards:
        try:
            samples = list(read_shard(path))
        except CorruptShard as e:
            raise ABError(f"{path}: {e}") from e
        for s in samples:
            if keys is not None and s["__key__"] not in keys:
                continue
            ext = next((e for e in ("png", "jpg", "webp") if e in s), None)
            if ext is None:
                continue
            found.append((path, s["__key__"], ext))
    if not found:
        raise ABError(f"crops.shards={folder}: no image samples" + (" of the chosen split" if keys is not None else ""))
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.permutation(len(found))[: int(n)].tolist())
    wanted = {(str(found[i][0]), found[i][1]): found[i][2] for i in chosen}
    out = []
    for path in dict.fromkeys(str(found[i][0]) for i in chosen):
        for s in read_shard(path):
            ext = wanted.get((path, s["__key__"]))
            if ext is None:
                continue
            meta = json.loads(s["json"]) if "json" in s else {}
            prompt = s["txt"].decode() if "txt" in s else meta.get("prompt")
            img = square(Image.open(io.BytesIO(s[ext])), size)
            cat = str(meta.get("category") or "")
            truth = meta.get("attributes") if isinstance(meta.get("attributes"), dict) else None
            out.append(Crop(key=s["__key__"], image=img, original=img, prompt=prompt,
                            label=label or cat.split("/")[0], truth=truth))
    return out


def crops_te_fingerprint(c: dict) -> str | None:
    """The `data.te_fingerprint` the projector's pairs were split with (it changes every split): the one
    its projector.json records (`trained.data`, exports since the split settings are recorded), else
    `crops.te_fingerprint` as configured (null: all fingerprints; a `wandb:` projector or an older
    export records none, so set it to the training's `data.te_fingerprint`). A configured one that
    differs from the recorded one is an error: those crops would not be the projector's held-out images."""
    configured = (c.get("crops") or {}).get("te_fingerprint")
    data = {}
    if c.get("projector") and not str(c["projector"]).startswith("wandb:"):
        path = Path(str(c["projector"]))
        cfg_file = (path if path.is_dir() else path.parent) / "projector.json"
        if cfg_file.is_file():
            data = (json.loads(cfg_file.read_text()).get("trained") or {}).get("data") or {}
    if "te_fingerprint" not in data:
        return configured
    if configured is not None and configured != data["te_fingerprint"]:
        raise ABError(f"crops.te_fingerprint={configured!r}, but the projector ({c['projector']}) was trained with "
                      f"data.te_fingerprint={data['te_fingerprint']!r}: its held-out images are split from those; "
                      "leave crops.te_fingerprint unset")
    return data["te_fingerprint"]


def load_crops(c: dict) -> list[Crop]:
    """The crops `crops.*` names: images, or a shards folder (optionally one pairs split), degraded on request."""
    cc = c["crops"]
    size = int(cc["size"])
    if size % 8 or size < 8:
        raise ABError(f"crops.size={size}: must be a positive multiple of 8")
    if cc.get("images"):
        crops = crops_from_images(cc["images"], size, cc.get("label"))[: int(cc["n"]) if cc.get("n") else None]
    elif cc.get("shards"):
        keys = None
        if cc.get("pairs"):
            from projector.splits import split_keys

            try:
                keys = set(split_keys(cc["pairs"], cc.get("split") or "val", combinations=cc.get("combinations"),
                                      val_prompts=float(cc.get("val_prompts", 0.1)),
                                      val_checkpoints=int(cc.get("val_checkpoints", 1)), seed=int(c["seed"]),
                                      te_fingerprint=crops_te_fingerprint(c)))
            except ValueError as e:
                raise ABError(f"crops.pairs={cc['pairs']}: {e}") from e
        crops = crops_from_shards(cc["shards"], size, int(cc["n"]), int(c["seed"]), keys, cc.get("label"))
    else:
        raise ABError("give crops.images=PATH (an image, a folder or a list) or crops.shards=DIR")
    for i, cr in enumerate(crops):
        cr.image = degrade(cr.original, cc.get("degrade"), float(cc.get("degrade_amount", 2.0)), int(c["seed"]) + i)
    return crops


# ---------------------------------------------------------------------- oracle and tower


def load_oracle(spec) -> Callable | None:
    """`module:function` (image -> {attribute: value}) or a callable; None when not configured."""
    if spec in (None, "", "none"):
        return None
    if callable(spec):
        return spec
    mod, _, fn = str(spec).partition(":")
    try:
        return getattr(importlib.import_module(mod), fn or "oracle")
    except (ImportError, AttributeError) as e:
        raise ABError(f"oracle={spec!r}: cannot import it ({e}); give module:function") from e


def as_attributes(reading) -> dict:
    """An oracle's answer as {attribute: value}, unreadable (None) attributes left out: a dict, an object
    with `as_dict()` (the toy oracle's Reading), or a dataclass."""
    import dataclasses

    if isinstance(reading, dict):
        d = reading
    elif hasattr(reading, "as_dict"):
        d = reading.as_dict()
    elif dataclasses.is_dataclass(reading):
        d = dataclasses.asdict(reading)
    else:
        d = dict(vars(reading))
    return {k: v for k, v in d.items() if v is not None}


def oracle_scores(oracle, image: Image.Image, truth: dict) -> tuple[float, float]:
    """(fraction of the truth's attributes the oracle reads off `image`, 1.0 if all of them else 0.0)."""
    got = as_attributes(oracle(image))
    hits = [str(got.get(k)) == str(v) for k, v in truth.items()]
    return (float(np.mean(hits)) if hits else float("nan")), float(all(hits)) if hits else float("nan")


# ---------------------------------------------------------------------- arms


@dataclass
class Arm:
    name: str
    prompt: str | None = None  # None: the crop's user prompt; a string: this prompt for every crop
    memory: str | None = None  # None | vault | projector | hybrid
    ip: bool = False
    hybrid: dict = field(default_factory=dict)
    ret: dict | None = None  # retrieval settings of this arm (tuned arms); None: the run's


def plan_arms(c: dict, have: dict) -> tuple[list[Arm], dict[str, str]]:
    """The arms to run and, for each requested arm that cannot run, why (its missing input)."""
    requested = list(c.get("arms") or ARMS)
    unknown = [a for a in requested if a not in ARMS]
    if unknown:
        raise ABError(f"arms: unknown {unknown}; known {list(ARMS)}")
    needs = {"vault": ["vault"], "projector": ["projector"], "hybrid": ["vault", "projector"],
             "hybrid_gate": ["vault", "projector"], "hybrid_mix": ["vault", "projector"],
             "ip_adapter": ["ip_adapter"], "vault+ip_adapter": ["vault", "ip_adapter"]}
    keys = {"vault": "vault=DIR", "projector": "projector=DIR", "ip_adapter": "ip_adapter.weights=FILE"}
    arms, missing = [], {}
    hyb = dict(c.get("hybrid") or {})
    for name in requested:
        lack = [keys[n] for n in needs.get(name, []) if not have.get(n)]
        if lack:
            missing[name] = "no " + " and no ".join(lack) + " given"
            continue
        if name == "none":
            arms.append(Arm(name))
        elif name == "generic":
            arms.append(Arm(name, prompt=str(c["generic_prompt"])))
        elif name in ("vault", "projector"):
            arms.append(Arm(name, memory=name))
        elif name.startswith("hybrid"):
            policy = name.partition("_")[2] or hyb.get("policy", "gate")
            arms.append(Arm(name, memory="hybrid", hybrid={**hyb, "policy": policy}))
        elif name == "ip_adapter":
            arms.append(Arm(name, ip=True))
        else:
            arms.append(Arm(name, memory="vault", ip=True))
    arms.sort(key=lambda a: a.ip)  # IP-Adapter arms last: loading it changes the UNet for every later call
    return arms, missing


# ---------------------------------------------------------------------- refinement


@dataclass
class Context:
    """The loaded models and settings one `luna ab` run shares across arms."""

    components: object
    embedder: object | None
    vault: object | None
    projector: object | None
    ret: dict
    sampler_settings: object
    working: int
    batch_size: int
    seed: int
    negative: str | None
    ip: dict = field(default_factory=dict)
    _texts: dict = field(default_factory=dict)

    def text(self, prompt: str):
        from lsd_runtime.conditioning import TextSource

        if prompt not in self._texts:
            self._texts[prompt] = TextSource(self.components.encoders, prompt, self.negative,
                                             force_zeros_for_empty_prompt=self.components.sampler.force_zeros_for_empty_prompt)
        return self._texts[prompt]

    def source(self, arm: Arm, prompt: str, ret: dict | None = None):
        from lsd_runtime.categories import memory_source
        from lsd_runtime.conditioning import WithImageEmbeds

        text = self.text(prompt)
        src = text
        if arm.memory:
            src = memory_source(ret or self.ret, text, self.embedder,
                                vault=self.vault if arm.memory in ("vault", "hybrid") else None,
                                projector=self.projector if arm.memory in ("projector", "hybrid") else None,
                                hybrid=arm.hybrid, te_fingerprint=self.components.te_fingerprint)  # hashed once a run
        return WithImageEmbeds(src, self.embedder) if arm.ip else src


class _Label:
    def __init__(self, label):
        self.label = label


def refine_crops(ctx: Context, arm: Arm, crops: list[Crop], user_prompt, ret: dict | None = None):
    """Refine every crop under `arm`: (images at crop size, seconds per crop, conditioning records)."""
    import torch

    from lsd_runtime.categories import rows_for
    from lsd_runtime.sampler import DenoiseItem, sampler_denoiser, time_ids
    from lsd_runtime.scaffold import NoiseScaffold, derived_generator

    ws, lat = ctx.working, ctx.working // 8
    scaffold = NoiseScaffold(ctx.seed, (ws, ws * len(crops)))  # crop i takes row i: same slice in every arm
    denoise = sampler_denoiser(ctx.components.sampler, ctx.sampler_settings, ctx.text("").negative_row)
    outs, secs, records = [None] * len(crops), [0.0] * len(crops), [None] * len(crops)
    views = [c.image.resize((ws, ws), Image.LANCZOS) for c in crops]
    for lo in range(0, len(crops), ctx.batch_size):
        idx = list(range(lo, min(lo + ctx.batch_size, len(crops))))
        t = time.perf_counter()
        rows: dict[int, object] = {}
        prompts = {i: (arm.prompt if arm.prompt is not None else _prompt_of(crops[i], user_prompt)) for i in idx}
        for p in dict.fromkeys(prompts.values()):
            group = [i for i in idx if prompts[i] == p]
            got = rows_for(ctx.source(arm, p, ret or arm.ret), [views[i] for i in group], [_Label(crops[i].label) for i in group])
            rows.update(zip(group, got))
        items = [DenoiseItem(image=np.asarray(views[i], dtype=np.float32),
                             noise=scaffold.slice((0, i * ws, ws, (i + 1) * ws), (lat, lat)), row=rows[i],
                             seed=int(derived_generator("ab", ctx.seed, i).initial_seed()),
                             time_ids=time_ids((ws, ws))[0]) for i in idx]
        with torch.no_grad():
            out = denoise(items)
        per = (time.perf_counter() - t) / len(idx)
        for i, o in zip(idx, out):
            img = Image.fromarray(np.clip(np.rint(o), 0, 255).astype(np.uint8))
            outs[i] = img.resize(crops[i].image.size, Image.LANCZOS) if img.size != crops[i].image.size else img
            secs[i], records[i] = per, {"prompt": prompts[i], **rows[i].to_json()}
    return outs, secs, records


def _prompt_of(crop: Crop, user_prompt) -> str:
    if user_prompt is not None:
        return str(user_prompt)
    return crop.prompt or ""


# ---------------------------------------------------------------------- scoring


def score(ctx: Context, crops: list[Crop], refined: list[Image.Image], oracle, text_fn, prompts) -> list[dict]:
    """Per-crop metrics of `refined` against the inputs (see the module docstring)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    out = [dict() for _ in crops]
    if ctx.embedder is not None:
        import torch

        a = torch.nn.functional.normalize(ctx.embedder([c.image for c in crops]).float(), dim=-1)
        b = torch.nn.functional.normalize(ctx.embedder(refined).float(), dim=-1)
        for i, v in enumerate((a * b).sum(-1).tolist()):
            out[i]["cos_in"] = float(v)
        if text_fn is not None:
            known = [i for i, p in enumerate(prompts) if p]
            if known:
                t = text_fn([prompts[i] for i in known])
                for i, v in zip(known, text_agreement(b[known], t)):
                    out[i]["clip_text"] = v
    for i, (c, r) in enumerate(zip(crops, refined)):
        x, y = np.asarray(c.image), np.asarray(r)
        out[i]["psnr"] = float(min(peak_signal_noise_ratio(x, y, data_range=255), 100.0)) if not np.array_equal(x, y) else 100.0
        win = min(7, min(x.shape[:2]) // 2 * 2 - 1)
        out[i]["ssim"] = float(structural_similarity(x, y, channel_axis=2, data_range=255, win_size=win))
        if oracle is not None and c.truth:
            out[i]["oracle_acc"], out[i]["oracle_joint"] = oracle_scores(oracle, r, c.truth)
    return out
