"""Synthetic pairs folders for tests and benchmarks (no models, no images).

Every prompt has a small latent `z` derived from its text (and the seed). The image
embeddings of a prompt are noisy copies of a centre `normalize(cluster_centre + spread * z @ B)`,
and its conditioning is `tanh(z @ A)`: both are functions of the prompt, so nearest neighbours
in image space find the right conditioning, and `synthetic_encode` re-encodes a prompt text
to exactly the conditioning stored for it (what prompts-only vaults need in tests).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from extraction.pairs import PairsPart, write_part

LATENT_DIM = 16
SEQ_LEN = 77


def synthetic_fingerprint(seed: int = 0) -> str:
    """Text-encoder fingerprint the synthetic encoder of `seed` stands for."""
    return f"synthetic-te-{seed}"


def _prompt_latent(text: str, seed: int) -> np.ndarray:
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return rng.standard_normal(LATENT_DIM).astype(np.float32)


def _cond_weights(text_dims, pooled_dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 1, *text_dims, pooled_dim])
    scale = 1.0 / np.sqrt(LATENT_DIM)
    a = (rng.standard_normal((LATENT_DIM, SEQ_LEN * sum(text_dims)), dtype=np.float32) * scale)
    p = (rng.standard_normal((LATENT_DIM, pooled_dim), dtype=np.float32) * scale)
    return a, p


def synthetic_encode(prompts: list[str], text_dims=(32, 64), pooled_dim: int = 64, seed: int = 0):
    """The synthetic text encoder: `(cond [B,77,sum(text_dims)], pooled [B,pooled_dim])` float32.

    Same signature shape as the runtime's `encode(prompts)` once the dims are bound.
    """
    a, p = _cond_weights(tuple(text_dims), pooled_dim, seed)
    z = np.stack([_prompt_latent(t, seed) for t in prompts]) if prompts else np.zeros((0, LATENT_DIM), np.float32)
    cond = np.tanh(z @ a).reshape(len(prompts), SEQ_LEN, sum(text_dims))
    return cond.astype(np.float32), np.tanh(z @ p).astype(np.float32)


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _prompts(n_prompts: int, dim: int, n_clusters: int, seed: int, categories, spread: float):
    """(rng, cluster, text, latent, unit centre) of every prompt; the rng continues for the images."""
    rng = np.random.default_rng([seed, 2])
    centres = _normalize(rng.standard_normal((n_clusters, dim), dtype=np.float32))
    b = rng.standard_normal((LATENT_DIM, dim), dtype=np.float32) / np.sqrt(dim)
    prompt_cluster = np.arange(n_prompts) % n_clusters
    texts = [
        f"synthetic {categories[c % len(categories)]} prompt {i} (cluster {c})"
        for i, c in enumerate(prompt_cluster)
    ]
    z = np.stack([_prompt_latent(t, seed) for t in texts])
    return rng, prompt_cluster, texts, z, _normalize(centres[prompt_cluster] + spread * _normalize(z @ b))


def synthetic_queries(n_queries: int, n_prompts: int, dim: int, n_clusters: int = 8, seed: int = 0,
                      categories=("eyes", "hands", "faces"), spread: float = 0.6, noise: float = 0.3,
                      query_seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """New images of the prompts of `write_synthetic_pairs(..., n_prompts, dim, n_clusters, seed)`:
    (embeds [n_queries, dim] float32 rounded to fp16 as stored embeds are, prompt of each).

    Drawn like the stored images (prompt centre + offset of relative norm `noise`) with other
    offsets, so none of them is in a vault of those pairs: what a user's new crops look like.
    """
    _, _, _, _, centre = _prompts(n_prompts, dim, n_clusters, seed, categories, spread)
    rng = np.random.default_rng([seed, 5, query_seed])
    prompt = rng.integers(0, n_prompts, n_queries)
    offset = rng.standard_normal((n_queries, dim), dtype=np.float32) * (noise / np.sqrt(dim))
    return _normalize(centre[prompt] + offset).astype(np.float16).astype(np.float32), prompt


def write_synthetic_pairs(
    folder: str | os.PathLike,
    n_images: int,
    n_prompts: int,
    dim: int,
    text_dims=(32, 64),
    pooled_dim: int = 64,
    n_clusters: int = 8,
    seed: int = 0,
    categories=("eyes", "hands", "faces"),
    checkpoints=("ckpt_a", "ckpt_b"),
    parts: int = 1,
    vision_model: str = "synthetic",
    campaigns=("camp_1", "camp_2"),
    spread: float = 0.6,
    noise: float = 0.3,
    te_fingerprint: str | None = None,
    prompt_order: str = "cycle",
) -> Path:
    """Write a clustered synthetic pairs folder; returns the folder.

    Prompt i belongs to cluster `i % n_clusters` and its category is
    `categories[cluster % len(categories)]`, its centre lies at relative distance `spread` from the
    cluster centre; image j shows prompt `j % n_prompts`
    (so every prompt has images once n_images >= n_prompts), with a random checkpoint
    and campaign; `prompt_order="blocks"` gives image j prompt `j * n_prompts // n_images`
    instead, so each part holds only its own prompts (large benchmarks). `noise` is the norm of an image's offset from its prompt centre
    relative to the unit centre. Images are split into `parts` part files
    (`part-00000.h5`, ...), each with the prompts its images use; each prompt's conditioning is
    stored once, by the first part that uses it.
    """
    if n_images < 1 or n_prompts < 1 or dim < 1:
        raise ValueError("write_synthetic_pairs: n_images, n_prompts and dim must be >= 1")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fingerprint = te_fingerprint or synthetic_fingerprint(seed)
    rng, prompt_cluster, texts, z, prompt_centre = _prompts(n_prompts, dim, n_clusters, seed, categories, spread)
    a, p = _cond_weights(tuple(text_dims), pooled_dim, seed)

    if prompt_order == "cycle":
        image_prompt = np.arange(n_images) % n_prompts
    elif prompt_order == "blocks":
        image_prompt = np.arange(n_images, dtype=np.int64) * n_prompts // n_images
    else:
        raise ValueError(f"prompt_order={prompt_order!r}: expected cycle or blocks")
    image_ckpt = rng.integers(0, len(checkpoints), n_images)
    image_camp = rng.integers(0, len(campaigns), n_images)
    bounds = np.linspace(0, n_images, parts + 1).astype(int)
    stored = np.zeros(0, dtype=np.int64)
    for pi in range(parts):
        lo, hi = int(bounds[pi]), int(bounds[pi + 1])
        gp = image_prompt[lo:hi]
        used, local = np.unique(gp, return_inverse=True)
        part_rng = np.random.default_rng([seed, 3, pi])
        offset = part_rng.standard_normal((hi - lo, dim), dtype=np.float32) * (noise / np.sqrt(dim))
        embed = _normalize(prompt_centre[gp] + offset)
        new = ~np.isin(used, stored)  # a prompt's conditioning is stored by the first part using it
        stored = np.union1d(stored, used)
        zu = z[used[new]]
        cond = np.empty((len(zu), SEQ_LEN, sum(text_dims)), np.float16)
        for lo_p in range(0, len(zu), 256):  # chunked: real SDXL widths are 600 KB a prompt in fp32
            cond[lo_p : lo_p + 256] = np.tanh(zu[lo_p : lo_p + 256] @ a).reshape(-1, SEQ_LEN, sum(text_dims))
        images = {
            "key": np.array([f"{seed:03d}{j:09d}" for j in range(lo, hi)], dtype=object),
            "embed": embed,
            "prompt_id": local.astype(np.int64),
            "checkpoint": np.array([checkpoints[c] for c in image_ckpt[lo:hi]], dtype=object),
            "category": np.array([categories[prompt_cluster[q] % len(categories)] for q in gp], dtype=object),
            "campaign": np.array([campaigns[c] for c in image_camp[lo:hi]], dtype=object),
            "seed": np.arange(lo, hi, dtype=np.int64),
        }
        prompts = {
            "text": np.array([texts[u] for u in used], dtype=object),
            "cond": cond,
            "pooled": np.tanh(zu @ p),
            "te_fingerprint": np.array([fingerprint] * len(used), dtype=object),
            "cond_row": np.where(new, np.cumsum(new) - 1, -1),
        }
        attrs = {
            "vision_model": vision_model,
            "vision_dim": int(dim),
            "text_dims": [int(d) for d in text_dims],
            "pooled_dim": int(pooled_dim),
        }
        write_part(folder / f"part-{pi:05d}.h5", PairsPart(images=images, prompts=prompts, attrs=attrs))
    return folder
