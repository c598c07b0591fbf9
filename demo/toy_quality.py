"""Meaning, measured: the toy preset's stages read by the toy world's oracle (luna/models/toy/oracle.py).

Used by the demo's report (preset=toy), benchmarks/toy_loop.py and tests/demo/test_toy_quality.py.
Every measure takes loaded models and files, never trains anything, and draws its held-out scenes
from render seeds at or above HELD_OUT_SEED (make-toy trains on seeds drawn below 2**31 from its own
RNG, so renders are new images; a held-out *prompt* is one absent from the pairs/vault).

  generation        oracle accuracy of generated images against their prompts (per attribute, joint)
  vision_nn         leave-one-out nearest-neighbour attribute agreement of image embeddings
  vault_precision   precision@k of the neighbours' prompt attributes for held-out renders
  projected_generation  images generated from a projector's conditioning for held-out prompts, read
                    by the oracle against those prompts (ridge, seed MLP, learned queries, ...)
  refinement        crops degraded on purpose (blurred and faded), refined by img2img with a generic
                    prompt (text only), vault and projector conditioning; oracle accuracy per arm and
                    the bootstrap CI of each arm's paired difference to text only
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageFilter

from luna.models.toy import oracle, world

HELD_OUT_SEED = 10**7  # render seeds of held-out scenes start here
GENERIC_PROMPT = "a shape on a background"  # the text-only arm: says nothing about the crop
SIZE = 32  # the toy checkpoints' generation size


# ----------------------------------------------------------------------------- scenes


def held_out_scenes(n: int, seed: int = 0, exclude_prompts=()) -> list[world.Scene]:
    """`n` random scenes (fixed `seed`) whose prompts are not in `exclude_prompts`."""
    excluded = set(exclude_prompts)
    rng = np.random.default_rng(_rng_seed(seed))
    out: list[world.Scene] = []
    for _ in range(100 * n + 1000):
        scene = world.random_scene(rng)
        if world.prompt(scene) not in excluded:
            out.append(scene)
        if len(out) == n:
            return out
    raise ValueError(f"held_out_scenes: fewer than {n} scenes outside the {len(excluded)} excluded prompts")


def _rng_seed(seed: int) -> int:
    return HELD_OUT_SEED + int(seed)


def renders(scenes, style: str = "flat", size: int = SIZE, seed: int = 0) -> list[np.ndarray]:
    """uint8 renders of `scenes` with held-out jitter seeds."""
    return [world.render(s, size, HELD_OUT_SEED + 1000 * int(seed) + i, style) for i, s in enumerate(scenes)]


def to_pil(images) -> list[Image.Image]:
    out = []
    for im in images:
        a = np.asarray(im)
        if a.dtype != np.uint8:
            a = np.clip(np.rint(a * (255.0 if a.max() <= 1.0 else 1.0)), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(a))
    return out


# ----------------------------------------------------------------------------- accuracy


def accuracy(images, scenes, attributes=world.SCENE_ATTRIBUTES) -> dict[str, float]:
    return oracle.accuracy([np.asarray(im) for im in images], scenes, attributes)


def hits(images, scenes, attributes=world.SCENE_ATTRIBUTES) -> np.ndarray:
    """[N] 1.0 where the oracle reads every one of `attributes` right, else 0.0."""
    return np.asarray([float(all(oracle.agreement(oracle.read(np.asarray(im)), s, attributes).values()))
                       for im, s in zip(images, scenes)])


def verdict(image, scene: world.Scene, attributes=world.ATTRIBUTES) -> dict:
    """The oracle's reading of one image and which attributes match `scene` (for the report)."""
    reading = oracle.read(np.asarray(image))
    ok = oracle.agreement(reading, scene, attributes)
    return {"reading": reading.as_dict(), "ok": ok, "wrong": [a for a, v in ok.items() if not v]}


def bootstrap_diff(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean of the paired difference a - b and its bootstrap 95% CI (percentile, resampling items)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"bootstrap_diff: paired arrays of one non-zero length expected, got {a.shape} and {b.shape}")
    d = a - b
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, (n_boot, d.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"diff": float(d.mean()), "ci95": [float(lo), float(hi)], "n": int(d.size)}


# ----------------------------------------------------------------------------- vision and vault


def embed(tower, images) -> torch.Tensor:
    """L2-normalised embeddings through the one image -> embedding path (luna.models.vision.embed)."""
    from luna.models.vision import embed as _embed

    return torch.nn.functional.normalize(_embed(tower, to_pil(images)).embed.float(), dim=-1)


