"""Per-category retrieval: detections routed to category vaults by label, settings per category.

A detection labelled "face" goes to the vault's "faces" category (the mapping `retrieval.routes`),
and its crop is conditioned with that category's blend strength, k, neighbour weighting and
softmax temperature. Labels without a route go to the nearest category centroid ("auto") when the
vault has categories, else to the whole vault.

The settings file (`category_settings.json`, written by `luna ab tune=true`, read by `luna refine
retrieval.settings=FILE` and by the ComfyUI detailer / refiner's `category_settings` input) holds
    {"format_version": 1, "routes": {label: category}, "default": {weight, k, weighting, temperature},
     "categories": {category: {weight, k, weighting, temperature}}, "tuned": {...evidence...}}

`memory_source` builds the crops' conditioning source (vault, projector, or hybrid, routed or
not) from the plain `retrieval` / `hybrid` config, for `luna refine` and `luna ab` alike.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

from lsd_runtime.conditioning import ConditioningError, CondRow

log = logging.getLogger(__name__)

SETTINGS_FORMAT = 1
SETTINGS_NAME = "category_settings.json"
DEFAULT_ROUTES = {"face": "faces", "hand": "hands", "eye": "eyes"}
ROUTE = "route"  # retrieval.category value that turns routing on


class CategorySettingsError(ConditioningError):
    """A settings file or route table that cannot be used (names the file / key at fault)."""


@dataclass
class CategorySettings:
    weight: float = 0.5  # blend strength of the retrieved conditioning against the text
    k: int = 8
    weighting: str = "mean"  # mean | softmax
    temperature: float = 0.05  # softmax weighting only

    @classmethod
    def from_dict(cls, d: dict, where: str = "settings") -> "CategorySettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CategorySettingsError(f"{where}: unknown key(s) {unknown}; known {sorted(known)}")
        s = cls(**{**asdict(cls()), **d})
        s.weight, s.k, s.temperature = float(s.weight), int(s.k), float(s.temperature)
        if not 0.0 <= s.weight <= 1.0 or s.k < 1 or s.temperature <= 0 or s.weighting not in ("mean", "softmax"):
            raise CategorySettingsError(f"{where}: {asdict(s)} out of range (weight in [0,1], k >= 1, "
                                        "temperature > 0, weighting mean|softmax)")
        return s


@dataclass
class CategoryTable:
    """Routes (label -> category) and settings per category, with a default for the others."""

    routes: dict = field(default_factory=lambda: dict(DEFAULT_ROUTES))
    default: CategorySettings = field(default_factory=CategorySettings)
    categories: dict = field(default_factory=dict)  # category -> CategorySettings
    tuned: dict = field(default_factory=dict)  # evidence written by the tuner

    def route(self, label: str | None, known: list[str]) -> str | None:
        """The vault category for a detection label: its route, the label itself when it names a
        category, else "auto" (nearest centroid) when the vault has categories, else None (all)."""
        key = str(label or "").strip().lower()
        if key in self.routes:
            return self.routes[key]
        if key in known:
            return key
        return "auto" if known else None

    def settings_for(self, category: str | None) -> CategorySettings:
        return self.categories.get(category, self.default)

    def to_json(self) -> dict:
        return {"format_version": SETTINGS_FORMAT, "routes": dict(self.routes), "default": asdict(self.default),
                "categories": {k: asdict(v) for k, v in self.categories.items()}, "tuned": self.tuned}

    @classmethod
    def from_json(cls, d: dict, where: str = "category settings") -> "CategoryTable":
        if d.get("format_version") != SETTINGS_FORMAT:
            raise CategorySettingsError(f"{where}: format_version {d.get('format_version')!r}, this code reads "
                                        f"{SETTINGS_FORMAT}")
        routes = {str(k).lower(): str(v) for k, v in (d.get("routes") or {}).items()}
        default = CategorySettings.from_dict(d.get("default") or {}, f"{where}: default")
        cats = {str(k): CategorySettings.from_dict(v or {}, f"{where}: categories.{k}")
                for k, v in (d.get("categories") or {}).items()}
        return cls(routes, default, cats, dict(d.get("tuned") or {}))

    def write(self, path) -> Path:
        from luna.files import write_json_atomic

        path = Path(path)
        write_json_atomic(path, self.to_json())
        return path

    @classmethod
    def read(cls, path) -> "CategoryTable":
        path = Path(path)
        if path.is_dir():
            path = path / SETTINGS_NAME
        if not path.is_file():
            raise CategorySettingsError(f"{path}: no category settings file (write one with `luna ab tune=true`)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CategorySettingsError(f"{path}: not valid JSON ({e})") from e
        return cls.from_json(data, str(path))

    def check_against(self, known: list[str], where: str = "retrieval.routes") -> None:
        """Every route and per-category entry must name one of the vault's categories."""
        bad = {lab: cat for lab, cat in self.routes.items() if cat not in known}
        bad.update({cat: cat for cat in self.categories if cat not in known})
        if bad:
            have = known or "none (built with categories=false)"
            raise CategorySettingsError(f"{where}: {bad} name categories the vault does not have; it has {have}")


