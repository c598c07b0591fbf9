"""The extraction driver: shards -> image embeddings + deduplicated SDXL conditionings -> pairs parts.

One part per shard (`out/pairs-<shard stem>.h5`), written atomically, so a shard whose part exists
is done and a rerun continues where the last one stopped. Parts are written in shard order whatever
order the image side finishes them in, so the single-process and Ray paths batch the text encoders
the same way and write the same arrays.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from extraction import pairs as pairs_fmt
from extraction.distributed import cluster_mode, connect_cluster, make_text_actor, ray_image_results
from extraction.image import ImageEncoder, ShardImages, collect_shards, load_tower
from extraction.reader import Shard, check_format_version, decode_workers, find_shards, stream_batches
from extraction.text import PromptStore, TextConditioner, make_conditioner
from luna.files import write_json_atomic
from luna.settings import get, resolve_device

log = logging.getLogger(__name__)

PART_PREFIX = "pairs-"
REPORT_NAME = "extract_report.json"


class OutputMismatch(ValueError):
    """The output folder already holds pairs that this run's settings would not match."""


@dataclass
class ExtractResult:
    out: Path
    written: list[Path] = field(default_factory=list)
    skipped_done: list[str] = field(default_factory=list)  # shards whose part already existed
    incomplete: list[str] = field(default_factory=list)  # shards without _stats.json (not forced)
    corrupt: list[dict] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)  # shards with no usable sample (no part written)
    bad_samples: dict[str, list] = field(default_factory=dict)
    images: int = 0
    unique_prompts: int = 0  # distinct (prompt, fingerprint) in the folder after this run
    text: dict = field(default_factory=dict)  # the conditioner's counters
    seconds: dict = field(default_factory=dict)  # where the time went: setup, vision, wait_data, text, write, total
    report: Path | None = None

    def as_dict(self) -> dict:
        return {
            "out": str(self.out),
            "written": [p.name for p in self.written],
            "skipped_done": self.skipped_done,
            "incomplete": self.incomplete,
            "corrupt": self.corrupt,
            "empty": self.empty,
            "bad_samples": self.bad_samples,
            "images": self.images,
            "unique_prompts": self.unique_prompts,
            "text": self.text,
            "seconds": self.seconds,
        }


def part_path(out: Path, shard: Shard) -> Path:
    return out / f"{PART_PREFIX}{shard.stem}.h5"


# --- checks before any work ------------------------------------------------------------------
def check_output(out: Path, vision_model: str, vision_dim: int, tokens: bool) -> list[Path]:
    """Existing parts of `out`, checked to be from the same vision model; OutputMismatch otherwise."""
    existing = pairs_fmt.list_parts(out) if out.is_dir() else []
    for p in existing:
        attrs = pairs_fmt.read_attrs(p)
        if attrs.get("vision_model") != vision_model or int(attrs.get("vision_dim", -1)) != int(vision_dim):
            raise OutputMismatch(
                f"{p}: holds pairs of vision model {attrs.get('vision_model')!r} (dim {attrs.get('vision_dim')}), "
                f"this run uses {vision_model!r} (dim {vision_dim}); choose another out= folder"
            )
        if bool(attrs.get("has_tokens")) != bool(tokens):
            raise OutputMismatch(
                f"{p}: was written with tokens={str(bool(attrs.get('has_tokens'))).lower()}, this run has "
                f"tokens={str(bool(tokens)).lower()}; use the same setting or another out= folder"
            )
    return existing


