"""Quality of the toy checkpoints, measured by the oracle (benchmarks/toy_quality.py prints these).

  generation_accuracy   generated images (benchmarks/toy_quality.py makes them with the factory's
                        own generator, factory.worker.SDXLGenerator, for the toy campaign's
                        prompts) read by the oracle against their prompts: per attribute and joint;
  vision_nn_agreement   leave-one-out cosine nearest neighbour of image embeddings: how often the
                        neighbour has the same value of each attribute (and all of them).
"""
from __future__ import annotations

import numpy as np
import torch

from luna.models.toy import oracle, world


def generate(checkpoint, prompts: list[str], seeds: list[int], steps: int = 20, cfg: float = 5.0,
             size: int = 32, batch: int = 16, negative: str = "") -> list[np.ndarray]:
    """Images [H,W,3] in 0..1 from a checkpoint loaded by `load_sdxl`, called as the factory's
    generator calls its StableDiffusionXLPipeline (Euler, one seeded generator per image)."""
    from luna.models.sdxl import load_sdxl

    pipe = load_sdxl(checkpoint)
    out: list[np.ndarray] = []
    with torch.inference_mode():
        for k in range(0, len(prompts), batch):
            p = list(prompts[k: k + batch])
            gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds[k: k + batch]]
            images = pipe(prompt=p, negative_prompt=[negative] * len(p), num_inference_steps=steps,
                          guidance_scale=cfg, width=size, height=size, generator=gens, output_type="np").images
            out += [np.asarray(im) for im in images]
    return out


def generation_accuracy(images, prompts: list[str], attributes=world.SCENE_ATTRIBUTES) -> dict[str, float]:
    """Oracle accuracy of generated images against their toy prompts (per attribute and `joint`)."""
    return oracle.accuracy(images, [world.parse_prompt(p) for p in prompts], attributes)


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
