"""Checkpoint inventory of the cluster: luna.models.inventory on every node, merged by fingerprint.

Each node runs `scan_folders` as a Ray task pinned to it, over `checkpoints.dirs` (scanned on
every node) plus its own `checkpoints.node_dirs[<node>]`, with its own facts cache. What each file
is (kind, family, prediction type, distillation, text-encoder fingerprint) and why a file is
skipped come from luna.models.inventory, the same rows `luna inventory` prints. The driver merges
the nodes' findings by model identity (`model_id`: prediction type, text-encoder fingerprint and
the UNet/VAE probe, the same for a single file and a diffusers folder of one model; the file
fingerprint where a row has none): one `CheckpointInfo` per model, with its own path on each node
that holds it (a file on one, a folder on another). A skipped file only stops a run when nothing
usable is found at all.
"""
from __future__ import annotations

import re
import socket
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from luna.models.inventory import InventoryError  # noqa: F401 - re-exported: the factory's error for bad folders

_TOKEN_RE = re.compile(r"[A-Za-z0-9]+")


@dataclass
class CheckpointInfo:
    """One SDXL model found on one or more nodes (the same model_id = the same model, in any format)."""

    name: str
    paths: dict[str, str]  # node -> path on that node
    fingerprint: str
    te_fingerprint: str
    family: str
    tags: list[str]
    format: str  # single_file | diffusers
    size: str | None = None  # full | tiny | custom
    prediction: str = "epsilon"  # epsilon | v | v+ztsnr | edm (luna.models.sampling builds its scheduler)
    distillation: str = "none"  # none | few-step (needs a campaign sampler_overrides rule)
    evidence: dict = field(default_factory=dict)  # family / prediction / distillation -> where it came from
    model_id: str = ""  # prediction/te_fingerprint/probe (luna.models.inventory.Row.model_id)
    formats: dict[str, str] = field(default_factory=dict)  # node -> single_file | diffusers of paths[node]

    @property
    def nodes(self) -> list[str]:
        return sorted(self.paths)

    def to_dict(self) -> dict:
        return dict(asdict(self), nodes=self.nodes)


@dataclass
class Rejected:
    node: str
    path: str
    reason: str


@dataclass
class Inventory:
    checkpoints: list[CheckpointInfo] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    scanned: dict[str, list[str]] = field(default_factory=dict)  # node -> folders scanned

    def by_name(self) -> dict[str, CheckpointInfo]:
        return {c.name: c for c in self.checkpoints}

    def format(self) -> str:
        lines = [f"inventory: {len(self.checkpoints)} SDXL checkpoint(s) on {len(self.scanned)} node(s)"]
        for c in self.checkpoints:
            lines.append(f"  {c.name:<32} {c.family:<14} {c.prediction:<8} {c.format:<11} fp {c.fingerprint[:12]} "
                         f"te {c.te_fingerprint[:12]} on {','.join(c.nodes)}"
                         + (" (few-step)" if c.distillation == "few-step" else ""))
        if self.rejected:
            lines.append(f"not usable ({len(self.rejected)}):")
            lines += [f"  [{r.node}] {r.path}: {r.reason}" for r in self.rejected]
        return "\n".join(lines)


# --------------------------------------------------------------------------- on one node


def _tags(path: Path, root: Path) -> list[str]:
    """Words of the path below root, for campaign selection by tag (never used as a family)."""
    try:
        rel = path.relative_to(root)
    except ValueError:
        rel = Path(path.name)
    parts = list(rel.parent.parts) + [path.stem if path.is_file() else path.name]
    tags = []
    for part in parts:
        tags.append(part.lower())
        tags += [t.lower() for t in _TOKEN_RE.findall(part)]
    return sorted(set(tags))


def scan_folders(dirs: Iterable[str], node: str = "", families: str | None = None, cache: Any = None) -> dict:
    """Scan folders on this machine; plain-data result: {"node", "host", "found": [...], "rejected": [...]}.

    families: a families.yaml (None: the shipped one); cache: a facts-cache path, None for the
    default, False for none."""
    from luna.models import inventory as inv

    fams = inv.Families.load(families)
    facts_cache = None if cache is False else inv.FactsCache(cache)
    found, rejected = [], []
    roots = []
    for d in dirs:
        root = Path(str(d)).expanduser()
        if root.is_dir():
            roots.append(root)
        else:
            rejected.append({"path": str(root), "reason": "no such folder on this node"})
    rows = inv.scan(roots, families=fams, cache=facts_cache)
    for row in rows:
        if not row.used:
            plain = row.kind in ("sdxl", "unreadable", "pickle")
            rejected.append({"path": row.path, "reason": row.reason if plain else f"not SDXL base: {row.reason}"})
            continue
        root = next(r for r in roots if Path(row.path).is_relative_to(r))
        found.append({
            "path": row.path, "name": row.name, "fingerprint": row.fingerprint, "te_fingerprint": row.te_fingerprint,
            "format": row.format, "size": row.size, "tags": _tags(Path(row.path), root), "family": row.family,
            "prediction": row.prediction, "distillation": row.distillation, "model_id": row.model_id,
            "evidence": {"family": row.family_evidence, "prediction": row.prediction_evidence,
                         "distillation": row.distillation_evidence},
        })
    return {"node": node, "host": socket.gethostname(), "found": found, "rejected": rejected}