# --- the part of one shard ---------------------------------------------------------------------
def build_part(shard: Shard, images: ShardImages, store: PromptStore, text: TextConditioner | Any,
               attrs: dict) -> tuple[pairs_fmt.PairsPart, list[tuple[str, str]]]:
    """Arrays of a shard's part and the prompts whose conditionings it stores (rows 0.. of its
    /prompts/cond): those no part written before holds, so the folder stores each prompt once.
    Encodes the shard's prompts the store does not know yet."""
    metas = images.metas
    keys = [(m.prompt, text.fingerprint(m.te_fingerprint, m.checkpoint)) for m in metas]
    order: dict[tuple[str, str], int] = {}
    for k in keys:
        order.setdefault(k, len(order))
    unique = list(order)
    missing = store.missing(unique)
    hint: dict[str, list[dict]] = {}  # fingerprint -> the checkpoints the samples record (name, file fp, path, node)
    for k, m in zip(keys, metas):
        rec = {"name": m.checkpoint, "fingerprint": m.checkpoint_fingerprint, "path": m.checkpoint_path, "node": m.node}
        if rec not in hint.setdefault(k[1], []):
            hint[k[1]].append(rec)
    by_fp: dict[str, list[tuple[str, str]]] = {}
    for k in missing:
        by_fp.setdefault(k[1], []).append(k)
    for fp in sorted(by_fp):
        ks = by_fp[fp]
        encoded = text.encode(fp, [k[0] for k in ks], hint.get(fp, []))
        store.add(ks, encoded[0], encoded[1], **(getattr(encoded, "extra", None) or {}))
    stored = [k for k in unique if not store.on_disk(k)]
    cond, pooled = store.get(stored) if stored else (np.zeros((0, 77, 1)), np.zeros((0, 1)))
    row = {k: i for i, k in enumerate(stored)}
    images_cols = {
        "key": np.array([m.key for m in metas], dtype=object),
        "embed": images.embed,
        "prompt_id": np.array([order[k] for k in keys], dtype=np.int64),
        "checkpoint": np.array([m.checkpoint for m in metas], dtype=object),
        "category": np.array([m.category for m in metas], dtype=object),
        "campaign": np.array([m.campaign for m in metas], dtype=object),
        "seed": np.array([m.seed for m in metas], dtype=np.int64),
    }
    if images.tokens is not None:
        images_cols["tokens"] = images.tokens
    prompts = {
        "text": np.array([k[0] for k in unique], dtype=object),
        "cond": cond,
        "pooled": pooled,
        "te_fingerprint": np.array([k[1] for k in unique], dtype=object),
        "cond_row": np.array([row.get(k, -1) for k in unique], dtype=np.int64),
        **(store.extras(stored) if stored else {}),  # optional clip_l_cond / clip_l_pooled, rows as cond's
    }
    return pairs_fmt.PairsPart(images_cols, prompts, dict(attrs, source_shard=shard.path.name,
                                                                        shards_dir=str(shard.path.parent.resolve()))), stored


def in_shard_order(results: Iterator[ShardImages]) -> Iterator[ShardImages]:
    """Re-emit results by increasing shard index (results arrive in any order, each index once)."""
    pending: dict[int, ShardImages] = {}
    nxt = 0
    for r in results:
        pending[r.index] = r
        while nxt in pending:
            yield pending.pop(nxt)
            nxt += 1
    for i in sorted(pending):
        yield pending.pop(i)


# --- the image side, single process ---------------------------------------------------------------
def local_image_results(shards: list[Shard], encoder: ImageEncoder, preprocess, cfg) -> Iterator[ShardImages]:
    items = stream_batches([s.path for s in shards], preprocess, int(get(cfg, "batch_size", 64)),
                           decode_workers(get(cfg, "workers", "auto"), encoder.device))
    yield from collect_shards(items, encoder, str(get(cfg, "dtype", "float16")))


# --- the whole run ------------------------------------------------------------------------------
def _write_report(out: Path, result: ExtractResult, extra: dict) -> Path:
    return write_json_atomic(out / REPORT_NAME, {**extra, **result.as_dict()}, sort_keys=True)


def _progress(total: int | None, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="extract", disable=not enabled, dynamic_ncols=True)