def vision_nn(tower, n: int = 256, seed: int = 0) -> dict[str, float]:
    """NN attribute agreement on `n` held-out renders of both styles (luna.models.toy.quality.nn_agreement)."""
    from luna.models.toy.quality import nn_agreement

    scenes = held_out_scenes(n, seed)
    images = [world.render(s, SIZE, HELD_OUT_SEED + i, world.STYLES[i % 2]) for i, s in enumerate(scenes)]
    return nn_agreement(embed(tower, images), scenes)


def neighbour_scenes(neighbours) -> list[world.Scene | None]:
    out = []
    for found in neighbours:
        try:
            out.append(world.parse_prompt(str(found.get("prompt", ""))))
        except ValueError:
            out.append(None)
    return out


def vault_precision(vault, images, scenes, k: int = 5, filters=None,
                    attributes=world.SCENE_ATTRIBUTES) -> dict[str, float]:
    """Precision@k: the share of each query's k neighbours whose prompt has the query's attribute
    value (per attribute, and `joint`: all of `attributes`), averaged over the queries."""
    res = vault.query_images(to_pil(images), k=k, filters=filters)
    per = {a: [] for a in attributes}
    joint = []
    for scene, nbs in zip(scenes, res.neighbours):
        found = neighbour_scenes(nbs)
        for a in attributes:
            per[a].append(np.mean([f is not None and getattr(f, a) == getattr(scene, a) for f in found]))
        joint.append(np.mean([f is not None and all(getattr(f, a) == getattr(scene, a) for a in attributes)
                              for f in found]))
    out = {a: float(np.mean(v)) for a, v in per.items()}
    out["joint"] = float(np.mean(joint))
    out["n"] = len(scenes)
    out["k"] = k
    return out


# ----------------------------------------------------------------------------- generation


@torch.no_grad()
def generate_from_conditioning(pipe, cond: torch.Tensor, pooled: torch.Tensor, seeds, steps: int = 20,
                               cfg: float = 5.0, size: int = SIZE) -> list[np.ndarray]:
    """txt2img from given conditioning rows [B,77,C], [B,P] (all-zero negative, as the toy campaign's
    empty negative prompt gives); float images [H,W,3] in 0..1."""
    b = cond.shape[0]
    dt = pipe.unet.dtype
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    out = pipe(prompt_embeds=cond.to(dt), pooled_prompt_embeds=pooled.to(dt),
               negative_prompt_embeds=torch.zeros_like(cond, dtype=dt),
               negative_pooled_prompt_embeds=torch.zeros_like(pooled, dtype=dt),
               num_inference_steps=steps, guidance_scale=cfg, height=size, width=size, generator=gens,
               output_type="np")
    return [im for im in out.images[:b]]


def generation(pipe, prompts: list[str], seeds, steps: int = 20, cfg: float = 5.0) -> list[np.ndarray]:
    from luna.models.sdxl import TextEncoders, encode_prompt

    cond, pooled, _, _ = encode_prompt(TextEncoders.from_pipeline(pipe), list(prompts))
    return generate_from_conditioning(pipe, cond.float(), pooled.float(), seeds, steps, cfg)


def projected_generation(pipe, projector, tower, scenes, steps: int = 20, cfg: float = 5.0,
                         style: str = "flat", seed: int = 0) -> dict:
    """Held-out scenes rendered, embedded, projected to conditioning, generated from it and read by
    the oracle against the scenes: {accuracy: {...}, hits: [N]}."""
    images = renders(scenes, style, seed=seed)
    with torch.no_grad():
        cond, pooled = projector(embed_raw(tower, images).to(next(projector.buffers()).device))
    out = generate_from_conditioning(pipe, cond.float().cpu(), pooled.float().cpu(),
                                     [HELD_OUT_SEED + i for i in range(len(scenes))], steps, cfg)
    return {"accuracy": accuracy(out, scenes), "hits": hits(out, scenes).tolist(), "images": out}


def embed_raw(tower, images) -> torch.Tensor:
    """Unnormalised embeddings, as extraction stores them and the projector / vault read them."""
    from luna.models.vision import embed as _embed

    return _embed(tower, to_pil(images)).embed.float()


# ----------------------------------------------------------------------------- refinement


@dataclass
class Degrade:
    """The damage done to a crop before refinement: a Gaussian blur, then a fade towards grey.
    Chosen so that the oracle misreads most damaged crops (on 96 held-out renders: joint 39%, shape
    55%, colour 78%, size 82% read right) while their content is still there to be recognised."""

    blur: float = 2.5  # Gaussian sigma, px at 32 px
    fade: float = 0.3  # mix with mid-grey

    def __call__(self, image: np.ndarray) -> np.ndarray:
        im = Image.fromarray(np.asarray(image)).filter(ImageFilter.GaussianBlur(self.blur))
        a = np.asarray(im, np.float32)
        a = (1 - self.fade) * a + self.fade * 128.0
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)


