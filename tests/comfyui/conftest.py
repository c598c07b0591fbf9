"""Fixtures for the tests in real ComfyUI (skipped, with the reason, when ../shared/vendor/ComfyUI is absent)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # comfy_env / comfy_tiny (test-only helpers)

import comfy_env  # noqa: E402

from comfy_env import TINY_CKPT  # noqa: E402

TEXT_DIMS, POOLED = (32, 64), 64  # the tiny preset's text encoders: [77, 96] + pooled [64]


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """Real ComfyUI in this process (CPU, one thread: tiny models), with the tiny checkpoint and Luna assets."""
    if comfy_env.VENDOR is None:
        pytest.skip(comfy_env.SKIP_REASON)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models gain nothing from threads; spin-waiting ones slow a busy machine 10x
    import comfy_tiny

    state = comfy_env.start(tmp_path_factory.mktemp("comfyui"))
    base = state["base"]
    ckpt = base / "models" / "checkpoints" / TINY_CKPT
    if not ckpt.exists():
        comfy_tiny.write_tiny_checkpoint(ckpt)
    yield state
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def tiny_models(comfy):
    """(MODEL, CLIP, VAE) of the tiny checkpoint through ComfyUI's own CheckpointLoaderSimple."""
    return comfy["nodes"].CheckpointLoaderSimple().load_checkpoint(TINY_CKPT)[:3]


@pytest.fixture(scope="session")
def tower():
    from luna.models.vision import load_vision

    return load_vision("tiny")


@pytest.fixture(scope="session")
def luna_assets(comfy, tower):
    """Vaults (stored, prompts-only) and a projector for the tiny widths in ComfyUI's model folders,
    a detections file and a crop image in its input folder."""
    from extraction.synthetic import write_synthetic_pairs
    from lsd_runtime.detect import Detection, write_detections
    from projector.export import save_projector
    from projector.module import ProjectorModule
    from vault.build import build_vault
    from PIL import Image

    base = comfy["base"]
    models = base / "models"
    pairs = write_synthetic_pairs(base / "work" / "pairs", 120, 12, tower.dim, text_dims=TEXT_DIMS, pooled_dim=POOLED,
                                  vision_model=tower.model_id)
    build_vault(pairs, models / "luna_vaults" / "tiny-stored", index="Flat")
    build_vault(pairs, models / "luna_vaults" / "tiny-prompts", index="Flat", mode="prompts")
    dims = {"input": "embed", "in_dim": tower.dim, "vision_dim": tower.dim, "vision_model": tower.model_id,
            "num_tokens": None, "text_dims": list(TEXT_DIMS), "cond_dim": sum(TEXT_DIMS), "pooled_dim": POOLED,
            "seq_len": 77}
    torch.manual_seed(0)
    module = ProjectorModule(net={"_target_": "projector.models.LearnedQueryDecoder", "width": 16, "depth": 1,
                                  "heads": 2}, dims=dims,
                             pooled_head={"_target_": "projector.models.PooledHead", "hidden": 16})
    save_projector(module.projector, models / "luna_projectors" / "tiny-proj")
    wide = {**dims, "text_dims": [768, 1280], "cond_dim": 2048, "pooled_dim": 1280}
    module = ProjectorModule(net={"_target_": "projector.models.LearnedQueryDecoder", "width": 16, "depth": 1,
                                  "heads": 2}, dims=wide,
                             pooled_head={"_target_": "projector.models.PooledHead", "hidden": 16})
    save_projector(module.projector, models / "luna_projectors" / "sdxl-width-proj")
    dets = [Detection((0.1, 0.1, 0.4, 0.4), None, "face", 0.9), Detection((0.55, 0.5, 0.9, 0.85), None, "face", 0.8),
            Detection((0.6, 0.05, 0.85, 0.3), None, "hand", 0.7)]
    det_file = write_detections(base / "input" / "detections.json", dets)
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(base / "input" / "luna_crop.png")
    # plain IP-Adapters for the tiny UNet (the runtime's test weights): one for the tiny tower's embeddings,
    # one for embeddings of another width
    from lsd_runtime.ip_adapter import write_tiny_ip_adapter
    from lsd_runtime.workflow import tiny_components

    unet = tiny_components(vision=False).pipe.unet
    ip = write_tiny_ip_adapter(unet, tower.dim, models / "ipadapter" / "tiny-ip.safetensors", seed=1, std=0.5)
    wrong_dim = write_tiny_ip_adapter(unet, tower.dim + 8, base / "work" / "ip-other-dim.safetensors", seed=2)
    return {"models": models, "detections_file": det_file, "detections": dets, "pairs": pairs, "ip_adapter": ip,
            "ip_wrong_dim": wrong_dim}
