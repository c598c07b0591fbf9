"""Open a vault and query it: image embeddings (or images) -> neighbours -> blended conditioning."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from luna.models.vision import embed
from vault import index as vindex
from vault.blend import neighbour_weights, weighted_rows
from vault.manifest import Manifest, VaultError
from vault.store import CondStore, Metadata, read_prompts

log = logging.getLogger(__name__)

FILTER_KEYS = ("checkpoint", "category", "campaign", "te_fingerprint", "family")
Encode = Callable[[list[str]], tuple]


@dataclass
class Retrieval:
    """What the index found: per query a list of neighbour dicts, and their prompt ids and weights."""

    neighbours: list[list[dict]]
    prompt_ids: np.ndarray  # int64 [B,k], -1 where fewer than k matched
    weights: np.ndarray  # float32 [B,k], sums to 1 per query


@dataclass
class QueryResult:
    cond: torch.Tensor  # [B,77,C] float32
    pooled: torch.Tensor  # [B,P] float32
    neighbours: list[list[dict]] = field(default_factory=list)


class Vault:
    """An open vault folder; `query` is batched and thread-compatible for reads."""

    def __init__(self, folder: Path, manifest: Manifest, use_gpu: bool = True, vision=None,
                 vision_weights: str | None = None, device: str = "cpu", families: str | None = None):
        self.folder, self.manifest = folder, manifest
        files = manifest.files
        if not files:
            raise VaultError(f"{folder}/manifest.json: lists no index files; the vault is incomplete")
        self.meta = Metadata.read(folder / files["metadata"])
        self.prompt_text, self.prompt_fingerprint = read_prompts(folder / files["prompts"])
        if len(self.meta) != manifest.count:
            raise VaultError(f"{folder / files['metadata']}: metadata ({len(self.meta)} images) disagrees with "
                             f"manifest.json count ({manifest.count}); rebuild the vault")
        if len(self.prompt_text) != manifest.num_prompts:
            raise VaultError(f"{folder / files['prompts']}: prompt table ({len(self.prompt_text)} prompts) disagrees "
                             f"with manifest.json num_prompts ({manifest.num_prompts}); rebuild the vault")
        self.index = self._open_index(files["global"], manifest.search_params, manifest.count, use_gpu)
        self.cat_names = list(manifest.category_table)
        self.cat_index, self.cat_members = {}, {}
        for name, info in manifest.categories.items():
            code = self.cat_names.index(name)
            self.cat_index[name] = self._open_index(info["file"], info.get("search_params", ""), info["count"], use_gpu)
            self.cat_members[name] = self.meta.members(code)
        sums = self.meta.centroid_sum
        self.centroids = vindex.normalize(sums) if len(sums) else np.zeros((0, manifest.vision_dim), np.float32)
        self.store = CondStore(folder, manifest.cond_files) if manifest.mode == "stored" else None
        fp_codes = {f: i for i, f in enumerate(sorted(set(self.prompt_fingerprint)))}
        self._fp_table = sorted(fp_codes)
        self._fp_of_prompt = np.array([fp_codes[f] for f in self.prompt_fingerprint], dtype=np.int32)
        self._vision, self._vision_weights, self._device = vision, vision_weights, device
        self._masks: dict[str, np.ndarray] = {}
        self._families, self._families_path = None, families

    @classmethod
    def open(cls, folder, use_gpu: bool = True, vision=None, vision_weights: str | None = None,
             device: str = "cpu", families: str | None = None) -> "Vault":
        folder = Path(folder)
        return cls(folder, Manifest.read(folder), use_gpu=use_gpu, vision=vision,
                   vision_weights=vision_weights, device=device, families=families)

    def _open_index(self, rel: str, params: str, count: int, use_gpu: bool):
        index = vindex.read_index(self.folder / rel)
        if index.ntotal != count:
            raise VaultError(f"{self.folder / rel}: holds {index.ntotal} vectors, manifest.json says {count}; "
                             "rebuild the vault")
        if index.d != self.manifest.vision_dim:
            raise VaultError(f"{self.folder / rel}: dim {index.d}, manifest.json says {self.manifest.vision_dim}")
        vindex.apply_search_params(index, params)
        return vindex.maybe_to_gpu(index, use_gpu)

    # --- identity -----------------------------------------------------------------------
    def __len__(self) -> int:
        return self.manifest.count

    @property
    def mode(self) -> str:
        return self.manifest.mode

    @property
    def categories(self) -> list[str]:
        return list(self.manifest.categories)

    def info(self) -> dict:
        return {"vision_model": self.manifest.vision_model, "vision_dim": self.manifest.vision_dim,
                "mode": self.mode, "count": len(self), "categories": self.categories,
                "shard_folders": list(self.manifest.shard_folders), "te_fingerprints": list(self._fp_table)}

    # --- search -------------------------------------------------------------------------
    def _check(self, embeds, model: str | None) -> np.ndarray:
        m = self.manifest
        if model is not None and not same_model(model, m.vision_model):
            raise VaultError(f"embeddings of vision model {model!r} cannot query a vault of {m.vision_model!r}")
        if isinstance(embeds, torch.Tensor):
            embeds = embeds.detach().float().cpu().numpy()
        x = np.asarray(embeds, dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != m.vision_dim:
            raise VaultError(f"query embeddings of shape {tuple(x.shape)}: this vault holds {m.vision_model} "
                             f"embeddings of dim {m.vision_dim} (expected [B,{m.vision_dim}])")
        if not np.all(np.isfinite(x)):
            raise VaultError("query embeddings contain NaN or inf")
        if len(self) == 0:
            raise VaultError(f"{self.folder}: the vault is empty")
        return vindex.normalize(x)

    def _filter_mask(self, filters: dict | None) -> np.ndarray | None:
        if not filters:
            return None
        cache_key = repr(sorted((k, v if isinstance(v, str) else tuple(v)) for k, v in filters.items()))
        if cache_key in self._masks:
            return self._masks[cache_key]
        mask = self._compute_mask(filters)
        if len(self._masks) >= 32:  # a runtime reuses a few filters; bound the memory
            self._masks.pop(next(iter(self._masks)))
        self._masks[cache_key] = mask
        return mask

    def _compute_mask(self, filters: dict) -> np.ndarray:
        mask = np.ones(len(self), dtype=bool)
        tables = {"checkpoint": self.manifest.checkpoints, "category": self.cat_names,
                  "campaign": self.manifest.campaigns, "te_fingerprint": self._fp_table}
        for key, wanted in filters.items():
            wanted = [wanted] if isinstance(wanted, str) else list(wanted)
            if key == "family":
                wanted = self.family_fingerprints(wanted)
            key = "te_fingerprint" if key in ("family", "fingerprint") else key
            if key not in tables:
                raise VaultError(f"filters: unknown key {key!r}; known {list(FILTER_KEYS)}")
            codes = [i for i, name in enumerate(tables[key]) if name in set(wanted)]
            column = self._fp_of_prompt[self.meta.prompt_id] if key == "te_fingerprint" else getattr(self.meta, key)
            mask &= np.isin(column, codes)
        return mask

    def family_fingerprints(self, wanted: list[str]) -> list[str]:
        """Text-encoder fingerprints for `filters.family`: fingerprints as they are, family names through
        families.yaml (luna.models.inventory); a name that matches none of this vault's encoders is an error."""
        from luna.models.inventory import Families

        out = []
        for w in wanted:
            if w in self._fp_table:
                out.append(w)
                continue
            if self._families is None:
                self._families = Families.load(self._families_path)
            fps = [fp for fp in self._families.fingerprints_of(w) if fp in self._fp_table]
            if not fps:
                known = {fp: self._families.fingerprints.get(fp, "unknown") for fp in self._fp_table}
                raise VaultError(f"filters.family={w!r}: no text encoder of this vault belongs to it (the vault holds "
                                 f"{known}; family names come from {self._families.source})")
            out += fps
        return out

    def route(self, x: np.ndarray) -> list[str]:
        """Category of each (normalised) query: the nearest category centroid."""
        names = [n for n in self.cat_names if n in self.cat_index]
        if not names:
            raise VaultError(f"{self.folder}: built without category indices; category='auto' needs them")
        cents = self.centroids[[self.cat_names.index(n) for n in names]]
        return [names[i] for i in np.argmax(x @ cents.T, axis=1)]

    def search(self, embeds, k: int = 10, category: str | None = None, filters: dict | None = None,
               weighting: str = "mean", temperature: float = 0.05, model: str | None = None) -> Retrieval:
        """Nearest neighbours of each query (no conditioning)."""
        x = self._check(embeds, model)
        if int(k) < 1:
            raise VaultError(f"k={k}: must be >= 1")
        k = int(k)
        mask = self._filter_mask(filters)
        if category is None:
            groups = {None: np.arange(len(x))}
        else:
            if category == "auto":
                routes = self.route(x)
            elif category in self.cat_index:
                routes = [category] * len(x)
            else:
                raise VaultError(f"category={category!r}: this vault has categories {self.categories}")
            groups = {}
            for i, c in enumerate(routes):
                groups.setdefault(c, []).append(i)
        scores = np.full((len(x), k), -np.inf, np.float32)
        ids = np.full((len(x), k), -1, np.int64)
        for cat, rows in groups.items():
            rows = np.asarray(rows)
            index = self.index if cat is None else self.cat_index[cat]
            members = None if cat is None else self.cat_members[cat]
            allowed = None if mask is None else (mask if members is None else mask[members])
            available = index.ntotal if allowed is None else int(allowed.sum())
            if available == 0:
                raise VaultError(f"no vault item matches filters={filters}" + (f" in category {cat!r}" if cat else ""))
            kk = k
            if k > available:
                warnings.warn(f"k={k} is larger than the {available} matching vault items; returning {available}",
                              stacklevel=2)
                kk = available
            s, i = vindex.search(index, x[rows], kk, allowed)
            if members is not None:
                i = np.where(i >= 0, members[np.clip(i, 0, None)], -1)
            scores[rows, :kk], ids[rows, :kk] = s, i
        valid = ids >= 0
        weights = neighbour_weights(scores, valid, weighting, temperature)
        pid = np.where(valid, self.meta.prompt_id[np.clip(ids, 0, None)], -1)
        neighbours = [[self._describe(int(g), float(s), float(w)) for g, s, w in zip(ids[r], scores[r], weights[r]) if g >= 0]
                      for r in range(len(x))]
        # keep only the columns that were filled (k clamped)
        width = max(1, int(valid.sum(1).max()))
        return Retrieval(neighbours=neighbours, prompt_ids=pid[:, :width], weights=weights[:, :width])

    def _describe(self, g: int, score: float, weight: float) -> dict:
        m = self.meta
        p = int(m.prompt_id[g])
        return {"key": str(m.key[g]), "prompt": self.prompt_text[p], "score": score, "weight": weight,
                "category": self.cat_names[m.category[g]], "checkpoint": self.manifest.checkpoints[m.checkpoint[g]],
                "campaign": self.manifest.campaigns[m.campaign[g]], "te_fingerprint": self.prompt_fingerprint[p]}

    # --- conditioning -------------------------------------------------------------------
    def conditioning(self, found: Retrieval, encode: Encode | None = None) -> QueryResult:
        """Blend the neighbours' conditionings by their weights (stored rows, or `encode` of prompts)."""
        if self.store is None or encode is not None:
            if encode is None:
                raise VaultError(f"{self.folder}: a prompts-only vault needs encode= (the caller's text encoders)")
            return encode_and_blend(found, encode)
        ids = np.unique(found.prompt_ids[found.prompt_ids >= 0])
        cond, pooled = self.store.rows(ids)
        row_of = np.where(found.prompt_ids >= 0, np.searchsorted(ids, found.prompt_ids), -1)
        return QueryResult(cond=weighted_rows(found.weights, row_of, cond),
                           pooled=weighted_rows(found.weights, row_of, pooled), neighbours=found.neighbours)

    def query(self, embeds, k: int = 10, category: str | None = None, filters: dict | None = None,
              weighting: str = "mean", temperature: float = 0.05, encode: Encode | None = None,
              model: str | None = None) -> QueryResult:
        """Image embeddings [B,D] -> QueryResult(cond [B,77,C], pooled [B,P], neighbours).

        category: None (whole vault), "auto" (nearest category centroid per query) or a name.
        filters: {"checkpoint"|"category"|"campaign"|"te_fingerprint"|"family": name or list of names};
        "family" takes text-encoder fingerprints or family names (families.yaml).
        k larger than the matching items is clamped with a warning.
        """
        found = self.search(embeds, k, category, filters, weighting, temperature, model)
        return self.conditioning(found, encode)

    # --- images -------------------------------------------------------------------------
    @property
    def vision(self):
        if self._vision is None:
            from luna.models.vision import load_vision

            name = self.manifest.vision_model.removeprefix("open_clip:")
            self._vision = load_vision(name, self._vision_weights, self._device)
        return self._vision

    def embed_images(self, images) -> np.ndarray:
        """Embeddings of PIL images by the vault's own vision tower (the model recorded in the manifest)."""
        tower = self.vision
        if not same_model(getattr(tower, "model_id", self.manifest.vision_model), self.manifest.vision_model):
            raise VaultError(f"vision tower {tower.model_id!r} is not the vault's {self.manifest.vision_model!r}")
        return embed(tower, images).embed.numpy()

    def query_images(self, images, k: int = 10, **kw) -> QueryResult:
        return self.query(self.embed_images(images), k, **kw)