@dataclass
class RefineArms:
    """Refinement settings shared by every arm (the toy preset's detail.* values by default)."""

    steps: int = 20
    strength: float = 0.6
    cfg: float = 5.0
    weight: float = 0.8  # retrieved / projected share of the blended conditioning
    k: int = 5
    prompt: str = GENERIC_PROMPT
    seed: int = 0
    degrade: Degrade = field(default_factory=Degrade)


def refine_crops(components, crops, sources: dict, arms: RefineArms) -> dict[str, list[np.ndarray]]:
    """img2img of each crop (uint8 [32,32,3]) with each conditioning source, through the runtime's own
    denoiser (lsd_runtime.sampler.sampler_denoiser), the same seeded noise for every arm."""
    from lsd_runtime.sampler import DenoiseItem, SamplerSettings, sampler_denoiser, time_ids

    settings = SamplerSettings(steps=arms.steps, strength=arms.strength, cfg=arms.cfg, sampler="euler")
    pil = to_pil(crops)
    scale = 2 ** (len(components.sampler.vae.config.block_out_channels) - 1)
    lat = SIZE // scale
    out = {}
    for name, source in sources.items():
        text = source if name == "text" else source.text
        denoise = sampler_denoiser(components.sampler, settings, text.negative_row)
        rows = source.rows(pil)
        items = []
        for i, (crop, row) in enumerate(zip(crops, rows)):
            gen = torch.Generator("cpu").manual_seed(HELD_OUT_SEED + arms.seed * 10_000 + i)
            items.append(DenoiseItem(image=np.asarray(crop, np.float32), row=row, seed=i,
                                     noise=torch.randn((4, lat, lat), generator=gen), time_ids=time_ids((SIZE, SIZE))[0]))
        images = []
        for j in range(0, len(items), 16):
            images += denoise(items[j: j + 16])
        out[name] = [np.clip(np.rint(im), 0, 255).astype(np.uint8) for im in images]
    return out


def conditioning_sources(components, tower, vault=None, projector=None, arms: RefineArms | None = None,
                         filters=None) -> dict:
    """{"text": generic prompt, "vault": + neighbours, "projector": + projected row} (those given)."""
    from lsd_runtime.conditioning import CropEmbedder, ProjectorSource, TextSource, VaultSource

    arms = arms or RefineArms()
    text = TextSource(components.encoders, arms.prompt, None,
                      force_zeros_for_empty_prompt=components.sampler.force_zeros_for_empty_prompt)
    embedder = CropEmbedder(tower)
    sources = {"text": text}
    if vault is not None:
        sources["vault"] = VaultSource(vault, text, embedder, k=arms.k, weight=arms.weight, filters=filters)
    if projector is not None:
        sources["projector"] = ProjectorSource(projector, text, embedder, weight=arms.weight)
    return sources


def refinement(components, tower, scenes, vault=None, projector=None, arms: RefineArms | None = None,
               style: str = "flat", filters=None, attributes=world.SCENE_ATTRIBUTES) -> dict:
    """Degrade held-out renders, refine them with every arm, read them with the oracle.

    Returns {"arms": {name: {accuracy, hits}}, "degraded": {...}, "clean": {...},
             "vs_text": {name: bootstrap_diff(arm hits, text hits)}, "images": {...}, "settings": {...}}."""
    arms = arms or RefineArms()
    clean = renders(scenes, style, seed=arms.seed)
    degraded = [arms.degrade(im) for im in clean]
    sources = conditioning_sources(components, tower, vault, projector, arms, filters)
    refined = refine_crops(components, degraded, sources, arms)
    out = {"clean": {"accuracy": accuracy(clean, scenes, attributes)},
           "degraded": {"accuracy": accuracy(degraded, scenes, attributes),
                        "hits": hits(degraded, scenes, attributes).tolist()},
           "arms": {}, "vs_text": {},
           "images": {"clean": clean, "degraded": degraded, **refined},
           "settings": {"steps": arms.steps, "strength": arms.strength, "cfg": arms.cfg, "weight": arms.weight,
                        "k": arms.k, "prompt": arms.prompt, "blur": arms.degrade.blur, "fade": arms.degrade.fade,
                        "n": len(scenes), "attributes": list(attributes)}}
    for name, images in refined.items():
        out["arms"][name] = {"accuracy": accuracy(images, scenes, attributes), "hits": hits(images, scenes, attributes).tolist()}
    for name in refined:
        if name != "text":
            out["vs_text"][name] = bootstrap_diff(np.asarray(out["arms"][name]["hits"]),
                                                  np.asarray(out["arms"]["text"]["hits"]))
    return out


