"""Conditioning sources: one (cond [L, C], pooled [P]) row per crop or tile, and the evidence.

- `TextSource`: the user's prompt through the checkpoint's own text encoders (same row for all).
- `VaultSource`: each crop's image embedding -> vault neighbours -> their blended conditioning,
  mixed with the text row (linear weight w, or concat of the token sequences). In-process
  (`vault.query.Vault`) or the service (`vault.service.VaultClient`), via `vault.open_vault`.
- `ProjectorSource`: each crop's image embedding -> the exported projector -> mixed with text.

Image embeddings come from `CropEmbedder` (`luna.models.vision.embed`); the tower must be the one the
vault / projector was built on, else `VisionModelMismatch`. Every row records its source, its
strength and (for the vault) the neighbours' keys, prompts and scores.
"""
from __future__ import annotations

import logging

from dataclasses import dataclass, field

import torch
from PIL import Image

from luna.models.vision import embed

log = logging.getLogger(__name__)

BLENDS = ("linear", "concat")


class ConditioningError(ValueError):
    """A conditioning source that cannot serve this checkpoint or these crops."""


class VisionModelMismatch(ConditioningError):
    """The vision tower differs from the one the vault or projector was built on."""


@dataclass
class CondRow:
    cond: torch.Tensor  # [L, C] float32 (L = 77, or 154 for concat)
    pooled: torch.Tensor  # [P] float32
    source: str  # "text" | "vault" | "projector"
    strength: float  # weight of the retrieved/projected part (0 for text)
    blend: str = "none"
    neighbours: list[dict] = field(default_factory=list)
    image_embed: torch.Tensor | None = None  # [D] the crop's vision embedding (IP-Adapter, evidence)
    extra: dict = field(default_factory=dict)  # source-specific decisions (hybrid policy, category route)

    def to_json(self) -> dict:
        nbs = [{"key": n.get("key"), "prompt": n.get("prompt"), "score": round(float(n.get("score", 0.0)), 6),
                "weight": round(float(n.get("weight", 0.0)), 6),
                **({"te_fingerprint": n["te_fingerprint"]} if n.get("te_fingerprint") else {})}  # whose encoders
               for n in self.neighbours]
        return {"source": self.source, "strength": round(float(self.strength), 6), "blend": self.blend,
                "tokens": int(self.cond.shape[0]), "neighbours": nbs, **self.extra}


def _norm_model(x) -> str:
    x = str(x or "").removeprefix("open_clip:")
    return "luna-tiny-vit" if x == "tiny" else x


def same_vision_model(a, b) -> bool:
    return _norm_model(a) == _norm_model(b)


# ---------------------------------------------------------------------- text


