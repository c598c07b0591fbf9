"""The committed toy checkpoints (`luna/models/toy/weights/`, written by `luna make-toy`) and loaders.

    from luna.models.toy import models
    models.checkpoint_paths()        # {"toy-base-flat": Path, "toy-pony-outline": Path}
    pipe = models.load_pipeline("toy-base-flat")   # StableDiffusionXLPipeline via luna.models.sdxl.load_sdxl
    tower = models.load_vision()     # luna.models.vision.VisionTower (open_clip luna-toy-vit)

The checkpoints are ordinary single-file SDXL checkpoints (original key layout, fp16) that
`luna.models.sdxl` classifies as size "toy" (configs/sdxl-toy): every stage loads them as it loads
a user's file. They generate at `SIZE` x `SIZE` (latents SIZE/4). Families: "base" (flat shapes)
and "pony" (outlined shapes, text encoders fine-tuned further: another te_fingerprint).
"""
from __future__ import annotations

from pathlib import Path

import torch

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SIZE = 32  # generation size of the toy checkpoints (pixels)
CHECKPOINTS = {"toy-base-flat": ("base", "flat"), "toy-pony-outline": ("pony", "outline")}  # name -> (family, style)
VISION_NAME = "luna-toy-vit"
VISION_FILE = WEIGHTS_DIR / f"{VISION_NAME}.safetensors"


def checkpoint_paths(folder: Path | None = None) -> dict[str, Path]:
    """{checkpoint name: single-file path}; FileNotFoundError naming the file when one is missing."""
    folder = Path(folder) if folder is not None else WEIGHTS_DIR
    out = {}
    for name in CHECKPOINTS:
        path = folder / f"{name}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"toy checkpoint {path} is missing (write it with `luna make-toy`)")
        out[name] = path
    return out


def load_pipeline(name: str = "toy-base-flat", device="cpu", dtype=torch.float32, folder: Path | None = None):
    """A StableDiffusionXLPipeline of one toy checkpoint, loaded exactly as a user's single file."""
    from luna.models.sdxl import load_sdxl

    if name not in CHECKPOINTS:
        raise ValueError(f"unknown toy checkpoint {name!r}; one of {list(CHECKPOINTS)}")
    return load_sdxl(checkpoint_paths(folder)[name], device=device, dtype=dtype)


def load_vision(device="cpu", dtype=torch.float32, weights: Path | None = None):
    """The trained toy vision tower (open_clip `luna-toy-vit`, 32x32 input, 32-d embeddings)."""
    from luna.models.vision import load_vision as _load

    path = Path(weights) if weights is not None else VISION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"toy vision weights {path} are missing (write them with `luna make-toy`)")
    return _load(VISION_NAME, weights=path, device=device, dtype=dtype)