def extract(cfg, text: TextConditioner | None = None) -> ExtractResult:
    """Run extraction as `cfg` (conf/extract.yaml) says. `text` overrides the text conditioner
    (a remote one on Ray, a counting one in tests)."""
    out = Path(str(get(cfg, "out"))).expanduser()
    started = time.time()
    shards, incomplete = find_shards(get(cfg, "shards"), force=bool(get(cfg, "force", False)))
    for s in shards:
        check_format_version(s)
    vision_cfg = get(cfg, "vision", {})
    device = resolve_device(get(cfg, "device", "auto"))
    decode_workers(get(cfg, "workers", "auto"), device)  # a bad value is named before any model loads
    tokens = bool(get(cfg, "tokens", False))
    dtype = str(get(cfg, "dtype", "float16"))
    tower = load_tower(str(get(vision_cfg, "name", "tiny")), get(vision_cfg, "weights"), device)
    existing = check_output(out, tower.model_id, tower.dim, tokens)
    out.mkdir(parents=True, exist_ok=True)

    result = ExtractResult(out=out, incomplete=[p.name for p in incomplete])
    todo = []
    for s in shards:
        (result.skipped_done.append(s.path.name) if part_path(out, s).exists() else todo.append(s))
    text_cfg = get(cfg, "text", {})
    given_text = text
    mode = cluster_mode(cfg)
    cluster = None
    if mode is not None:
        cluster = connect_cluster(cfg)
        if text is None:
            text = make_text_actor(cfg)
    if text is None:
        text = make_conditioner(cfg, device)
    own_text = text is not given_text
    store = PromptStore.from_parts(existing)
    prior_dims = pairs_fmt.read_attrs(existing[0]) if existing else {}
    report_extra = {"started": started, "vision_model": tower.model_id, "vision_dim": tower.dim,
                    "text_mode": str(get(text_cfg, "mode", "per_checkpoint")), "device": device}

    if mode is None:
        encoder = ImageEncoder(tower, device, tokens=tokens, autocast=bool(get(cfg, "autocast", True)))
        results = local_image_results(todo, encoder, tower.preprocess, cfg)
    else:
        del tower  # the actors load their own
        results = ray_image_results(todo, cfg) if todo else iter(())
    result.seconds["setup"] = round(time.time() - started, 3)
    total = sum(s.expected_count or 0 for s in todo) or None
    bar = _progress(total, bool(get(cfg, "progress", True)))
    # Text encoding and writing of shard k run in one background thread (in shard order, so the
    # result does not depend on timing) while the vision tower goes on with shard k+1.
    finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="extract-writer")
    pending: list = []
    try:
        for images in in_shard_order(results):
            while len(pending) >= 2:  # bounds the shards held in memory
                pending.pop(0).result()
            pending.append(finisher.submit(_finish_shard, todo[images.index], images, out, store, text, dtype,
                                           result, report_extra, prior_dims))
            bar.update(images.count + len(images.bad_samples))
        while pending:
            pending.pop(0).result()
        result.text = text.stats()
        result.unique_prompts = len(store)
        if mode is None:
            result.seconds.update(vision=round(encoder.seconds, 3), wait_data=round(encoder.wait_seconds, 3))
        result.seconds.update(text=result.text.get("seconds"), total=round(time.time() - started, 3))
        result.report = _write_report(out, result, {**report_extra, "finished": time.time()})
    finally:
        finisher.shutdown(wait=True, cancel_futures=True)
        bar.close()
        store.close()
        if own_text and hasattr(text, "close"):
            text.close()
        if cluster is not None:
            cluster.close()
    if result.corrupt:
        log.error("%d corrupt shard(s) listed in %s", len(result.corrupt), result.report)
    return result


def _finish_shard(shard: Shard, images: ShardImages, out: Path, store: PromptStore, text, dtype: str,
                  result: ExtractResult, report_extra: dict, prior_dims: dict) -> None:
    """Write the part of one shard (or record why there is none), then the report so far."""
    name = shard.path.name
    if images.bad_samples:
        result.bad_samples[name] = images.bad_samples
    if images.error is not None:
        log.error("shard %s is corrupt and was not extracted: %s", shard.path, images.error)
        result.corrupt.append({"shard": str(shard.path), "error": images.error, "samples_read": images.count})
    elif not images.metas:
        log.warning("shard %s has no usable sample; no part written", shard.path)
        result.empty.append(name)
    else:
        read = images.count + len(images.bad_samples)
        if shard.expected_count is not None and read != shard.expected_count:
            log.warning("shard %s: %d samples read, its stats file says %d", name, read, shard.expected_count)
        part, keys = build_part(shard, images, store, text, {})
        part.attrs.update(part_attrs(report_extra, dtype, text, prior_dims))
        t = time.perf_counter()
        path = pairs_fmt.write_part(part_path(out, shard), part, dtype=dtype)
        result.seconds["write"] = round(result.seconds.get("write", 0.0) + time.perf_counter() - t, 3)
        store.written(path, keys)
        result.written.append(path)
        result.images += len(images.metas)
    result.text = text.stats()
    result.unique_prompts = len(store)
    result.report = _write_report(out, result, report_extra)


def part_attrs(extra: dict, dtype: str, text, prior: dict) -> dict:
    dims = text.stats().get("dims")
    text_dims, pooled_dim = (list(dims[0]), int(dims[1])) if dims else (prior.get("text_dims"), prior.get("pooled_dim"))
    return {
        "vision_model": extra["vision_model"],
        "vision_dim": int(extra["vision_dim"]),
        "text_dims": text_dims,
        "pooled_dim": pooled_dim,
        "text_mode": extra["text_mode"],
        "dtype": dtype,
    }
