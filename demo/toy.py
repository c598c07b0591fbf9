"""The demo's stages that only the toy preset has: refinement of degraded crops and the oracle's measures.

    refine   held-out crops of the toy world, degraded on purpose (blurred, faded), refined by the
             runtime's denoiser with a generic prompt (text only), with vault and with projector
             conditioning; the oracle's verdict on each
    ab       `luna ab` (lsd_runtime.ab.demo_stage) on held-out crops of the projector's validation split:
             the same degraded crops refined under each arm (none, generic, vault, projector,
             hybrid), scored by the oracle, with bootstrap intervals
    quality  generation accuracy of the factory's images against their prompts, the vision tower's
             nearest-neighbour agreement, vault precision@k on held-out renders, and images generated
             from the projector's conditioning for held-out prompts, all read by the oracle

Settings come from conf/demo.yaml's `toy:` section and, for the refinement itself (steps, strength,
cfg, k, weight), from conf/preset/toy.yaml, the values `luna refine preset=toy` uses.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from luna.files import save_png_atomic

def toy_weights(cfg: dict) -> Path:
    """The folder of the toy checkpoints and vision tower (models.toy_dir, else the committed ones)."""
    from luna.models.toy import models as toy_models

    folder = (cfg.get("models") or {}).get("toy_dir")
    return Path(str(folder)).expanduser().resolve() if folder else toy_models.WEIGHTS_DIR


def toy_tower(cfg: dict):
    from luna.models.toy import models as toy_models

    return toy_models.load_vision(weights=toy_weights(cfg) / toy_models.VISION_FILE.name)


def _refine_settings(checkpoint: dict) -> dict:
    """conf/preset/toy.yaml's detail.* and retrieval.*, composed as `luna refine preset=toy` does."""
    from luna.cli import compose
    from luna.settings import plain

    cfg = plain(compose("refine", ["preset=toy"], {"checkpoint": checkpoint["path"]}))
    return {"steps": int(cfg["detail"]["steps"]), "strength": float(cfg["detail"]["strength"]),
            "cfg": float(cfg["detail"]["cfg"]), "weight": float(cfg["retrieval"]["weight"]),
            "k": int(cfg["retrieval"]["k"])}


def stage_refine(cfg: dict, paths, checkpoints: list[dict]) -> dict:
    from demo import toy_quality
    from demo.toy_figures import verdict_grid
    from lsd_runtime.conditioning import CropEmbedder, open_projector
    from lsd_runtime.workflow import load_components
    from vault import Vault

    toy = cfg["toy"]
    ckpt = checkpoints[0]  # the base family's checkpoint refines; the vault answers in its dialect
    settings = _refine_settings(ckpt)
    arms = toy_quality.RefineArms(**settings, degrade=toy_quality.Degrade(float(toy["blur"]), float(toy["fade"])))
    comps = load_components(checkpoint=ckpt["path"], device="cpu", dtype="float32")
    tower = toy_tower(cfg)
    vault = Vault.open(paths.vault, use_gpu=False, vision=tower)
    projector = open_projector(paths.projector, CropEmbedder(tower))
    scenes = toy_quality.held_out_scenes(int(toy["crops"]), seed=2)
    res = toy_quality.refinement(comps, tower, scenes, vault, projector, arms, style=ckpt.get("style", "flat"),
                                 filters={"te_fingerprint": ckpt["te_fingerprint"]})
    paths.refine.mkdir(parents=True, exist_ok=True)
    grid = save_png_atomic(verdict_grid(res["images"], scenes, int(toy["shown"])), paths.refine / "toy_refinement.png")
    for name, acc in res["arms"].items():
        print(f"   {name}: joint oracle accuracy {acc['accuracy']['joint']:.2f}", file=sys.stderr)
    return {"kind": "toy", "checkpoint": ckpt["name"], "grid": str(grid), "settings": res["settings"],
            "clean": res["clean"], "degraded": {"accuracy": res["degraded"]["accuracy"]},
            "arms": {name: {"accuracy": arm["accuracy"]} for name, arm in res["arms"].items()},
            "vs_text": res["vs_text"], "prompts": [toy_quality.world.prompt(s) for s in scenes]}


