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

The optional agreement check (`quality.agreement`, off by default): with an open_clip tower that has a
text side (`vision`, `weights`) and `min_score` set, each image's cosine between its image embedding and
its prompt's text embedding (luna.models.vision.text_agreement, the `clip_text` of `luna ab`) must reach
min_score, else the image fails the gate like a black one ("agreement 0.1234 < min_score 0.2500"). The
kept image's score is recorded in its quality metadata (`agreement`). `AgreementScorer` holds the tower
(one per actor).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from factory.shards import to_uint8

_SEED_STRIDE = 0x9E3779B1  # golden-ratio step: retry seeds far from the plan's own seeds


@dataclass(frozen=True)
class AgreementConfig:
    """`quality.agreement`: image-prompt agreement through an open_clip tower's own text side."""
    vision: str | None = None  # open_clip architecture with a text side ("tiny", "ViT-H-14", ...); null: off
    weights: str | None = None  # local open_clip checkpoint holding both towers (same path on every node)
    min_score: float | None = None  # image-text cosine an image must reach; null: off
    device: str = "auto"  # where the tower runs in the actor (auto: its GPU when it has one)
    batch_size: int = 16  # images per tower forward

    @property
    def active(self) -> bool:
        return self.vision is not None and self.min_score is not None

    @classmethod
    def from_cfg(cls, cfg: Any) -> "AgreementConfig":
        if cfg is None:
            return cls()
        if not isinstance(cfg, Mapping):
            cfg = dict(cfg)
        unknown = sorted(set(cfg) - {"vision", "weights", "min_score", "device", "batch_size"})
        if unknown:
            raise ValueError(f"quality.agreement: unknown key(s) {unknown} (vision, weights, min_score, device, "
                             f"batch_size)")
        out = cls(**dict(cfg))
        if (out.vision is None) != (out.min_score is None):
            have, need = ("vision", "min_score") if out.vision is not None else ("min_score", "vision")
            raise ValueError(f"quality.agreement.{have} is set but quality.agreement.{need} is null: set both to "
                             f"turn the agreement check on, or neither")
        if out.min_score is not None and not -1.0 <= float(out.min_score) <= 1.0:
            raise ValueError(f"quality.agreement.min_score is a cosine in [-1, 1], got {out.min_score!r}")
        if int(out.batch_size) < 1:
            raise ValueError(f"quality.agreement.batch_size must be >= 1, got {out.batch_size!r}")
        return out


@dataclass(frozen=True)
class QualityConfig:
    max_attempts: int = 3  # 1 = no regeneration
    black_mean: float = 0.02  # mean brightness (0..1) below this -> black
    flat_std: float = 0.01  # std over all pixels below this -> flat
    enabled: bool = True
    poison_rate: float | None = 0.2  # stop a checkpoint whose failed-image rate exceeds this (None: never)
    poison_window: int = 4  # ... over its first this many units
    agreement: AgreementConfig = AgreementConfig()  # image-prompt agreement (off by default)

    @classmethod
    def from_cfg(cls, cfg: Any) -> "QualityConfig":
        if cfg is None:
            return cls()
        if not isinstance(cfg, Mapping):
            cfg = dict(cfg)
        known = {k: cfg[k] for k in ("max_attempts", "black_mean", "flat_std", "enabled", "poison_rate",
                                     "poison_window") if k in cfg}
        out = cls(**known, agreement=AgreementConfig.from_cfg(cfg.get("agreement")))
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
    if a.dtype == np.uint8:
        x = a.astype(np.float32) / 255.0
    elif a.dtype == np.float32 and a.flags.c_contiguous:
        x = a  # what astype would copy, value for value and in the same layout: the same mean and std
    else:
        x = a.astype(np.float32)
    if float(x.mean()) < cfg.black_mean:
        return ["black"]
    if float(x.std()) < cfg.flat_std:
        return ["flat"]
    return []


def check_agreement(score: float | None, cfg: QualityConfig) -> list[str]:
    """['agreement S < min_score M'] when an image's image-prompt cosine is below the threshold; empty
    when it passes or the check is off (score None: not computed)."""
    a = cfg.agreement
    if not cfg.enabled or not a.active or score is None or score >= float(a.min_score):
        return []
    return [f"agreement {score:.4f} < min_score {float(a.min_score):.4f}"]


def reason_kind(reason: str) -> str:
    """A reason's kind, for counting ("agreement 0.1 < min_score 0.2" -> "agreement")."""
    return reason.split(" ", 1)[0]


class AgreementScorer:
    """An open_clip tower and its text side: `score(images, prompts)` -> image-prompt cosines.

    Loaded once (per actor); raises naming `quality.agreement.vision` when the tower has no text side."""

    def __init__(self, cfg: AgreementConfig):
        from luna.models import vision
        from luna.settings import resolve_device

        self.cfg = cfg
        self.tower = vision.load_vision(str(cfg.vision), weights=cfg.weights, device=resolve_device(cfg.device))
        try:
            self.text = vision.TextSide(self.tower)
        except vision.TextSideError as e:
            raise ValueError(f"quality.agreement.vision={cfg.vision!r} (weights={cfg.weights!r}): {e}; the agreement "
                             f"check needs a full open_clip checkpoint (image and text towers), not a vision-only "
                             f"file") from e

    def score(self, images: list, prompts: list[str]) -> list[float]:
        """Cosine of each image (HxWx3 float in [0, 1] or uint8) with its prompt, in order."""
        from PIL import Image

        from luna.models import vision

        out: list[float] = []
        step = int(self.cfg.batch_size)
        for i in range(0, len(images), step):
            pil = [Image.fromarray(to_uint8(im)) for im in images[i : i + step]]
            emb = vision.embed(self.tower, pil).embed
            out.extend(vision.text_agreement(emb, self.text(list(prompts[i : i + step]))))
        return out


def derive_seed(seed: int, attempt: int) -> int:
    """The seed of attempt `attempt` (0 = the planned seed itself), within [0, 2**32)."""
    if attempt == 0:
        return int(seed)
    return (int(seed) + attempt * _SEED_STRIDE) % (2**32)


def flags(reasons_per_attempt: list[list[str]], agreement: float | None = None) -> dict:
    """Quality flags recorded in a sample's metadata (`agreement`: the kept image's score, when computed)."""
    out = {
        "passed": bool(reasons_per_attempt) and not reasons_per_attempt[-1],
        "attempts": len(reasons_per_attempt),
        "rejected_attempts": [r for r in reasons_per_attempt if r],
    }
    if agreement is not None:
        out["agreement"] = round(float(agreement), 4)
    return out


def gate_counts(result: Mapping) -> tuple[int, int, Counter]:
    """(images gated, images that failed, failure reasons) of one unit's result, every attempt counted."""
    checks = failed = 0
    reasons: Counter = Counter()
    for s in result.get("samples", []):
        checks += int(s["quality"]["attempts"])
        for r in s["quality"]["rejected_attempts"]:
            failed += 1
            reasons.update(reason_kind(x) for x in r)
    for r in result.get("rejected", []):
        checks += len(r["reasons"])
        failed += len(r["reasons"])
        for attempt in r["reasons"]:
            reasons.update(reason_kind(x) for x in attempt)
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
