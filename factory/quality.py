"""The quality gate: pure checks on generated images (and latents), plus the seed of a retry.

A sample that fails is regenerated under the same key with a seed derived from its own
(`derive_seed(seed, attempt)`, deterministic, so a rerun makes the same choice), up to
`max_attempts` times in all. The first image that passes is kept, and its metadata records the
attempt and the seed that made it. A sample that fails every attempt is written nowhere and is
listed in its shard's stats with the reason of each attempt: the dataset then holds the quota
minus those samples, and the run's summary says how many and why (a bad image is never kept, and
no other sample is invented in its place: a checkpoint that only makes black images should be
fixed or excluded, not papered over).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

_SEED_STRIDE = 0x9E3779B1  # golden-ratio step: retry seeds far from the plan's own seeds


@dataclass(frozen=True)
class QualityConfig:
    max_attempts: int = 3  # 1 = no regeneration
    black_mean: float = 0.02  # mean brightness (0..1) below this -> black
    flat_std: float = 0.01  # std over all pixels below this -> flat
    enabled: bool = True

    @classmethod
    def from_cfg(cls, cfg: Any) -> "QualityConfig":
        if cfg is None:
            return cls()
        if not isinstance(cfg, Mapping):
            cfg = dict(cfg)
        known = {k: cfg[k] for k in ("max_attempts", "black_mean", "flat_std", "enabled") if k in cfg}
        return cls(**known)


def check_finite(array: Any) -> list[str]:
    """['nan'] when any value of a latent or image array is NaN or infinite."""
    a = np.asarray(array)
    return [] if np.isfinite(a).all() else ["nan"]


def check_image(image: np.ndarray, cfg: QualityConfig = QualityConfig()) -> list[str]:
    """Reasons an image (HxWxC, float in [0, 1] or uint8) is rejected; empty when it passes."""
    if not cfg.enabled:
        return []
    a = np.asarray(image)
    reasons = check_finite(a)
    if reasons:
        return reasons
    x = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
    if float(x.mean()) < cfg.black_mean:
        return ["black"]
    if float(x.std()) < cfg.flat_std:
        return ["flat"]
    return []


def derive_seed(seed: int, attempt: int) -> int:
    """The seed of attempt `attempt` (0 = the planned seed itself), within [0, 2**32)."""
    if attempt == 0:
        return int(seed)
    return (int(seed) + attempt * _SEED_STRIDE) % (2**32)


def flags(reasons_per_attempt: list[list[str]]) -> dict:
    """Quality flags recorded in a sample's metadata."""
    return {
        "passed": bool(reasons_per_attempt) and not reasons_per_attempt[-1],
        "attempts": len(reasons_per_attempt),
        "rejected_attempts": [r for r in reasons_per_attempt if r],
    }
