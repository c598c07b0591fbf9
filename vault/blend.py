"""Neighbour weighting and conditioning blends (plain functions on arrays/tensors)."""
from __future__ import annotations

import numpy as np
import torch

WEIGHTINGS = ("mean", "softmax")


def neighbour_weights(scores: np.ndarray, valid: np.ndarray, weighting: str = "mean",
                      temperature: float = 0.05) -> np.ndarray:
    """Per-query weights over k neighbours summing to 1 over the valid ones.

    "mean": equal weights; "softmax": softmax(score / temperature), so closer matches count more.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r}: expected one of {WEIGHTINGS}")
    scores = np.asarray(scores, dtype=np.float64)
    if weighting == "mean":
        w = valid.astype(np.float64)
    else:
        if temperature <= 0:
            raise ValueError(f"temperature={temperature}: must be > 0")
        z = np.where(valid, scores / temperature, -np.inf)
        z = z - np.max(np.where(valid, z, -np.inf), axis=1, keepdims=True)
        w = np.where(valid, np.exp(z), 0.0)
    return (w / np.maximum(w.sum(1, keepdims=True), 1e-30)).astype(np.float32)


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def blend_linear(user, retrieved, w: float):
    """`(1 - w) * user + w * retrieved`, broadcasting a batch of 1 on either side."""
    user, retrieved = _as_tensor(user), _as_tensor(retrieved)
    if user.shape[1:] != retrieved.shape[1:]:
        raise ValueError(f"blend_linear: shapes {tuple(user.shape)} and {tuple(retrieved.shape)} differ")
    retrieved = retrieved.to(device=user.device, dtype=user.dtype)
    return (1.0 - w) * user + w * retrieved


def blend_concat(user, retrieved, user_pooled=None):
    """Retrieved tokens appended after the user's along the sequence axis ([B,77+77,C]).

    The way prompts longer than 77 tokens extend SDXL's sequence; the pooled vector stays the
    user's (returned second when `user_pooled` is given).
    """
    user, retrieved = _as_tensor(user), _as_tensor(retrieved)
    if user.shape[-1] != retrieved.shape[-1]:
        raise ValueError(f"blend_concat: widths {user.shape[-1]} and {retrieved.shape[-1]} differ")
    retrieved = retrieved.to(device=user.device, dtype=user.dtype)
    if retrieved.shape[0] != user.shape[0]:
        retrieved = retrieved.expand(user.shape[0], *retrieved.shape[1:])
    cond = torch.cat([user, retrieved], dim=1)
    return cond if user_pooled is None else (cond, user_pooled)


def weighted_rows(weights: np.ndarray, row_of: np.ndarray, rows) -> torch.Tensor:
    """Sum over neighbours of weight x row, computed once per unique row.

    weights [B,k], row_of [B,k] (index into `rows`, -1 for none), rows [U,...] -> [B,...] float32.
    """
    b = weights.shape[0]
    rows = _as_tensor(rows)
    mix = np.zeros((b, rows.shape[0]), dtype=np.float32)
    for r in range(b):
        ok = row_of[r] >= 0
        np.add.at(mix[r], row_of[r][ok], weights[r][ok])
    flat = rows.reshape(rows.shape[0], -1).float()
    return (torch.from_numpy(mix) @ flat).reshape(b, *rows.shape[1:])
