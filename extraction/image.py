"""The image side: an open_clip vision tower over batches of shard pixels, through `luna.models.vision.embed`
(the one image -> embedding path, with its precision policy: fp16 autocast on CUDA, fp32 on CPU)."""
from __future__ import annotations

import time

import numpy as np
import torch

from luna.models.vision import embed


class VisionModelError(ValueError):
    """The vision model cannot be built or its weights do not fit its architecture."""


def load_tower(name: str, weights: str | None, device: str):
    """`luna.models.vision.load_vision` with user errors (unknown name, wrong weights) as VisionModelError."""
    from luna.models.vision import load_vision

    try:
        return load_vision(name=name, weights=weights, device=device)
    except (RuntimeError, KeyError, ValueError, OSError) as e:
        if isinstance(e, VisionModelError):
            raise
        what = f"vision={name}" + (f" vision.weights={weights}" if weights else "")
        raise VisionModelError(f"{what}: cannot load the vision model: {e}") from e


class ImageEncoder:
    """Projected image embeddings `[B, D]` (and on request penultimate tokens `[B, T, W]`) of pixel batches."""

    def __init__(self, tower, device: str = "cpu", tokens: bool = False, autocast: bool = True):
        self.tower, self.device, self.tokens = tower, torch.device(device), bool(tokens)
        self.autocast = bool(autocast) and self.device.type == "cuda"  # embed's policy: never on CPU
        self.images = 0
        self.seconds = 0.0  # in the forward (incl. host<->device copies)
        self.wait_seconds = 0.0  # waiting for decoded batches (collect_shards)

    @property
    def model_id(self) -> str:
        return self.tower.model_id

    @property
    def dim(self) -> int:
        return int(self.tower.dim)

    def __call__(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        t = time.perf_counter()
        out = embed(self.tower, pixels, tokens=self.tokens, autocast=self.autocast)
        self.images += len(pixels)
        embeds = out.embed.numpy()
        tokens = out.tokens.numpy() if out.tokens is not None else None
        self.seconds += time.perf_counter() - t
        return embeds, tokens


class ShardImages:
    """Everything the image side produced for one shard (or why it produced nothing)."""

    def __init__(self, index: int, metas=(), embed=None, tokens=None, bad_samples=(), error=None, count=0):
        self.index, self.metas = index, list(metas)
        self.embed, self.tokens = embed, tokens
        self.bad_samples, self.error, self.count = list(bad_samples), error, count


def collect_shards(items, encoder: ImageEncoder, dtype: str = "float16"):
    """Run `encoder` over a stream of reader `Batch`/`ShardEnd` items; yield one ShardImages per shard
    end. Batches of a shard that turns out corrupt are dropped with it (the shard is reported)."""
    from extraction.reader import Batch

    acc: dict[int, dict] = {}
    items = iter(items)
    while True:
        t = time.perf_counter()
        item = next(items, None)
        encoder.wait_seconds += time.perf_counter() - t
        if item is None:
            return
        if isinstance(item, Batch):
            embed, tokens = encoder(item.pixels)
            a = acc.setdefault(item.shard, {"metas": [], "embed": [], "tokens": []})
            a["metas"] += item.meta
            a["embed"].append(embed.astype(dtype))
            if tokens is not None:
                a["tokens"].append(tokens.astype(dtype))
            continue
        a = acc.pop(item.shard, {"metas": [], "embed": [], "tokens": []})
        if item.error is not None:
            yield ShardImages(item.shard, bad_samples=item.bad_samples, error=item.error, count=item.count)
            continue
        embed = np.concatenate(a["embed"]) if a["embed"] else np.zeros((0, encoder.dim), dtype)
        tokens = np.concatenate(a["tokens"]) if a["tokens"] else None
        yield ShardImages(item.shard, a["metas"], embed, tokens, item.bad_samples, None, item.count)