class CategoryRouter:
    """A conditioning source that routes each crop by its detection label to a per-category source.

    `make_source(category, settings)` builds the source of one category (a VaultSource or a
    HybridSource with that category's k / weighting / temperature / strength); built once each.
    """

    def __init__(self, make_source: Callable, table: CategoryTable, known: list[str], text, embedder,
                 name: str = "vault", settings_file: str | None = None):
        self.make_source, self.table, self.known = make_source, table, list(known)
        self.text, self.embedder, self.name = text, embedder, name
        self.settings_file = settings_file
        self._sources: dict = {}

    def source_for(self, category):
        if category not in self._sources:
            self._sources[category] = self.make_source(category, self.table.settings_for(category))
        return self._sources[category]

    def reachable(self) -> list:
        """Categories whose source differs in settings: every route's, every per-category entry's, and
        the fallback of unrouted labels ("auto", or None without categories). A label naming a category
        directly gets the default settings, as the fallback does, so its source fails exactly when that one does."""
        cats = [*self.table.routes.values(), *self.table.categories, "auto" if self.known else None]
        return list(dict.fromkeys(cats))

    def build_all(self) -> "CategoryRouter":
        """Build the source of every reachable category now, so a setting its source refuses (family,
        vision tower, hybrid.*) is an error before any detection or denoising, not at the first crop."""
        for cat in self.reachable():
            self.source_for(cat)
        return self

    def describe(self) -> dict:
        """What the record says about retrieval: the family filter and warning (as a single source's),
        the routes, the default and per-category settings, the settings file, and each built source's own."""
        sources = {str(cat): src.describe() for cat, src in self._sources.items() if hasattr(src, "describe")}
        fallback = sources.get(str("auto" if self.known else None)) or next(iter(sources.values()), {})
        warnings = list(dict.fromkeys(d.get("warning") for d in sources.values() if d.get("warning")))
        return {**{k: v for k, v in fallback.items() if k in ("family", "te_fingerprint", "filters")},
                "warning": "; ".join(warnings) or None, "routed": True, "source": self.name,
                "routes": dict(self.table.routes), "default": asdict(self.table.default),
                "categories": {k: asdict(v) for k, v in self.table.categories.items()}, "known": list(self.known),
                "settings": self.settings_file, "sources": sources}

    def rows(self, crops, labels=None) -> list[CondRow]:
        labels = list(labels) if labels is not None else [None] * len(crops)
        routed = [self.table.route(lab, self.known) for lab in labels]
        out: list = [None] * len(crops)
        for cat in dict.fromkeys(routed):
            idx = [i for i, r in enumerate(routed) if r == cat]
            rows = self.source_for(cat).rows([crops[i] for i in idx])
            for i, row in zip(idx, rows):
                row.extra = {**row.extra, "route": {"label": labels[i], "category": cat,
                                                    **asdict(self.table.settings_for(cat))}}
                out[i] = row
        return out

    def rows_for(self, crops, detections) -> list[CondRow]:
        return self.rows(crops, [getattr(d, "label", None) for d in detections])


def rows_for(conditioner, crops, detections) -> list[CondRow]:
    """Rows of `crops`; sources that route by label (CategoryRouter) also get the detections."""
    if hasattr(conditioner, "rows_for"):
        return conditioner.rows_for(crops, detections)
    return conditioner.rows(crops)


# ---------------------------------------------------------------------- building from config


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    """Log `msg` once per process (sources are built per batch and prompt)."""
    if msg not in _WARNED:
        _WARNED.add(msg)
        log.warning(msg)


def global_settings(ret: dict) -> CategorySettings:
    """The `retrieval` config's own weight / k / weighting / temperature (the defaults where unset)."""
    return CategorySettings.from_dict({"weight": ret.get("weight", 0.5), "k": ret.get("k", 8),
                                       "weighting": ret.get("weighting", "mean"),
                                       "temperature": ret.get("temperature", 0.05)}, "retrieval")