# --------------------------------------------------------------------------- the whole cluster


def merge(results: list[dict]) -> Inventory:
    """Merge per-node scan results into one inventory (one entry per model_id, else per file fingerprint).

    A model found as a single file on one node and as a diffusers folder on another is one entry:
    its paths hold each node's own path, and its facts (fingerprint, name, format) are those of a
    single file where there is one (then the first node, then the path), so they do not depend on
    which node happens to hold the folder."""
    inv = Inventory()
    by_model: dict[str, list[tuple[str, dict]]] = defaultdict(list)
    for r in sorted(results, key=lambda r: r["node"]):
        inv.rejected += [Rejected(r["node"], x["path"], x["reason"]) for x in r["rejected"]]
        for x in r["found"]:
            key = f"model:{x['model_id']}" if x.get("model_id") else f"file:{x['fingerprint']}"
            by_model[key].append((r["node"], x))
    entries = []
    for items in by_model.values():
        items.sort(key=lambda nx: (nx[1]["format"] != "single_file", nx[0], nx[1]["path"]))
        node0, first = items[0]
        paths: dict[str, str] = {}
        formats: dict[str, str] = {}
        for node, x in items:
            if node not in paths:  # one copy per node is enough (a single file before a folder)
                paths[node], formats[node] = x["path"], x["format"]
        tags = sorted(set().union(*(x["tags"] for _, x in items)))
        entries.append(dict(first, paths=dict(sorted(paths.items())), formats=dict(sorted(formats.items())), tags=tags))
    names = defaultdict(int)
    for e in entries:
        names[e["name"]] += 1
    for e in sorted(entries, key=lambda e: (e["name"], e["fingerprint"])):
        name = e["name"] if names[e["name"]] == 1 else f"{e['name']}-{e['fingerprint'][:8]}"
        inv.checkpoints.append(CheckpointInfo(
            name=name, paths=e["paths"], fingerprint=e["fingerprint"], te_fingerprint=e["te_fingerprint"],
            family=e.get("family", "unknown"), tags=e["tags"], format=e["format"], size=e["size"],
            prediction=e.get("prediction", "epsilon"), distillation=e.get("distillation", "none"),
            evidence=e.get("evidence", {}), model_id=e.get("model_id") or "", formats=e["formats"]))
    return inv


def _get(cfg: Any, key: str, default=None):
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def folders_per_node(checkpoints_cfg: Any, nodes: Iterable[str]) -> dict[str, list[str]]:
    """checkpoints.dirs on every node plus checkpoints.node_dirs[node]; unknown node names are an error."""
    nodes = sorted(nodes)
    common = [str(d) for d in (_get(checkpoints_cfg, "dirs") or [])]
    per = dict(_get(checkpoints_cfg, "node_dirs") or {})
    unknown = sorted(set(per) - set(nodes))
    if unknown:
        raise InventoryError(f"checkpoints.node_dirs names node(s) {unknown}, but the cluster's nodes are {nodes} "
                             "(a node's name is its luna_node:<name> resource, see docs/factory.md)")
    out = {n: common + [str(d) for d in (per.get(n) or [])] for n in nodes}
    out = {n: ds for n, ds in out.items() if ds}
    if not out:
        raise InventoryError("no checkpoint folder given: set checkpoints.dirs=[/path/to/models] "
                             "(or checkpoints.node_dirs={pc1: [...]})")
    return out


def scan(cluster, checkpoints_cfg: Any, local: bool = False) -> Inventory:
    """Scan every node's folders with one Ray task per node (`local`: this process scans the one
    node's folders itself, no Ray); raise InventoryError if nothing is usable."""
    plan = folders_per_node(checkpoints_cfg, cluster.nodes)
    families, cache = _get(checkpoints_cfg, "families"), _get(checkpoints_cfg, "cache")
    if local:
        inv = merge([scan_folders(dirs, node, families, cache) for node, dirs in plan.items()])
    else:
        import ray

        remote = ray.remote(scan_folders)
        refs = [remote.options(num_cpus=0, **cluster.placement(node)).remote(dirs, node, families, cache)
                for node, dirs in plan.items()]
        inv = merge(ray.get(refs))
    inv.scanned = plan
    if not inv.checkpoints:
        where = "; ".join(f"{n}: {ds}" for n, ds in plan.items())
        why = "; ".join(f"[{r.node}] {r.path}: {r.reason}" for r in inv.rejected[:5])
        more = f" (+{len(inv.rejected) - 5} more)" if len(inv.rejected) > 5 else ""
        raise InventoryError(f"no usable SDXL checkpoint in {where}" + (f" -- skipped: {why}{more}" if why else ""))
    return inv