class TextSource:
    """The prompt (and negative) through the checkpoint's text encoders, encoded once."""

    name = "text"

    def __init__(self, encoders, prompt: str, negative: str | None = None, *, force_zeros_for_empty_prompt=True):
        from luna.models.sdxl import encode_prompt

        self.encoders, self.prompt, self.negative = encoders, str(prompt or ""), negative
        zeros = force_zeros_for_empty_prompt and not (negative or "").strip()
        cond, pooled, neg, neg_pooled = encode_prompt(encoders, [self.prompt], None if zeros else str(negative or ""))
        self.cond, self.pooled = cond[0].float().cpu(), pooled[0].float().cpu()
        self.neg_cond, self.neg_pooled = neg[0].float().cpu(), neg_pooled[0].float().cpu()

    @property
    def negative_row(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.neg_cond, self.neg_pooled

    def encode(self, prompts: list[str]):
        """The caller's encoders for prompts-only vaults: (cond [B,77,C], pooled [B,P])."""
        from luna.models.sdxl import encode_prompt

        cond, pooled, _, _ = encode_prompt(self.encoders, list(prompts))
        return cond.float().cpu(), pooled.float().cpu()

    def rows(self, crops: list[Image.Image]) -> list[CondRow]:
        return [CondRow(self.cond, self.pooled, "text", 0.0) for _ in crops]


# ---------------------------------------------------------------------- vision


class CropEmbedder:
    """Vision embeddings [B, D] of crops through an open_clip tower (its own preprocessing)."""

    def __init__(self, tower):
        self.tower = tower

    @property
    def model_id(self) -> str:
        return self.tower.model_id

    @property
    def dim(self) -> int:
        return int(self.tower.dim)

    def __call__(self, crops: list[Image.Image]) -> torch.Tensor:
        return embed(self.tower, crops).embed


def _mix(text: TextSource, cond: torch.Tensor, pooled: torch.Tensor, blend: str, weight: float):
    """Blend retrieved/projected rows [B,L,C], [B,P] with the text row."""
    from vault.blend import blend_concat, blend_linear

    b = cond.shape[0]
    user = text.cond[None].expand(b, -1, -1)
    user_pooled = text.pooled[None].expand(b, -1)
    if cond.shape[-1] != user.shape[-1] or pooled.shape[-1] != user_pooled.shape[-1]:
        raise ConditioningError(
            f"retrieved conditioning is [{cond.shape[1]},{cond.shape[-1]}] + pooled [{pooled.shape[-1]}], but this "
            f"checkpoint's text encoders give [77,{user.shape[-1]}] + [{user_pooled.shape[-1]}]: the vault/projector "
            "was built for another checkpoint family")
    if blend == "linear":
        return blend_linear(user, cond.float(), weight), blend_linear(user_pooled, pooled.float(), weight)
    if blend == "concat":
        return blend_concat(user, cond.float()), user_pooled.clone()
    raise ConditioningError(f"blend={blend!r}: choose one of {BLENDS}")


class VaultSource:
    """Crop embeddings -> vault neighbours -> conditioning blended with the text row."""

    name = "vault"

    def __init__(self, vault, text: TextSource, embedder: CropEmbedder, *, k: int = 8, weight: float = 0.5,
                 blend: str = "linear", category: str | None = None, filters: dict | None = None,
                 weighting: str = "mean", temperature: float = 0.05, family: str = "same", te_fingerprint: str | None = None):
        """family: "same" keeps neighbours whose conditionings come from `te_fingerprint` (the refining
        checkpoint's text encoders; computed from `text`'s encoders when not given), "any" keeps every family (with a warning in the record), any
        other value is a family name or fingerprint (vault filters.family)."""
        if blend not in BLENDS:
            raise ConditioningError(f"vault blend={blend!r}: choose one of {BLENDS}")
        if not 0.0 <= float(weight) <= 1.0:
            raise ConditioningError(f"vault weight={weight}: must be in [0, 1]")
        self.vault, self.text, self.embedder = vault, text, embedder
        info = vault.info()
        self.vision_model, self.vision_dim = info.get("vision_model"), int(info.get("vision_dim", 0))
        if not same_vision_model(self.vision_model, embedder.model_id) or self.vision_dim != embedder.dim:
            raise VisionModelMismatch(
                f"the vault was built on vision model {self.vision_model!r} ({self.vision_dim}-d) but the runtime "
                f"embeds crops with {embedder.model_id!r} ({embedder.dim}-d); set vision.name/vision.weights to the "
                "vault's model")
        self.k, self.weight, self.blend = int(k), float(weight), blend
        self.category, self.filters, self.weighting = category, dict(filters or {}), weighting
        self.temperature = float(temperature)
        self.mode = info.get("mode", "stored")
        self.family, self.te_fingerprint, self.warning = str(family), te_fingerprint, None
        held = list(info.get("te_fingerprints") or [])
        if self.family == "any":
            others = [fp for fp in held if fp != te_fingerprint]
            if others:
                self.warning = (f"retrieval.family=any: neighbours may come from other text encoders ({others}) than "
                                f"this checkpoint's ({te_fingerprint}); their conditionings do not fit its encoders")
                log.warning(self.warning)
        elif self.family == "same":
            if not te_fingerprint:
                from luna.models.fingerprint import te_fingerprint_of_encoders

                enc = text.encoders
                self.te_fingerprint = te_fingerprint = te_fingerprint_of_encoders(enc.text_encoder, enc.text_encoder_2)
            if held and te_fingerprint not in held:
                raise ConditioningError(
                    f"the vault holds no conditionings of this checkpoint's text encoders ({te_fingerprint}); it holds "
                    f"{held}: refine with a checkpoint of the vault's family, use a vault built from this family, or "
                    "set retrieval.family=any (other encoders' conditionings, recorded as a warning)")
            self.filters["te_fingerprint"] = te_fingerprint
        else:
            self.filters["family"] = self.family
        self.filters = self.filters or None

    def describe(self) -> dict:
        """What the record says about retrieval: the family filter and any warning."""
        return {"family": self.family, "te_fingerprint": self.te_fingerprint, "filters": self.filters,
                "warning": self.warning}

    def rows(self, crops: list[Image.Image]) -> list[CondRow]:
        embeds = self.embedder(crops)
        encode = self.text.encode if self.mode != "stored" else None
        res = self.vault.query(embeds.numpy(), k=self.k, category=self.category, filters=self.filters,
                               weighting=self.weighting, temperature=self.temperature, encode=encode)
        cond, pooled = _mix(self.text, torch.as_tensor(res.cond), torch.as_tensor(res.pooled), self.blend, self.weight)
        return [CondRow(cond[i].float(), pooled[i].float(), "vault", self.weight, self.blend,
                        list(res.neighbours[i]), embeds[i]) for i in range(len(crops))]


class ProjectorSource:
    """Crop embeddings -> projector (image embed -> conditioning) -> blended with the text row."""

    name = "projector"

    def __init__(self, projector, text: TextSource, embedder: CropEmbedder, *, weight: float = 0.5,
                 blend: str = "linear"):
        if blend not in BLENDS:
            raise ConditioningError(f"projector blend={blend!r}: choose one of {BLENDS}")
        model = getattr(projector, "dims", {}).get("vision_model") or getattr(projector, "config", {}).get("vision_model")
        dim = int(getattr(projector, "dims", {}).get("vision_dim", embedder.dim))
        if not same_vision_model(model, embedder.model_id) or dim != embedder.dim:
            raise VisionModelMismatch(
                f"the projector was trained on vision model {model!r} ({dim}-d) but the runtime embeds crops with "
                f"{embedder.model_id!r} ({embedder.dim}-d); set vision.name/vision.weights to the projector's model")
        if getattr(projector, "dims", {}).get("input", "embed") != "embed":
            raise ConditioningError("this projector takes vision tokens; the runtime feeds it image embeddings only")
        self.projector, self.text, self.embedder = projector, text, embedder
        self.weight, self.blend = float(weight), blend

    def rows(self, crops: list[Image.Image]) -> list[CondRow]:
        embeds = self.embedder(crops)
        with torch.no_grad():
            cond, pooled = self.projector(embeds.to(next(self.projector.buffers()).device))
        cond, pooled = _mix(self.text, cond.float().cpu(), pooled.float().cpu(), self.blend, self.weight)
        return [CondRow(cond[i], pooled[i], "projector", self.weight, self.blend, [], embeds[i])
                for i in range(len(crops))]


class WithImageEmbeds:
    """Wrap a source so every row also carries the crop's embedding (IP-Adapter needs one per item)."""

    def __init__(self, source, embedder: CropEmbedder):
        self.source, self.embedder = source, embedder
        self.name = source.name
        self.text = source if isinstance(source, TextSource) else getattr(source, "text", None)

    def rows(self, crops: list[Image.Image]) -> list[CondRow]:
        return self._with_embeds(self.source.rows(crops), crops)

    def rows_for(self, crops, detections) -> list[CondRow]:
        """Rows of a source that routes by detection label (lsd_runtime.categories), with embeddings."""
        src = self.source
        rows = src.rows_for(crops, detections) if hasattr(src, "rows_for") else src.rows(crops)
        return self._with_embeds(rows, crops)

    def _with_embeds(self, rows: list[CondRow], crops) -> list[CondRow]:
        if any(r.image_embed is None or r.image_embed.shape[-1] != self.embedder.dim for r in rows):
            embeds = self.embedder(crops)
            for r, e in zip(rows, embeds):
                r.image_embed = e
        return rows


def open_projector(path, embedder: CropEmbedder, device="cpu"):
    """The exported projector, checked against the runtime's vision tower."""
    from projector.export import ProjectorLoadError, ProjectorMismatchError, ProjectorTargetsError, load_projector

    try:
        proj = load_projector(path, device=device, expect_dim=embedder.dim, expect_targets="sdxl")  # SDXL runtime
    except ProjectorTargetsError as exc:  # a CLIP-L (SD 1.x) projector: not for an SDXL checkpoint
        raise ConditioningError(str(exc)) from exc
    except ProjectorMismatchError as exc:
        raise VisionModelMismatch(str(exc)) from exc
    except ProjectorLoadError as exc:
        raise ConditioningError(str(exc)) from exc
    return proj