def table_from_config(ret: dict) -> CategoryTable | None:
    """The routing table `retrieval` asks for (a settings file, category=route, or per_category without
    a fixed category), else None (one source: the whole vault, `auto` or a fixed category)."""
    settings = ret.get("settings")
    if settings:
        table = CategoryTable.read(settings)
    elif ret.get("category") == ROUTE or (ret.get("per_category") and ret.get("category") is None):
        table = CategoryTable(routes=dict(DEFAULT_ROUTES))
    else:
        return None
    if ret.get("routes"):
        table.routes.update({str(k).lower(): str(v) for k, v in ret["routes"].items()})
    if not settings:
        table.default = global_settings(ret)
    for cat, over in (ret.get("per_category") or {}).items():
        base = asdict(table.settings_for(cat))
        table.categories[str(cat)] = CategorySettings.from_dict({**base, **dict(over)}, f"retrieval.per_category.{cat}")
    return table


def fixed_settings(ret: dict) -> CategorySettings:
    """The settings of an unrouted source: the global ones, with `per_category`'s entry for a fixed
    `category` applied; an entry that could never apply (another category, or `auto`, whose category
    is chosen per crop by the vault) is an error naming it rather than silently ignored."""
    s = global_settings(ret)
    per = {str(k): v for k, v in (ret.get("per_category") or {}).items()}
    if not per:
        return s
    category = ret.get("category")
    other = sorted(k for k in per if k != category)
    if other:
        raise CategorySettingsError(
            f"retrieval.per_category: {other} never apply with retrieval.category={category!r} (every crop uses "
            f"{'the nearest centroid' if category == 'auto' else repr(category)}); set retrieval.category=route to "
            "route each detection by its label, or drop those entries")
    return CategorySettings.from_dict({**asdict(s), **dict(per[category] or {})},
                                      f"retrieval.per_category.{category}")


def memory_source(ret: dict, text, embedder, *, vault=None, projector=None, hybrid: dict | None = None,
                  family: str | None = None, te_fingerprint: str | None = None):
    """The crops' source from plain config: vault, projector or both (hybrid), routed by label when
    `ret` asks for it (`category: route`, `settings: FILE`, `per_category` without a fixed category);
    None without memory. A fixed category takes its `per_category` entry. A routed source builds every
    category's source here, so whatever one of them refuses is an error before any denoising."""
    from lsd_runtime.conditioning import ProjectorSource, VaultSource
    from lsd_runtime.hybrid import HybridSettings, HybridSource

    blend = str(ret.get("blend", "linear"))
    family = family or str(ret.get("family") or "same")  # retrieval.family: same | any | a family
    if vault is None and projector is None:
        return None
    if vault is None:
        routed = [k for k in ("settings", "per_category") if ret.get(k)] + (["category"] if ret.get("category") else [])
        if routed:
            _warn_once(f"retrieval.{'/'.join(routed)}: the projector alone has no categories; it uses retrieval.weight "
                       f"{float(ret.get('weight', 0.5))} for every crop (categories need vault=DIR)")
        return ProjectorSource(projector, text, embedder, weight=float(ret.get("weight", 0.5)), blend=blend)
    table = table_from_config(ret)
    category = ret.get("category")

    def make(cat, s: CategorySettings):
        vs = VaultSource(vault, text, embedder, k=s.k, weight=s.weight, blend=blend, category=cat,
                         weighting=s.weighting, temperature=s.temperature, family=family,
                         te_fingerprint=te_fingerprint)
        if projector is None:
            return vs
        ps = ProjectorSource(projector, text, embedder, weight=s.weight, blend=blend)
        hs = HybridSettings(**{k: v for k, v in (hybrid or {}).items() if k in ("policy", "tau", "softness")})
        return HybridSource(vs, ps, settings=hs, weight=s.weight, blend=blend)

    if table is None:
        s = fixed_settings(ret)
        info = vault.info()
        if category is not None and "categories" in info:  # refused here, not by the vault at the first crop
            known = list(info["categories"] or [])
            if (category == "auto" and not known) or (category != "auto" and category not in known):
                raise CategorySettingsError(f"retrieval.category={category!r}: the vault has categories "
                                            f"{known or 'none (built with categories=false)'}")
        return make(category, s)
    known = list(vault.info().get("categories") or [])
    # default routes to categories this vault lacks are dropped; configured ones must exist
    table.routes = {lab: cat for lab, cat in table.routes.items()
                    if cat in known or DEFAULT_ROUTES.get(lab) != cat or lab in (ret.get("routes") or {})}
    table.check_against(known, str(ret.get("settings") or "retrieval.routes"))
    router = CategoryRouter(make, table, known, text, embedder, name="hybrid" if projector is not None else "vault",
                            settings_file=str(ret["settings"]) if ret.get("settings") else None)
    return router.build_all()
