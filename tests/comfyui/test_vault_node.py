"""The ComfyUI Vault Query node: node conventions, CONDITIONING format, blends; no ComfyUI needed."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from extraction.synthetic import synthetic_encode, write_synthetic_pairs
from vault.build import build_vault

ROOT = Path(__file__).resolve().parents[2]
TEXT_DIMS, POOLED = (768, 1280), 1280


def _load_package():
    """Import comfyui/ the way ComfyUI imports a custom-node folder (a package by path)."""
    spec = importlib.util.spec_from_file_location("luna_comfy_nodes", ROOT / "comfyui" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "comfyui")])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def nodes():
    return _load_package()


@pytest.fixture(scope="module")
def tower():
    from luna.models.vision import load_vision

    return load_vision("tiny")


@pytest.fixture(scope="module")
def vaults(tower, tmp_path_factory):
    root = tmp_path_factory.mktemp("cv")
    pairs = write_synthetic_pairs(root / "pairs", 120, 12, tower.dim, text_dims=TEXT_DIMS, pooled_dim=POOLED,
                                  vision_model=tower.model_id)
    build_vault(pairs, root / "stored", index="Flat")
    build_vault(pairs, root / "prompts", index="Flat", mode="prompts")
    return root


def _images(b=2):
    return torch.rand(b, 40, 48, 3, generator=torch.Generator().manual_seed(0))


def _distinct():
    """Two images the tiny tower embeds far apart (a dark and a light one)."""
    return torch.stack([torch.zeros(40, 48, 3), torch.ones(40, 48, 3)])


def test_node_follows_comfyui_conventions(nodes):
    cls = nodes.NODE_CLASS_MAPPINGS["LunaVaultQuery"]
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["LunaVaultQuery"] == "Luna Vault Query"
    inputs = cls.INPUT_TYPES()
    assert inputs["required"]["image"][0] == "IMAGE" and inputs["optional"]["conditioning"][0] == "CONDITIONING"
    assert {"vault", "k", "strength"} <= set(inputs["required"]) and "vault_path" in inputs["optional"]
    for section in inputs.values():  # every input has a tooltip
        assert all(spec[1].get("tooltip") for spec in section.values())
    assert cls.RETURN_TYPES[0] == "CONDITIONING" and callable(getattr(cls(), cls.FUNCTION)) and cls.CATEGORY


def test_node_returns_comfyui_conditioning(nodes, vaults):
    node = nodes.NODE_CLASS_MAPPINGS["LunaVaultQuery"]()
    conditioning, neighbours = node.query("none", vault_path=str(vaults / "stored"), image=_images(), k=4, strength=0.5)
    assert isinstance(conditioning, list) and len(conditioning) == 1
    cond, extra = conditioning[0]
    # one row per input image (the batch is not averaged into one)
    assert tuple(cond.shape) == (2, 77, 2048) and tuple(extra["pooled_output"].shape) == (2, POOLED)
    assert torch.isfinite(cond).all() and float(cond.abs().sum()) > 0
    assert "prompt" in neighbours
    for i in range(2):
        (alone, _), = node.query("none", vault_path=str(vaults / "stored"), image=_images()[i:i + 1], k=4,
                                 strength=0.5)[0]
        torch.testing.assert_close(cond[i:i + 1], alone)
    (pair, _), = node.query("none", vault_path=str(vaults / "stored"), image=_distinct(), k=4, strength=1.0)[0]
    assert not torch.allclose(pair[0], pair[1])  # different images, different neighbours


def test_node_without_conditioning_sets_sdxl_size_keys(nodes, vaults):
    node = nodes.NODE_CLASS_MAPPINGS["LunaVaultQuery"]()
    (_, extra), = node.query("none", vault_path=str(vaults / "stored"), image=_images(1), k=3, strength=0.5)[0]
    # CLIPTextEncodeSDXL's keys and defaults (comfy_extras/nodes_clip_sdxl.py); ComfyUI's SDXL reads 768 when absent
    assert {k: v for k, v in extra.items() if k != "pooled_output"} == {
        "width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0, "target_width": 1024, "target_height": 1024}
    (_, extra), = node.query("none", vault_path=str(vaults / "stored"), image=_images(1), k=3, strength=0.5,
                             width=832, height=1216)[0]
    assert (extra["width"], extra["height"], extra["target_width"], extra["target_height"]) == (832, 1216, 832, 1216)


def test_node_blends_with_user_conditioning(nodes, vaults):
    node = nodes.NODE_CLASS_MAPPINGS["LunaVaultQuery"]()
    (retrieved, r_extra), = node.query("none", vault_path=str(vaults / "stored"), image=_images(1), k=3, strength=1.0)[0]
    user = [[torch.ones(1, 77, 2048), {"pooled_output": torch.zeros(1, POOLED), "area": "keep"}]]
    (mixed, extra), = node.query("none", vault_path=str(vaults / "stored"), image=_images(1), k=3, strength=0.25, conditioning=user)[0]
    torch.testing.assert_close(mixed, 0.75 * user[0][0] + 0.25 * retrieved)
    torch.testing.assert_close(extra["pooled_output"], 0.25 * r_extra["pooled_output"])
    assert extra["area"] == "keep" and float(user[0][0].min()) == 1.0  # the input is not modified
    (long, extra), = node.query("none", vault_path=str(vaults / "stored"), image=_images(1), k=3, strength=0.5, conditioning=user,
                                blend="concat")[0]
    assert tuple(long.shape) == (1, 154, 2048) and torch.equal(long[:, :77], user[0][0])
    torch.testing.assert_close(long[:, 77:], retrieved)
    assert torch.equal(extra["pooled_output"], user[0][1]["pooled_output"])


class _FakeClip:
    """ComfyUI CLIP stand-in: tokenize + encode_from_tokens(return_pooled=True) through the synthetic encoder."""

    def tokenize(self, text):
        return text

    def encode_from_tokens(self, tokens, return_pooled=False):
        cond, pooled = synthetic_encode([tokens], TEXT_DIMS, POOLED)
        return torch.from_numpy(cond), torch.from_numpy(pooled)


def test_prompts_only_vault_uses_the_clip_input(nodes, vaults):
    node = nodes.NODE_CLASS_MAPPINGS["LunaVaultQuery"]()
    a = node.query("none", vault_path=str(vaults / "prompts"), image=_images(), k=4, strength=1.0, clip=_FakeClip())[0][0][0]
    b = node.query("none", vault_path=str(vaults / "stored"), image=_images(), k=4, strength=1.0)[0][0][0]
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-3)  # stored rows are fp16
    with pytest.raises(ValueError, match="input 'clip'"):
        node.query("none", vault_path=str(vaults / "prompts"), image=_images(), k=4, strength=1.0)