# ----------------------------------------------------------------------------- pairs without Ray


def write_pairs(folder, images, prompts: list[str], tower, components, checkpoint, name: str, campaign: str = "toy",
                seeds=None):
    """A pairs part in extraction's format (extraction.pairs) for `images` and their `prompts`: image
    embeddings through `tower`, conditionings through the checkpoint's own text encoders. For small
    measured sets (tests, benchmarks/toy_loop.py) that need no Ray cluster and no shards; the demo's
    pairs come from `luna extract` on the factory's shards."""
    from pathlib import Path

    from extraction.pairs import PairsPart, write_part
    from luna.models.fingerprint import te_fingerprint
    from luna.models.sdxl import encode_prompt

    unique = sorted(set(prompts))
    with torch.no_grad():
        cond, pooled, _, _ = encode_prompt(components.encoders, unique)
    te1, te2 = components.pipe.text_encoder.config, components.pipe.text_encoder_2.config
    n = len(images)
    part = PairsPart(
        images={"key": np.asarray([f"{name}-{i:05d}" for i in range(n)], object),
                "embed": embed_raw(tower, images).numpy(),
                "prompt_id": np.asarray([unique.index(p) for p in prompts]),
                "checkpoint": np.asarray([name] * n, object), "category": np.asarray(["scenes"] * n, object),
                "campaign": np.asarray([campaign] * n, object),
                "seed": np.asarray(list(seeds) if seeds is not None else range(n))},
        prompts={"text": np.asarray(unique, object), "cond": cond.float().numpy(), "pooled": pooled.float().numpy(),
                 "te_fingerprint": np.asarray([te_fingerprint(checkpoint)] * len(unique), object)},
        attrs={"vision_model": tower.model_id, "vision_dim": int(tower.dim),
               "text_dims": [int(te1.hidden_size), int(te2.hidden_size)], "pooled_dim": int(te2.projection_dim)})
    return write_part(Path(folder) / f"pairs-{name}.h5", part)


def campaign_images(checkpoint, n: int, start: int = 0, campaign: str = "toy", job: str = "scenes"):
    """The toy campaign's samples start..start+n (prompts, negatives, seeds and sampler as the factory
    draws them) generated by the factory's own generator (factory.worker.SDXLGenerator), on CPU:
    (float images [H,W,3] in 0..1, prompts, seeds)."""
    from factory.campaign_file import load_campaign
    from factory.worker import SDXLGenerator

    c = load_campaign(campaign)
    sampler = c.sampler_for(job).to_dict()
    samples = list(c.draws(job, start, start + n))
    gen = SDXLGenerator(device="cpu", dtype="float32")
    gen.load(str(checkpoint))
    images = []
    for k in range(0, len(samples), 16):
        part = samples[k: k + 16]
        images += gen.generate([s.prompt for s in part], [s.negative for s in part], [s.seed for s in part], sampler)
    return images, [s.prompt for s in samples], [s.seed for s in samples]


# ---------------------------------------------------------------------- luna ab crops


def degraded_crops(scenes, seed: int, label: str = "scenes"):
    """`luna ab` crops of held-out renders of `scenes`: degraded as toy_loop degrades them, truth = the scene."""
    from lsd_runtime.arms import Crop

    degrade = Degrade()
    out = []
    for i, (s, im) in enumerate(zip(scenes, renders(scenes, seed=seed))):
        out.append(Crop(key=f"s{seed}-{i:03d}", image=Image.fromarray(degrade(im)), original=Image.fromarray(im),
                        prompt=None, label=label, truth={a: getattr(s, a) for a in world.SCENE_ATTRIBUTES}))
    return out


DESCRIBED = "described"


def described_crops(crops, scenes, fraction: float, seed: int, vague: str) -> None:
    """A second category of crops: a seeded `fraction` of them labelled DESCRIBED and carrying their
    scene's own prompt (a user whose prompt says what the detail shows); the others keep their label
    and get the vague prompt `vague` explicitly. Their label names no vault category, so the tuner
    searches them as its `default` entry and the runtime routes them "auto" (the nearest category:
    the toy vault's only one, `scenes`)."""
    if not 0 < fraction < 1:
        raise ValueError(f"described_crops: fraction={fraction} must be strictly between 0 and 1")
    pick = set(np.random.default_rng(seed + 9001).permutation(len(crops))[: round(fraction * len(crops))].tolist())
    for i, (cr, s) in enumerate(zip(crops, scenes)):
        if i in pick:
            cr.label, cr.prompt = DESCRIBED, world.prompt(s)
        else:
            cr.prompt = vague
