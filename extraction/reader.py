"""Extraction's input: shard discovery by folders, globs and brace patterns, sample metadata, and
decoded batches for the vision tower in DataLoader workers.

The tars are read through `factory.shards` (the one reader of the shard contract: completeness by
the stats marker, safe in-memory tar streaming, CorruptShard on a cut tar).
"""
from __future__ import annotations

import glob
import io
import json
import re
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from factory.shards import IMAGE_EXTS, READABLE_FORMAT_VERSIONS, STATS_SUFFIX, CorruptShard, iter_samples, read_stats

log = logging.getLogger(__name__)


class ShardError(ValueError):
    """Bad shard input a user can fix (no shards, wrong format version); names the path at fault."""


@dataclass
class Shard:
    path: Path
    stats: dict | None  # the parsed stats marker, None when missing (incomplete shard)

    @property
    def stem(self) -> str:
        return self.path.name[: -len(".tar")] if self.path.name.endswith(".tar") else self.path.stem

    @property
    def expected_count(self) -> int | None:
        if not self.stats:
            return None
        for k in ("successes", "count", "samples", "written"):
            if isinstance(self.stats.get(k), int):
                return self.stats[k]
        return None


# --- discovery ----------------------------------------------------------------------------
def expand_patterns(spec) -> list[Path]:
    """Shard tars named by folders, globs and brace patterns (`a-{000000..000009}.tar`), sorted, unique."""
    from braceexpand import braceexpand

    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec or [])
    found: list[Path] = []
    for item in items:
        item = os.path.expanduser(str(item))
        if os.path.isdir(item):
            found += [p for p in Path(item).glob("*.tar") if not p.name.startswith(".")]
            continue
        for pattern in braceexpand(item):
            if glob.has_magic(pattern):
                found += [Path(p) for p in glob.glob(pattern) if p.endswith(".tar") and not Path(p).name.startswith(".")]
            elif os.path.isfile(pattern):
                found.append(Path(pattern))
            else:
                raise ShardError(f"{pattern}: no such shard file or folder")
    return sorted(set(found), key=lambda p: (p.name, str(p)))


def find_shards(spec, force: bool = False) -> tuple[list[Shard], list[Path]]:
    """(complete shards, incomplete shards skipped). With `force`, incomplete shards are kept."""
    paths = expand_patterns(spec)
    if not paths:
        raise ShardError(f"{spec}: no shard tars (*.tar) found")
    shards, skipped = [], []
    for p in paths:
        try:
            stats = read_stats(p)
        except ValueError as e:
            raise ShardError(str(e)) from None
        if stats is None and not force:
            skipped.append(p)
            continue
        shards.append(Shard(p, stats))
    if skipped:
        log.warning(
            "%d shard(s) have no %s marker (still being written, or interrupted) and are skipped; "
            "pass force=true to read them anyway: %s", len(skipped), STATS_SUFFIX, ", ".join(p.name for p in skipped[:5]),
        )
    return shards, skipped


# --- samples --------------------------------------------------------------------------------
@dataclass
class SampleMeta:
    """The fields of a sample's json that extraction keeps."""

    key: str
    prompt: str
    te_fingerprint: str
    checkpoint: str
    checkpoint_fingerprint: str
    category: str
    campaign: str
    seed: int
    format_version: int | None
    node: str = ""  # the factory node that rendered it
    checkpoint_path: str = ""  # where the checkpoint was on that node, when the factory records it


_KEY = re.compile(r"[A-Za-z0-9_-]+")  # DESIGN §2: dot-free keys; "../x" or "/tmp/x" never pass


def _meta_field(meta: dict, *names, default=None):
    """The first of `names` (dotted paths into nested objects) present in a sample's json."""
    for n in names:
        cur = meta
        for part in n.split("."):
            if not isinstance(cur, dict) or part not in cur:
                break
            cur = cur[part]
        else:
            return cur
    return default


def parse_meta(key: str, files: dict[str, bytes]) -> SampleMeta:
    """Sample metadata from `key.json` (prompt falls back to `key.txt`). Raises ValueError when unusable."""
    if not _KEY.fullmatch(key):
        raise ValueError(f"key {key!r} is not a shard key ([A-Za-z0-9_-] only): member names are never trusted")
    if "json" not in files:
        raise ValueError("no .json member")
    meta = json.loads(files["json"].decode("utf-8"))
    if not isinstance(meta, dict):
        raise ValueError(".json is not an object")
    prompt = _meta_field(meta, "prompt")
    if prompt is None and "txt" in files:
        prompt = files["txt"].decode("utf-8")
    if prompt is None:
        raise ValueError("no prompt in .json or .txt")
    if not isinstance(prompt, str):
        raise ValueError(f"prompt is a {type(prompt).__name__}, not text")
    ckpt = _meta_field(meta, "checkpoint", "checkpoint.name", default="")
    if isinstance(ckpt, dict):
        ckpt = ckpt.get("name", "")
    category = _meta_field(meta, "category", "category_path", default="")
    if isinstance(category, (list, tuple)):
        category = "/".join(map(str, category))
    return SampleMeta(
        key=key,
        prompt=str(prompt),
        te_fingerprint=str(_meta_field(meta, "te_fingerprint", "checkpoint.te_fingerprint", "text_encoder_fingerprint", default="")),
        checkpoint=str(ckpt),
        checkpoint_fingerprint=str(_meta_field(meta, "checkpoint_fingerprint", "fingerprint", "checkpoint.fingerprint", default="")),
        category=str(category),
        campaign=str(_meta_field(meta, "campaign", default="")),
        seed=int(_meta_field(meta, "seed", default=-1)),
        format_version=_meta_field(meta, "format_version"),
        node=str(_meta_field(meta, "node", default="") or ""),
        checkpoint_path=str(_meta_field(meta, "checkpoint_path", "checkpoint.path", default="") or ""),
    )