def same_model(a: str, b: str) -> bool:
    """Whether two vision model ids name the same tower ("open_clip:X" and "X"; "tiny" is the tiny tower)."""
    def norm(x: str) -> str:
        x = str(x).removeprefix("open_clip:")
        return "luna-tiny-vit" if x == "tiny" else x
    return norm(a) == norm(b)


def encode_and_blend(found: Retrieval, encode: Encode) -> QueryResult:
    """Prompts-only mode: encode each unique neighbour prompt once, then blend by weight."""
    texts: list[str] = []
    pos: dict[str, int] = {}
    row_of = np.full(found.prompt_ids.shape, -1, np.int64)
    for r, nbs in enumerate(found.neighbours):
        for j, nb in enumerate(nbs):
            if nb["prompt"] not in pos:
                pos[nb["prompt"]] = len(texts)
                texts.append(nb["prompt"])
            row_of[r, j] = pos[nb["prompt"]]
    cond, pooled = encode(texts)
    cond = torch.as_tensor(np.asarray(cond)) if not isinstance(cond, torch.Tensor) else cond.detach().cpu()
    pooled = torch.as_tensor(np.asarray(pooled)) if not isinstance(pooled, torch.Tensor) else pooled.detach().cpu()
    return QueryResult(cond=weighted_rows(found.weights, row_of, cond),
                       pooled=weighted_rows(found.weights, row_of, pooled), neighbours=found.neighbours)
