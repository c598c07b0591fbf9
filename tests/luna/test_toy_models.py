"""The committed toy weights: loadable as SDXL, two families, <= 25 MB, and they carry meaning.

The quality thresholds sit below the figures measured on these weights (docs/toy.md,
benchmarks/toy_quality.py) with margin for the small sample; they fail if the meaning breaks
(random weights score ~chance per attribute)."""
from __future__ import annotations

import numpy as np
import pytest

from luna.models.toy import models, oracle, quality, world

# On these 16 prompts the committed weights measured a mean attribute accuracy of 0.76 (base) and
# 0.84 (pony), background 1.0 for both; chance is 0.33 and 0.33. Vision (256 renders): shape,
# colour, background agreement >= 0.90 (chance ~0.17-0.33).
MIN_MEAN_ATTRIBUTE = 0.6
MIN_BACKGROUND = 0.75
MIN_VISION = 0.85


def test_committed_files_are_small_sdxl_checkpoints_in_two_families():
    from factory.inventory import merge, scan_folders
    from luna.models.sdxl import detect_architecture

    files = list(models.checkpoint_paths().values()) + [models.VISION_FILE]
    assert sum(p.stat().st_size for p in files) <= 25 * 1024**2
    inv = merge([scan_folders([str(models.WEIGHTS_DIR)], node="pc1")])
    assert {c.name: c.family for c in inv.checkpoints} == {"toy-base-flat": "base", "toy-pony-outline": "pony"}
    assert len({c.te_fingerprint for c in inv.checkpoints}) == 2
    for path in models.checkpoint_paths().values():
        assert detect_architecture(path).size == "toy"


@pytest.mark.parametrize("name", list(models.CHECKPOINTS))
def test_generated_images_show_their_prompts(name):
    rng = np.random.default_rng(5)
    scenes = [world.random_scene(rng) for _ in range(16)]
    prompts = [world.prompt(s) for s in scenes]
    images = quality.generate(models.checkpoint_paths()[name], prompts, list(range(16)), steps=20, cfg=5.0)
    acc = oracle.accuracy(images, scenes, world.SCENE_ATTRIBUTES)
    assert np.mean([acc[a] for a in world.SCENE_ATTRIBUTES]) >= MIN_MEAN_ATTRIBUTE, acc
    assert acc["background"] >= MIN_BACKGROUND, acc


def test_vision_neighbours_share_attributes():
    tower = models.load_vision()
    agree = quality.vision_nn_agreement(tower, n=256, seed=3)
    assert min(agree[a] for a in ("shape", "color", "background")) >= MIN_VISION, agree


def test_missing_weights_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="toy-base-flat.safetensors"):
        models.checkpoint_paths(tmp_path)