def decode_image(files: dict[str, bytes]):
    from PIL import Image

    ext = next((e for e in IMAGE_EXTS if e in files), None)
    if ext is None:
        raise ValueError(f"no image member (one of {', '.join(IMAGE_EXTS)})")
    img = Image.open(io.BytesIO(files[ext]))
    img.load()
    return img.convert("RGB")


def check_format_version(shard: Shard) -> int | None:
    """The shard's format version (stats marker or first sample); ShardError when unsupported."""
    version = (shard.stats or {}).get("format_version")
    if version is None:
        try:
            for key, files in iter_samples(shard.path):
                version = parse_meta(key, files).format_version
                break
        except (CorruptShard, ValueError):
            return None  # reported when the shard is read
    if version is not None and version not in READABLE_FORMAT_VERSIONS:
        raise ShardError(
            f"{shard.path}: shard format_version {version!r}, this extraction reads {list(READABLE_FORMAT_VERSIONS)}"
        )
    return version


# --- batches for the model -------------------------------------------------------------------
@dataclass
class Batch:
    """Preprocessed images of one shard (a batch never spans two shards)."""

    shard: int
    pixels: "object"  # torch tensor [B, 3, H, W]
    meta: list[SampleMeta]


@dataclass
class ShardEnd:
    shard: int
    count: int
    bad_samples: list[dict] = field(default_factory=list)
    error: str | None = None  # set when the shard is corrupt: its batches must be discarded


def iter_shard_batches(
    index: int, src, preprocess: Callable, batch_size: int
) -> Iterator[Batch | ShardEnd]:
    """Batches of one shard then its ShardEnd. Bad samples are skipped and listed; a corrupt tar ends
    with ShardEnd.error set."""
    pix, metas, bad, count = [], [], [], 0
    try:
        for key, files in iter_samples(src):
            try:
                meta = parse_meta(key, files)
                pixels = preprocess(decode_image(files))
            except Exception as e:  # a bad sample is reported, the shard goes on
                bad.append({"key": key, "reason": f"{type(e).__name__}: {e}"})
                continue
            pix.append(pixels)
            metas.append(meta)
            count += 1
            if len(pix) == batch_size:
                yield Batch(index, torch.stack(pix), metas)
                pix, metas = [], []
    except (CorruptShard, OSError) as e:
        yield ShardEnd(index, count, bad, error=str(e))
        return
    if pix:
        yield Batch(index, torch.stack(pix), metas)
    yield ShardEnd(index, count, bad)


class ShardStream(IterableDataset):
    """An IterableDataset over shards: worker w decodes shards w, w+W, ... so decoding overlaps
    the model in the main process. Items are `Batch` and `ShardEnd`."""

    def __init__(self, sources: list, preprocess: Callable, batch_size: int):
        self.sources, self.preprocess, self.batch_size = list(sources), preprocess, batch_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for i in range(wid, len(self.sources), nw):
            yield from iter_shard_batches(i, self.sources[i], self.preprocess, self.batch_size)


def _worker_context() -> str | None:
    """Fork (fast) unless this process talks to Ray: forking its gRPC threads can hang the children."""
    ray = sys.modules.get("ray")
    return "spawn" if ray is not None and ray.is_initialized() else None


AUTO_WORKERS_MAX = 8


def decode_workers(value, device: str) -> int:
    """The `workers` setting as a number of decoding processes. A number is taken as given; "auto" is,
    on a GPU, every core but two, at most AUTO_WORKERS_MAX; on the CPU, 2 (the forward itself needs
    the cores). Measured on one H200 with 16 cores (benchmarks/results/gpu_extract_workers.md):
    ViT-H-14's forward takes 930 images/s; 8 processes decode and resize 911 PNGs of 336 px a second
    and kept it fed (4096 images in 4.5 s of vision), 14 were no faster (860/s); 2, the old default,
    would give about a quarter of it."""
    from luna.settings import number_or_auto, usable_cores

    n = number_or_auto(value, "workers", int, "a number of decoding processes (0: in this process)")
    if n is not None:
        return n
    cores = usable_cores()
    if str(device).startswith("cuda"):
        return max(1, min(AUTO_WORKERS_MAX, cores - 2))
    return min(2, cores)


def stream_batches(sources: list, preprocess: Callable, batch_size: int, workers: int):
    """Batches and shard ends of `sources` (paths or tar bytes), decoded by `workers` processes."""
    workers = max(0, min(int(workers), len(sources)))
    loader = DataLoader(
        ShardStream(sources, preprocess, batch_size),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        multiprocessing_context=_worker_context() if workers else None,
    )
    return iter(loader)