def shard_generation_accuracy(shards_dir: Path) -> dict:
    """The oracle's reading of every image in the finished shards against its own prompt: per
    attribute and joint, overall and per checkpoint."""
    import io

    from demo import toy_quality
    from factory.shards import complete_shards, read_shard
    from luna.models.toy import world

    by_ckpt: dict[str, tuple[list, list]] = {}
    for tar_path in complete_shards(shards_dir):
        for sample in read_shard(tar_path):
            if "json" not in sample or "png" not in sample:
                continue
            meta = json.loads(sample["json"])
            try:
                scene = world.parse_prompt(str(meta.get("prompt", "")))
            except ValueError:
                continue
            with Image.open(io.BytesIO(sample["png"])) as im:
                image = np.asarray(im.convert("RGB"))
            images, scenes = by_ckpt.setdefault(str(meta.get("checkpoint")), ([], []))
            images.append(image)
            scenes.append(scene)
    if not by_ckpt:
        raise ValueError(f"{shards_dir}: no toy-world images with toy prompts in the finished shards")
    out = {"per_checkpoint": {k: dict(toy_quality.accuracy(i, s), n=len(i)) for k, (i, s) in sorted(by_ckpt.items())}}
    all_images = [im for i, _ in by_ckpt.values() for im in i]
    all_scenes = [sc for _, s in by_ckpt.values() for sc in s]
    out["all"] = dict(toy_quality.accuracy(all_images, all_scenes), n=len(all_images))
    return out


def stage_quality(cfg: dict, paths, state: dict) -> dict:
    from demo import toy_quality
    from extraction.pairs import Pairs
    from lsd_runtime.conditioning import CropEmbedder, open_projector
    from luna.models.sdxl import load_sdxl
    from vault import Vault

    toy = cfg["toy"]
    ckpt = state["models"]["checkpoints"][0]
    tower = toy_tower(cfg)
    out = {"generation": shard_generation_accuracy(paths.shards)}
    out["vision_nn"] = dict(toy_quality.vision_nn(tower, int(toy["vision_n"])), n=int(toy["vision_n"]))
    seen = set(Pairs(paths.pairs).prompt_text)  # held-out measures use prompts absent from the pairs
    vault = Vault.open(paths.vault, use_gpu=False, vision=tower)
    scenes = toy_quality.held_out_scenes(int(toy["vault_n"]), seed=3, exclude_prompts=seen)
    images = [toy_quality.world.render(s, toy_quality.SIZE, toy_quality.HELD_OUT_SEED + i, toy_quality.world.STYLES[i % 2])
              for i, s in enumerate(scenes)]
    out["vault"] = toy_quality.vault_precision(vault, images, scenes, k=int(toy["vault_k"]))
    pipe = load_sdxl(ckpt["path"], device="cpu")  # the refining checkpoint, from its file as a user's
    pipe.set_progress_bar_config(disable=True)
    projector = open_projector(paths.projector, CropEmbedder(tower))
    held = toy_quality.held_out_scenes(int(toy["projector_n"]), seed=4, exclude_prompts=seen)
    projected = toy_quality.projected_generation(pipe, projector, tower, held, style=ckpt.get("style", "flat"))
    prompted = toy_quality.generation(pipe, [toy_quality.world.prompt(s) for s in held],
                                      [toy_quality.HELD_OUT_SEED + i for i in range(len(held))])
    out["projector"] = {"n": len(held), "projected": projected["accuracy"],
                        "prompt": toy_quality.accuracy(prompted, held),
                        "model": state["train"].get("model"),
                        "val_cos_content": (state["train"].get("metrics") or {}).get("val/cos_content")}
    refine = state.get("refine") or {}
    if refine.get("kind") == "toy":
        out["refinement"] = {"arms": {k: v["accuracy"] for k, v in refine["arms"].items()},
                             "degraded": refine["degraded"]["accuracy"], "vs_text": refine["vs_text"],
                             "settings": refine["settings"]}
    return out



def stage_ab(cfg: dict, paths, state: dict) -> dict:
    """`luna ab` on `ab.n` crops of the demo's own shards whose prompts the projector held out (its
    `val` split, split as `luna train` split them), degraded, refined under every arm the demo has."""
    from lsd_runtime.ab import demo_stage

    ab = cfg["ab"]
    ckpt = state["models"]["checkpoints"][0]  # the checkpoint the refine stage uses
    weights = toy_weights(cfg)
    return demo_stage(paths.out / "ab", shards=paths.shards, vault=paths.vault, projector=paths.projector,
                      pairs=paths.pairs, split="val", preset="toy", n=int(ab["n"]), size=32,
                      oracle="luna.models.toy.oracle:read", degrade=ab["degrade"], arms=list(ab["arms"]),
                      prompt=ab.get("prompt"),
                      seed=int(ab["seed"]), checkpoint=str(ckpt["path"]), crops__degrade_amount=float(ab["amount"]),
                      vision__weights=str(weights / "luna-toy-vit.safetensors"))
