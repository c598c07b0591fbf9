"""A closed-loop synthetic pairs set for tests and benchmarks: the answer is known.

Each prompt p has a latent z_p (k dims). Its images' embeddings are a linear view of z_p plus
image noise (one image per checkpoint); its conditioning is a known nonlinear function of z_p:
token t = U_half tanh(V_t z_p + b_t) (U shared by all tokens, as in SDXL where one final layer
writes every position), padding positions share one function of z_p plus a small per-position
term, BOS is constant, and the CLIP-L and bigG halves have different scales. So the
conditioning is a nonlinear function of the image embedding plus noise, which a linear map
cannot fit exactly and a per-token head must learn 77 times.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from extraction.pairs import PairsPart, write_part

WORDS = ("red blue green gold silver silk wool eyes hands ring face hair lace smile freckles glass "
         "night light warm cold soft sharp portrait close-up detailed ornate").split()


def write_closed_loop_pairs(
    folder: str | Path,
    n_prompts: int = 200,
    checkpoints: tuple[str, ...] = ("ckpt_a", "ckpt_b"),
    dim: int = 32,
    text_dims: tuple[int, int] = (16, 32),
    pooled_dim: int = 16,
    latent: int = 8,
    rank: int = 12,
    image_noise: float = 0.05,
    cond_noise: float = 0.02,
    nonlinearity: float = 2.0,
    tokens: tuple[int, int] | None = None,
    seq_len: int = 77,
    seed: int = 0,
    vision_model: str = "synthetic-closed-loop",
    parts: int = 1,
) -> Path:
    """Write `parts` HDF5 parts under `folder`; returns the folder."""
    rng = np.random.default_rng(seed)
    c = sum(text_dims)
    z = rng.standard_normal((n_prompts, latent)).astype(np.float32)
    # the ground-truth maps (fixed by `seed`)
    a = rng.standard_normal((latent, dim)) / np.sqrt(latent)
    u = rng.standard_normal((rank, c)) / np.sqrt(rank)
    u[:, text_dims[0]:] *= 3.0  # bigG half on another scale than CLIP-L
    v = rng.standard_normal((seq_len, latent, rank)) * 0.8 / np.sqrt(latent) + rng.standard_normal((1, latent, rank)) / np.sqrt(latent)
    b = rng.standard_normal((seq_len, rank)) * 0.3
    v_pad = rng.standard_normal((latent, rank)) * 1.2 / np.sqrt(latent)
    v_quad = rng.standard_normal((latent, rank)) / np.sqrt(latent)
    w_pool = rng.standard_normal((latent, pooled_dim)) / np.sqrt(latent)
    bos = rng.standard_normal(c) * 5.0
    offset = rng.standard_normal(c)

    words = [rng.choice(WORDS, size=rng.integers(2, 12)).tolist() for _ in range(n_prompts)]
    texts = [f"{' '.join(w)} {i}" for i, w in enumerate(words)]
    from projector.data import content_lengths

    n_content = content_lengths(texts, seq_len)
    pos = np.arange(seq_len)
    # saturating and quadratic terms: a linear map of the embedding cannot fit them
    quad = (np.einsum("pk,kr->pr", z, v_quad) ** 2 - 1.0) * nonlinearity / 2
    content_h = np.tanh(nonlinearity * np.einsum("pk,tkr->ptr", z, v) + b) + quad[:, None, :]  # [P, L, r]
    pad_h = np.tanh(nonlinearity * z @ v_pad)[:, None, :] + quad[:, None, :] + 0.1 * b[None]  # [P, L, r]
    is_pad = pos[None, :, None] >= n_content[:, None, None]
    cond = np.where(is_pad, pad_h, content_h) @ u + offset
    cond += cond_noise * rng.standard_normal(cond.shape)
    cond[:, 0] = bos
    pooled = np.tanh(z @ w_pool) * 2.0 + 0.5

    n_img = n_prompts * len(checkpoints)
    prompt_id = np.repeat(np.arange(n_prompts), len(checkpoints))
    ckpt = np.tile(np.array(checkpoints, dtype=object), n_prompts)
    embed = z[prompt_id] @ a + image_noise * rng.standard_normal((n_img, dim))
    images = {
        "key": np.array([f"img{i:06d}" for i in range(n_img)], dtype=object),
        "embed": embed, "prompt_id": prompt_id, "checkpoint": ckpt,
        "category": np.array(["eyes" if i % 2 else "hands" for i in range(n_img)], dtype=object),
        "campaign": np.array(["synthetic"] * n_img, dtype=object),
        "seed": np.arange(n_img),
    }
    if tokens:
        t, wdt = tokens
        proj = rng.standard_normal((t, dim, wdt)) / np.sqrt(dim)
        images["tokens"] = np.einsum("nd,tdw->ntw", embed, proj) + image_noise * rng.standard_normal((n_img, t, wdt))
    prompts = {
        "text": np.array(texts, dtype=object), "cond": cond, "pooled": pooled,
        "te_fingerprint": np.array(["te-synthetic"] * n_prompts, dtype=object),
    }
    attrs = {"vision_model": vision_model, "vision_dim": dim, "text_dims": list(text_dims), "pooled_dim": pooled_dim}
    folder = Path(folder)
    # split by prompt into parts, each part with its own local prompt table
    for i, chunk in enumerate(np.array_split(np.arange(n_prompts), parts)):
        sel = np.flatnonzero(np.isin(prompt_id, chunk))
        local = {p: j for j, p in enumerate(chunk)}
        part_images = {k: v[sel] for k, v in images.items()}
        part_images["prompt_id"] = np.array([local[p] for p in prompt_id[sel]], dtype=np.int64)
        part_prompts = {k: v[chunk] for k, v in prompts.items()}
        write_part(folder / f"part-{i:05d}.h5", PairsPart(part_images, part_prompts, attrs))
    return folder
