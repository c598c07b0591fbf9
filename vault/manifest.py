"""The vault folder's manifest (DESIGN.md §2); files are written through `luna.files.atomic_path`.

A vault folder holds
  manifest.json           this file's `Manifest` (format_version, vision model, metric, index specs, ...)
  index/global.faiss      the index over every image (stock `faiss.read_index` reads it)
  index/cat-<name>.faiss  one index per category (ids local to the category; members in metadata)
  metadata.h5             per image: key, prompt id, checkpoint/category/campaign codes; category members
  prompts.h5              one row per unique (prompt, text-encoder fingerprint): text, fingerprint
  cond-<nnnnn>.h5         mode `stored` only: fp16 cond [P,77,C] and pooled [P,Pd], contiguous
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from luna.files import atomic_path

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODES = ("stored", "prompts")


class VaultError(ValueError):
    """A vault that cannot be built, opened or queried as asked (the message says which file or value)."""


@dataclass
class Manifest:
    vision_model: str
    vision_dim: int
    text_dims: list[int]
    pooled_dim: int
    mode: str
    index_spec: str  # faiss index_factory string of the global index
    search_params: str = ""  # faiss ParameterSpace string, e.g. "efSearch=64"
    metric: str = "inner_product_l2_normalised"
    count: int = 0
    num_prompts: int = 0
    categories: dict = field(default_factory=dict)  # name -> {"count", "index_spec", "search_params", "file"}
    category_table: list[str] = field(default_factory=list)  # category codes in metadata.h5 index this list
    te_fingerprints: list[str] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    campaigns: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # pairs parts, absolute paths, in add order
    shard_folders: list[str] = field(default_factory=list)
    cond_files: list[str] = field(default_factory=list)  # relative to the vault folder, in prompt-id order
    memory_budget: int = 0
    tuned_recall: float = 1.0  # recall@10 of the global index's search params on its tuning queries
    tuning: dict = field(default_factory=dict)  # vault.index.Tuning of the global index: target, met, latency, method
    files: dict = field(default_factory=dict)  # "global", "metadata", "prompts" -> path in the folder
    generation: int = 0  # bumped by every add; file names carry it
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "Manifest":
        path = Path(folder) / MANIFEST
        if not Path(folder).is_dir():
            raise VaultError(f"{folder}: no such vault folder")
        if not path.is_file():
            raise VaultError(f"{path}: missing; {folder} is not a vault folder (build one with `luna vault build`)")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise VaultError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise VaultError(f"{path}: not a JSON object")
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise VaultError(f"{path}: format_version missing or not an integer")
        if version < 1:
            raise VaultError(f"{path}: vault format_version {version} is not a version this code knows ({FORMAT_VERSION})")
        if version > FORMAT_VERSION:
            raise VaultError(
                f"{path}: vault format_version {version} is newer than this code reads ({FORMAT_VERSION}); "
                "upgrade luna-foundry or rebuild the vault"
            )
        known = set(cls.__dataclass_fields__)
        missing = [k for k in ("vision_model", "vision_dim", "text_dims", "pooled_dim", "mode", "index_spec") if k not in data]
        if missing:
            raise VaultError(f"{path}: missing keys {missing}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def write(self, folder: str | os.PathLike) -> None:
        with atomic_path(Path(folder) / MANIFEST) as tmp:
            tmp.write_text(self.to_json())
