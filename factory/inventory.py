"""Checkpoint inventory: scan model folders on every node of the cluster (headers only).

Each node runs `scan_folders` as a Ray task pinned to it, over `checkpoints.dirs` (scanned on
every node) plus its own `checkpoints.node_dirs[<node>]`. It finds single-file `.safetensors`
and diffusers folders (`model_index.json`), checks the architecture from tensor names and shapes
(luna.models.sdxl.detect_architecture) and fingerprints the file and its text encoders
(luna.models.fingerprint). The driver merges the nodes' findings by fingerprint: one
`CheckpointInfo` per model, with its path on each node that holds it. Anything that is not a
loadable SDXL checkpoint is listed with the reason; it only stops a run when nothing usable is
found at all.
"""
from __future__ import annotations

import os
import re
import socket
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# fine-tune families whose text encoders differ from SDXL base; found in names and folders
KNOWN_FAMILIES = ("pony", "illustrious", "noobai", "animagine", "playground", "base")
_TOKEN_RE = re.compile(r"[A-Za-z0-9]+")


class InventoryError(ValueError):
    """No usable checkpoint, or a folder setting that names nothing (message says which)."""


@dataclass
class CheckpointInfo:
    """One SDXL model found on one or more nodes (the same fingerprint = the same model)."""

    name: str
    paths: dict[str, str]  # node -> path on that node
    fingerprint: str
    te_fingerprint: str
    family: str
    tags: list[str]
    format: str  # single_file | diffusers
    size: str | None = None  # full | tiny | custom

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
            lines.append(f"  {c.name:<32} {c.family:<14} {c.format:<11} fp {c.fingerprint[:12]} "
                         f"te {c.te_fingerprint[:12]} on {','.join(c.nodes)}")
        if self.rejected:
            lines.append(f"not usable ({len(self.rejected)}):")
            lines += [f"  [{r.node}] {r.path}: {r.reason}" for r in self.rejected]
        return "\n".join(lines)


# --------------------------------------------------------------------------- on one node


def _tags(path: Path, root: Path) -> list[str]:
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


def find_candidates(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(single files and diffusers folders under root, [(path, reason)] for other model files)."""
    found: list[Path] = []
    odd: list[tuple[Path, str]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        d = Path(dirpath)
        if "model_index.json" in filenames:
            found.append(d)
            dirnames[:] = []  # its component files are not checkpoints of their own
            continue
        # hidden and temporary folders are half-written copies (tiny.write_* uses `name.tmp`)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and not n.endswith(".tmp"))
        for f in sorted(filenames):
            if f.startswith("."):
                continue
            low = f.lower()
            if low.endswith(".safetensors"):
                found.append(d / f)
            elif low.endswith(PICKLE_SUFFIXES):
                odd.append((d / f, "pickle checkpoint (.ckpt/.pt/.bin): convert it to .safetensors to use it"))
    return found, odd


def scan_folders(dirs: Iterable[str], node: str = "") -> dict:
    """Scan folders on this machine; plain-data result: {"node", "host", "found": [...], "rejected": [...]}."""
    from luna.models.fingerprint import file_fingerprint, te_fingerprint
    from luna.models.sdxl import detect_architecture

    found, rejected = [], []
    for d in dirs:
        root = Path(str(d)).expanduser()
        if not root.is_dir():
            rejected.append({"path": str(root), "reason": "no such folder on this node"})
            continue
        cands, odd = find_candidates(root)
        rejected += [{"path": str(p), "reason": r} for p, r in odd]
        for p in cands:
            try:
                arch = detect_architecture(p)
                if not arch.is_sdxl:
                    rejected.append({"path": str(p), "reason": f"not SDXL: {arch.reason}"})
                    continue
                found.append({
                    "path": str(p), "name": p.stem if p.is_file() else p.name,
                    "fingerprint": str(file_fingerprint(p)), "te_fingerprint": str(te_fingerprint(p)),
                    "format": arch.format, "size": arch.size, "tags": _tags(p, root),
                })
            except Exception as e:  # noqa: BLE001 - one unreadable file must not stop the scan
                rejected.append({"path": str(p), "reason": f"unreadable: {type(e).__name__}: {e}"})
    return {"node": node, "host": socket.gethostname(), "found": found, "rejected": rejected}


# --------------------------------------------------------------------------- the whole cluster


def _family(tags_of_members: list[list[str]], te_fp: str) -> str:
    for fam in KNOWN_FAMILIES:
        if any(fam in tags for tags in tags_of_members):
            return fam
    return f"te-{te_fp[:8]}"


def merge(results: list[dict]) -> Inventory:
    """Merge per-node scan results into one inventory (one entry per fingerprint)."""
    inv = Inventory()
    by_fp: dict[str, list[tuple[str, dict]]] = defaultdict(list)
    for r in sorted(results, key=lambda r: r["node"]):
        inv.rejected += [Rejected(r["node"], x["path"], x["reason"]) for x in r["rejected"]]
        for x in r["found"]:
            by_fp[x["fingerprint"]].append((r["node"], x))
    entries = []
    for fp, items in by_fp.items():
        items.sort(key=lambda nx: (nx[0], nx[1]["path"]))
        node0, first = items[0]
        paths: dict[str, str] = {}
        for node, x in items:
            paths.setdefault(node, x["path"])  # one copy per node is enough
        tags = sorted(set().union(*(x["tags"] for _, x in items)))
        entries.append(dict(name=first["name"], paths=paths, fingerprint=fp, te_fingerprint=first["te_fingerprint"],
                            tags=tags, format=first["format"], size=first["size"]))
    # the family is shared by all checkpoints with the same text encoders
    by_te: dict[str, list[dict]] = defaultdict(list)
    for e in entries:
        by_te[e["te_fingerprint"]].append(e)
    fam_of = {te: _family([e["tags"] for e in es], te) for te, es in by_te.items()}
    names = defaultdict(int)
    for e in entries:
        names[e["name"]] += 1
    for e in sorted(entries, key=lambda e: (e["name"], e["fingerprint"])):
        name = e["name"] if names[e["name"]] == 1 else f"{e['name']}-{e['fingerprint'][:8]}"
        inv.checkpoints.append(CheckpointInfo(name=name, paths=e["paths"], fingerprint=e["fingerprint"],
                                              te_fingerprint=e["te_fingerprint"], family=fam_of[e["te_fingerprint"]],
                                              tags=e["tags"], format=e["format"], size=e["size"]))
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
    if local:
        inv = merge([scan_folders(dirs, node) for node, dirs in plan.items()])
    else:
        import ray

        remote = ray.remote(scan_folders)
        refs = [remote.options(num_cpus=0, **cluster.placement(node)).remote(dirs, node) for node, dirs in plan.items()]
        inv = merge(ray.get(refs))
    inv.scanned = plan
    if not inv.checkpoints:
        where = "; ".join(f"{n}: {ds}" for n, ds in plan.items())
        why = "; ".join(f"[{r.node}] {r.path}: {r.reason}" for r in inv.rejected[:5])
        more = f" (+{len(inv.rejected) - 5} more)" if len(inv.rejected) > 5 else ""
        raise InventoryError(f"no usable SDXL checkpoint in {where}" + (f" -- skipped: {why}{more}" if why else ""))
    return inv
