"""The quality gate: pure checks on generated images (and latents), plus the seed of a retry.

A sample that fails is regenerated under the same key with a seed derived from its own
(`derive_seed(seed, attempt)`, deterministic, so a rerun makes the same choice), up to
`max_attempts` times in all. The first image that passes is kept, and its metadata records the
attempt and the seed that made it. A sample that fails every attempt is written nowhere and is
listed in its shard's stats with the reason of each attempt: the dataset then holds the quota
minus those samples, and the run's summary says how many and why (a bad image is never kept, and
no other sample is invented in its place: a checkpoint that only makes black images should be
fixed or excluded, not papered over).

The poison guard (`PoisonGuard`, run by the driver) watches each checkpoint's first
`poison_window` units: when more than `poison_rate` of the images it generated there failed the
gate (every attempt counts), the checkpoint is stopped: no more of its units are scheduled, what
passed is kept, and its remaining samples are rendered by the other checkpoints (factory.run).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

_SEED_STRIDE = 0x9E3779B1  # golden-ratio step: retry seeds far from the plan's own seeds


@dataclass(frozen=True)
class QualityConfig:
    max_attempts: int = 3  # 1 = no regeneration
    black_mean: float = 0.02  # mean brightness (0..1) below this -> black
    flat_std: float = 0.01  # std over all pixels below this -> flat
    enabled: bool = True
    poison_rate: float | None = 0.2  # stop a checkpoint whose failed-image rate exceeds this (None: never)
    poison_window: int = 4  # ... over its first this many units

    @classmethod
    def from_cfg(cls, cfg: Any) -> "QualityConfig":
        if cfg is None:
            return cls()
        if not isinstance(cfg, Mapping):
            cfg = dict(cfg)
        known = {k: cfg[k] for k in ("max_attempts", "black_mean", "flat_std", "enabled", "poison_rate",
                                     "poison_window") if k in cfg}
        out = cls(**known)
        if out.poison_rate is not None and not 0.0 <= float(out.poison_rate) < 1.0:
            raise ValueError(f"quality.poison_rate must be in [0, 1) or null (never stop a checkpoint), "
                             f"got {out.poison_rate!r}")
        if int(out.poison_window) < 1:
            raise ValueError(f"quality.poison_window must be >= 1 unit, got {out.poison_window!r}")
        return out


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


def gate_counts(result: Mapping) -> tuple[int, int, Counter]:
    """(images gated, images that failed, failure reasons) of one unit's result, every attempt counted."""
    checks = failed = 0
    reasons: Counter = Counter()
    for s in result.get("samples", []):
        checks += int(s["quality"]["attempts"])
        for r in s["quality"]["rejected_attempts"]:
            failed += 1
            reasons.update(r)
    for r in result.get("rejected", []):
        checks += len(r["reasons"])
        failed += len(r["reasons"])
        for attempt in r["reasons"]:
            reasons.update(attempt)
    return checks, failed, reasons


@dataclass
class CheckpointHealth:
    """A checkpoint's quality-gate record over its first `poison_window` units."""
    units: int = 0
    checks: int = 0
    failed: int = 0
    reasons: Counter = field(default_factory=Counter)
    stopped: bool = False
    reason: str = ""

    @property
    def rate(self) -> float:
        return self.failed / self.checks if self.checks else 0.0

    def to_dict(self) -> dict:
        return {"units": self.units, "checks": self.checks, "failed": self.failed, "rate": round(self.rate, 4),
                "reasons": dict(self.reasons), "stopped": self.stopped, "reason": self.reason}


class PoisonGuard:
    """Per checkpoint: gate failures over its first `window` units; `observe` says when to stop it.

    `totals` (checkpoint -> units it has in this run) lets a checkpoint with fewer units than the
    window be judged on all of them."""

    def __init__(self, rate: float | None, window: int, totals: Mapping[str, int] | None = None):
        self.rate_limit, self.window = rate, max(1, int(window))
        self.totals = dict(totals or {})
        self.health: dict[str, CheckpointHealth] = {}

    def stopped(self) -> dict[str, CheckpointHealth]:
        return {c: h for c, h in self.health.items() if h.stopped}

    def stop(self, checkpoint: str, reason: str) -> None:
        """Mark a checkpoint stopped (e.g. by an earlier run's record)."""
        h = self.health.setdefault(checkpoint, CheckpointHealth())
        h.stopped, h.reason = True, reason

    def observe(self, checkpoint: str, result: Mapping) -> bool:
        """Count one finished unit of `checkpoint`; True when this result stops it."""
        h = self.health.setdefault(checkpoint, CheckpointHealth())
        if h.stopped or h.units >= self.window:
            return False
        checks, failed, reasons = gate_counts(result)
        h.units, h.checks, h.failed = h.units + 1, h.checks + checks, h.failed + failed
        h.reasons.update(reasons)
        judged = h.units >= min(self.window, self.totals.get(checkpoint, self.window))
        if self.rate_limit is None or not judged or h.rate <= float(self.rate_limit):
            return False
        why = ", ".join(f"{k} {v}" for k, v in h.reasons.most_common())
        h.stopped = True
        h.reason = (f"{h.failed} of {h.checks} images failed the quality gate ({why}) over its first {h.units} "
                    f"unit(s): {h.rate:.0%} > quality.poison_rate {float(self.rate_limit):.0%}")
        return True
