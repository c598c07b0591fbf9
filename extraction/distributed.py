"""Extraction on Ray: image actors over every node's GPUs (or CPUs), one text actor.

Each image actor loads the vision tower once and turns whole shards into `ShardImages` with the
same reader and batching as the single-process path; the driver keeps the prompt store, so the text
actor is asked only for (prompt, fingerprint) pairs never encoded before, and writes the parts.
The driver (`extraction.extract`) imports this module, never the reverse.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

from extraction.image import ImageEncoder, ShardImages, collect_shards, load_tower
from extraction.reader import Shard, iter_shard_batches
from extraction.text import make_conditioner
from luna.settings import get, plain, resolve_device

log = logging.getLogger(__name__)


def cluster_mode(cfg) -> str | None:
    """None for a single-process run, else the `cluster` mode (`local` | `lan`)."""
    c = get(cfg, "cluster")
    if c in (None, "none", "null", False):
        return None
    return str(c) if isinstance(c, str) else str(get(c, "mode", "local"))


class ShardEncoderWorker:
    """Body of the image actor: one vision tower, whole shards in, ShardImages out."""

    def __init__(self, vision_name: str, weights, device: str, tokens: bool, batch_size: int, dtype: str,
                 autocast: bool = True):
        device = resolve_device(device)
        self.tower = load_tower(vision_name, weights, device)
        self.encoder = ImageEncoder(self.tower, device, tokens=tokens, autocast=autocast)
        self.batch_size, self.dtype = int(batch_size), dtype

    def encode(self, index: int, src) -> ShardImages:
        """`src` is a path this node can read, or the tar's bytes shipped by the driver."""
        items = iter_shard_batches(index, src, self.tower.preprocess, self.batch_size)
        return next(collect_shards(items, self.encoder, self.dtype))


class TextWorker:
    """Body of the text actor: the TextConditioner, called only with new prompts."""

    def __init__(self, cfg_text: dict, checkpoints: dict, device: str):
        """checkpoints: conf/extract.yaml's `checkpoints` (dirs, cache) as plain data."""
        self.cond = make_conditioner({"text": cfg_text, "checkpoints": checkpoints}, resolve_device(device))

    def fingerprint(self, sample_fp: str, checkpoint: str) -> str:
        return self.cond.fingerprint(sample_fp, checkpoint)

    def encode(self, fp, prompts, hint):
        return self.cond.encode(fp, prompts, hint)

    def stats(self):
        return self.cond.stats()


class RemoteText:
    """TextConditioner's interface over the text actor (fingerprints cached on the driver)."""

    def __init__(self, actor):
        self.actor = actor
        self._fp: dict[tuple[str, str], str] = {}

    def fingerprint(self, sample_fp: str, checkpoint: str = "") -> str:
        import ray

        key = (sample_fp, checkpoint)
        if key not in self._fp:
            self._fp[key] = ray.get(self.actor.fingerprint.remote(sample_fp, checkpoint))
        return self._fp[key]

    def encode(self, fp, prompts, hint=""):
        import ray

        return ray.get(self.actor.encode.remote(fp, list(prompts), hint))

    def stats(self) -> dict:
        import ray

        return ray.get(self.actor.stats.remote())

    def close(self) -> None:
        import ray

        ray.kill(self.actor)


def connect_cluster(cfg):
    """Connect to Ray as `cluster` says (luna.cluster), or reuse this process's connection."""
    import ray

    if ray.is_initialized():
        return None
    from luna.cluster import connect

    c = get(cfg, "cluster")
    return connect({"mode": c} if isinstance(c, str) else plain(c))


def actor_resources(cfg) -> dict:
    import ray

    ray_cfg = get(cfg, "ray", {})
    gpus_total = ray.cluster_resources().get("GPU", 0)
    gpa = get(ray_cfg, "gpus_per_actor", "auto")
    if gpa == "auto":
        gpa = 1 if gpus_total else 0
    if float(gpa) > gpus_total:  # would wait forever for a GPU that no node has
        raise ValueError(f"ray.gpus_per_actor={gpa}: the Ray cluster has {gpus_total} GPUs")
    return {"num_cpus": float(get(ray_cfg, "cpus_per_actor", 1)), "num_gpus": float(gpa)}


def make_text_actor(cfg):
    import ray

    ray_cfg = get(cfg, "ray", {})
    gpus = ray.cluster_resources().get("GPU", 0)
    text_gpus = get(ray_cfg, "text_gpus", "auto")
    text_gpus = (0.25 if gpus else 0.0) if text_gpus == "auto" else float(text_gpus)
    if text_gpus > gpus:
        raise ValueError(f"ray.text_gpus={text_gpus}: the Ray cluster has {gpus} GPUs")
    actor = ray.remote(TextWorker).options(num_cpus=0.5, num_gpus=text_gpus, max_restarts=1).remote(
        plain(get(cfg, "text", {})), plain(get(cfg, "checkpoints", {})) or {},
        str(get(cfg, "device", "auto")),
    )
    return RemoteText(actor)


def ray_image_results(shards: list[Shard], cfg) -> Iterator[ShardImages]:
    """ShardImages of `shards` from a pool of image actors, in completion order."""
    import ray

    ray_cfg = get(cfg, "ray", {})
    res = actor_resources(cfg)
    n = get(ray_cfg, "actors")
    if n in (None, "auto"):
        total = ray.cluster_resources()
        n = int(total.get("GPU", 0) // res["num_gpus"]) if res["num_gpus"] else 2
    n = max(1, min(int(n), len(shards) or 1))
    vision = get(cfg, "vision", {})
    worker_cls = ray.remote(ShardEncoderWorker).options(**res, max_restarts=1, max_task_retries=1,
                                                          scheduling_strategy="SPREAD")
    actors = [
        worker_cls.remote(str(get(vision, "name", "tiny")), get(vision, "weights"), str(get(cfg, "device", "auto")),
                          bool(get(cfg, "tokens", False)), int(get(cfg, "batch_size", 64)),
                          str(get(cfg, "dtype", "float16")), bool(get(cfg, "autocast", True)))
        for _ in range(n)
    ]
    send_bytes = get(ray_cfg, "send_bytes", "auto")
    if send_bytes == "auto":  # LAN nodes may not see the driver's shards folder; a local cluster does
        send_bytes = cluster_mode(cfg) == "lan"
    per_actor = max(1, int(get(ray_cfg, "inflight_per_actor", 2)))

    def src(s: Shard):
        return Path(s.path).read_bytes() if send_bytes else str(Path(s.path).resolve())

    queue = list(enumerate(shards))
    inflight: dict = {}
    load = {i: 0 for i in range(n)}
    try:
        while queue or inflight:
            while queue and min(load.values()) < per_actor:
                a = min(load, key=load.get)
                idx, shard = queue.pop(0)
                inflight[actors[a].encode.remote(idx, src(shard))] = a
                load[a] += 1
            done, _ = ray.wait(list(inflight), num_returns=1)
            for ref in done:
                load[inflight.pop(ref)] -= 1
                yield ray.get(ref)
    finally:
        for ref in inflight:
            try:
                ray.cancel(ref)
            except Exception:  # noqa: BLE001 - best effort: the actors are killed next anyway
                pass
        for a in actors:
            ray.kill(a)
