"""Hybrid conditioning: the vault and the projector together ("vault for known, neural for novel").

Each crop's image embedding queries the vault (its neighbours' blended conditioning V and the top
neighbour's cosine similarity s) and goes through the projector (P). A *policy* turns s into the
vault's share w of the memory row M = w * V + (1 - w) * P, which is then blended with the text
row like any vault or projector row (`retrieval.weight`, `retrieval.blend`):

- gate: w = 1 when s >= tau else 0 (the vault when the crop is close to something it has seen,
  the projector when it is novel);
- mix:  w = sigmoid((s - tau) / softness): a soft gate; softness -> 0 is the gate, a large
  softness a fixed half-and-half mix.

The policy functions are pure (numpy in, numpy out); `HybridSource` is the runtime's source.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from lsd_runtime.conditioning import (BLENDS, ConditioningError, CondRow, CropEmbedder, ProjectorSource, TextSource,
                                      VaultSource, _mix)

POLICIES = ("gate", "mix")


@dataclass
class HybridSettings:
    policy: str = "gate"  # gate | mix
    tau: float = 0.8  # top-neighbour cosine similarity at which the vault takes over
    softness: float = 0.05  # mix only: width of the sigmoid around tau

    def check(self) -> "HybridSettings":
        if self.policy not in POLICIES:
            raise ConditioningError(f"hybrid.policy={self.policy!r}: choose one of {POLICIES}")
        if not -1.0 <= float(self.tau) <= 1.0:
            raise ConditioningError(f"hybrid.tau={self.tau}: a cosine similarity, must be in [-1, 1]")
        if self.policy == "mix" and not float(self.softness) > 0:
            raise ConditioningError(f"hybrid.softness={self.softness}: must be > 0")
        return self


def gate(top_similarity, tau: float) -> np.ndarray:
    """Vault share per crop under the gate policy: 1.0 exactly where similarity >= tau, else 0.0."""
    s = np.asarray(top_similarity, dtype=np.float64)
    return (s >= float(tau)).astype(np.float64)


def mix(top_similarity, tau: float, softness: float = 0.05) -> np.ndarray:
    """Vault share per crop under the mix policy: sigmoid((s - tau) / softness), in (0, 1)."""
    s = np.asarray(top_similarity, dtype=np.float64)
    if not softness > 0:
        raise ValueError(f"softness={softness}: must be > 0")
    z = np.clip((s - float(tau)) / float(softness), -60.0, 60.0)  # no overflow far from tau
    return 1.0 / (1.0 + np.exp(-z))


def vault_share(top_similarity, settings: HybridSettings) -> np.ndarray:
    """The vault's share w per crop for `settings.policy` (a crop with no neighbour gets 0)."""
    s = np.nan_to_num(np.asarray(top_similarity, dtype=np.float64), nan=-np.inf)
    found = np.isfinite(s)
    s = np.where(found, s, -2.0)
    w = gate(s, settings.tau) if settings.policy == "gate" else mix(s, settings.tau, settings.softness)
    return np.where(found, w, 0.0)


def combine(vault_rows: torch.Tensor, projector_rows: torch.Tensor, share) -> torch.Tensor:
    """share * vault + (1 - share) * projector, per batch item ([B, ...] each, share [B])."""
    if vault_rows.shape != projector_rows.shape:
        raise ConditioningError(f"vault rows {tuple(vault_rows.shape)} and projector rows "
                                f"{tuple(projector_rows.shape)} differ: the vault and the projector were built for "
                                "different text encoders")
    w = torch.as_tensor(np.asarray(share), dtype=torch.float32).view(-1, *([1] * (vault_rows.ndim - 1)))
    return w * vault_rows.float() + (1.0 - w) * projector_rows.float()


class HybridSource:
    """Crop embeddings -> vault neighbours and projector -> policy-weighted memory -> blended with text.

    Takes an already checked `VaultSource` and `ProjectorSource` (same text source and vision tower)
    so every vision-model / format check of those sources applies; their k, category, weighting and
    temperature (vault) are used, the text blend is this source's `weight` / `blend`.
    """

    name = "hybrid"

    def __init__(self, vault_source: VaultSource, projector_source: ProjectorSource, *,
                 settings: HybridSettings | None = None, weight: float = 0.5, blend: str = "linear"):
        if blend not in BLENDS:
            raise ConditioningError(f"hybrid blend={blend!r}: choose one of {BLENDS}")
        if not 0.0 <= float(weight) <= 1.0:
            raise ConditioningError(f"hybrid weight={weight}: must be in [0, 1]")
        if vault_source.embedder.model_id != projector_source.embedder.model_id:
            raise ConditioningError("hybrid: the vault and the projector must embed crops with the same vision tower")
        self.vault_source, self.projector_source = vault_source, projector_source
        self.settings = (settings or HybridSettings()).check()
        self.text: TextSource = vault_source.text
        self.embedder: CropEmbedder = vault_source.embedder
        self.weight, self.blend = float(weight), blend

    def describe(self) -> dict:
        """What the record says about retrieval: the vault part's family filter and warning (as a
        VaultSource's), the policy, and both parts' settings."""
        v, p = self.vault_source, self.projector_source
        return {**v.describe(), "source": self.name, "hybrid": asdict(self.settings), "weight": self.weight,
                "blend": self.blend,
                "parts": {"vault": {"k": v.k, "category": v.category, "weighting": v.weighting,
                                    "temperature": v.temperature, "vision_model": v.vision_model},
                          "projector": {"vision_model": p.embedder.model_id, "weight": p.weight, "blend": p.blend}}}

    def rows(self, crops) -> list[CondRow]:
        embeds = self.embedder(crops)
        v = self.vault_source
        encode = self.text.encode if v.mode != "stored" else None
        res = v.vault.query(embeds.numpy(), k=v.k, category=v.category, filters=v.filters, weighting=v.weighting,
                            temperature=v.temperature, encode=encode)
        proj = self.projector_source.projector
        with torch.no_grad():
            p_cond, p_pooled = proj(embeds.to(next(proj.buffers()).device))
        top = np.array([max((float(n.get("score", -np.inf)) for n in nbs), default=-np.inf) for nbs in res.neighbours])
        share = vault_share(top, self.settings)
        m_cond = combine(torch.as_tensor(res.cond).float(), p_cond.float().cpu(), share)
        m_pooled = combine(torch.as_tensor(res.pooled).float(), p_pooled.float().cpu(), share)
        cond, pooled = _mix(self.text, m_cond, m_pooled, self.blend, self.weight)
        out = []
        for i in range(len(crops)):
            extra = {"hybrid": {**asdict(self.settings), "top_similarity": round(float(top[i]), 6),
                                "vault_share": round(float(share[i]), 6),
                                "chosen": "vault" if share[i] >= 0.5 else "projector"}}
            out.append(CondRow(cond[i].float(), pooled[i].float(), "hybrid", self.weight, self.blend,
                               list(res.neighbours[i]), embeds[i], extra))
        return out
