"""luna.models.toy.world and .oracle: prompts round-trip, renders are deterministic, the oracle reads them."""
from __future__ import annotations

import numpy as np
import pytest

from luna.models.toy import oracle, world


def test_every_scene_round_trips_through_its_prompt():
    scenes = world.all_scenes()
    assert len(scenes) == 3 * 6 * 3 * 2 * 3 * 2
    prompts = {world.prompt(s) for s in scenes}
    assert len(prompts) == len(scenes)
    assert all(world.parse_prompt(world.prompt(s)) == s for s in scenes)


def test_campaign_prompts_are_world_prompts():
    from factory.campaign_file import load_campaign

    campaign = load_campaign("toy")
    assert campaign.combinations("scenes") == len(world.all_scenes())
    for sample in campaign.draws("scenes", 0, 50):
        scene = world.parse_prompt(sample.prompt)
        assert world.prompt(scene) == sample.prompt


def test_parse_prompt_names_the_bad_prompt():
    with pytest.raises(ValueError, match="not a toy-world prompt.*a red car"):
        world.parse_prompt("a red car")
    with pytest.raises(ValueError, match="color='pink'"):
        world.parse_prompt("a small pink circle with a white dot on the left, gray background")


def test_render_is_deterministic_and_styles_differ():
    s = world.Scene("triangle", "blue", "white", "large", "left", "black")
    a, b = world.render(s, 48, seed=3), world.render(s, 48, seed=3)
    assert a.shape == (48, 48, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, world.render(s, 48, seed=4))  # the jitter moves it
    assert not np.array_equal(a, world.render(s, 48, seed=3, style="outline"))
    with pytest.raises(ValueError, match="style='pastel'"):
        world.render(s, 48, style="pastel")


@pytest.mark.parametrize("size,n", [(32, 240), (64, 160), (128, 40)])
@pytest.mark.parametrize("style", world.STYLES)
def test_oracle_reads_renders(size, n, style):
    rng = np.random.default_rng(size)
    scenes = [world.random_scene(rng) for _ in range(n)]
    images = [world.render(s, size, seed=i, style=style) for i, s in enumerate(scenes)]
    acc = oracle.accuracy(images, scenes)
    assert acc["joint"] >= 0.99, acc


def test_oracle_accepts_float_images_and_sees_a_wrong_colour():
    s = world.Scene("circle", "red", "gray", "large", "middle", "white")
    img = world.render(s, 64)
    assert oracle.read(img.astype(np.float32) / 255.0) == oracle.read(img)
    recoloured = img.copy()
    recoloured[np.all(img == world.COLORS["red"], axis=2)] = world.COLORS["green"]
    assert oracle.read(recoloured).color == "green"
    erased = img.copy()
    erased[np.all(img == world.MARKS["white"], axis=2)] = world.COLORS["red"]
    assert oracle.read(erased).mark == "none"


def test_oracle_on_an_empty_image_reads_only_the_background():
    r = oracle.read(np.full((32, 32, 3), 20, np.uint8))
    assert r.background == "black" and r.shape is None and r.color is None
