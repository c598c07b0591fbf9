"""Quality of the toy checkpoints, measured by the oracle (benchmarks/toy_quality.py prints these).

  generation_accuracy   images from the factory's own generator (factory.worker.SDXLGenerator,
                        i.e. load_sdxl + StableDiffusionXLPipeline) for campaign prompts, read by
                        the oracle against the prompt's attributes: per attribute and joint;
  vision_nn_agreement   leave-one-out cosine nearest neighbour of image embeddings: how often the
                        neighbour has the same value of each attribute (and all of them).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from luna.models.toy import oracle, world


def campaign_prompts(n: int, campaign="toy", job: str = "scenes", start: int = 0) -> list[tuple[str, int]]:
    """(prompt, seed) of samples start..start+n of the toy campaign, as the factory draws them."""
    from factory.campaign import load_campaign

    c = load_campaign(campaign)
    return [(s.prompt, s.seed) for s in c.samples(job, start, start + n)]


def generate(checkpoint: Path, prompts: list[str], seeds: list[int], steps: int = 20, cfg: float = 5.0,
             size: int = 32, batch: int = 16, negative: str = "") -> list[np.ndarray]:
    """Images [H,W,3] in 0..1 through the factory's generator (one checkpoint, CPU, fp32)."""
    from factory.worker import SDXLGenerator

    gen = SDXLGenerator(device="cpu", dtype="float32")
    gen.load(str(checkpoint))
    sampler = {"steps": steps, "cfg": cfg, "scheduler": "euler", "width": size, "height": size}
    out: list[np.ndarray] = []
    for k in range(0, len(prompts), batch):
        p = prompts[k: k + batch]
        out += gen.generate(p, [negative] * len(p), seeds[k: k + batch], sampler)
    return out


def generation_accuracy(checkpoint: Path, n: int = 64, steps: int = 20, cfg: float = 5.0, size: int = 32,
                        attributes=world.SCENE_ATTRIBUTES, start: int = 0) -> dict[str, float]:
    """Oracle accuracy of `n` campaign images of `checkpoint` (per attribute and `joint`)."""
    pairs = campaign_prompts(n, start=start)
    images = generate(checkpoint, [p for p, _ in pairs], [s for _, s in pairs], steps, cfg, size)
    return oracle.accuracy(images, [world.parse_prompt(p) for p, _ in pairs], attributes)


@torch.no_grad()
def embed(tower, images) -> torch.Tensor:
    """L2-normalised embeddings of uint8/float [H,W,3] images through the tower's own preprocess."""
    from PIL import Image

    pix = []
    for im in images:
        a = np.asarray(im)
        if a.dtype != np.uint8:
            a = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
        pix.append(tower.preprocess(Image.fromarray(a)))
    return torch.nn.functional.normalize(tower.encode(torch.stack(pix)).float(), dim=-1)


def nn_agreement(emb: torch.Tensor, scenes: list[world.Scene], attributes=world.ATTRIBUTES) -> dict[str, float]:
    """Leave-one-out nearest neighbour (cosine) attribute agreement, per attribute and `joint`."""
    sim = emb @ emb.T
    sim.fill_diagonal_(-2.0)
    nn = sim.argmax(dim=1).tolist()
    out = {a: float(np.mean([getattr(scenes[i], a) == getattr(scenes[j], a) for i, j in enumerate(nn)]))
           for a in attributes}
    out["joint"] = float(np.mean([all(getattr(scenes[i], a) == getattr(scenes[j], a) for a in attributes)
                                  for i, j in enumerate(nn)]))
    return out


def vision_nn_agreement(tower, n: int = 512, seed: int = 12345, size: int = 32,
                        attributes=world.ATTRIBUTES) -> dict[str, float]:
    """NN agreement on `n` held-out renders (both styles, seeds unseen in training)."""
    rng = np.random.default_rng(seed)
    scenes = [world.random_scene(rng) for _ in range(n)]
    images = [world.render(s, size, 10**6 + i, world.STYLES[i % 2]) for i, s in enumerate(scenes)]
    return nn_agreement(embed(tower, images), scenes, attributes)
