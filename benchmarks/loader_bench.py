"""Projector data loader from disk at full-size conditionings: today's reader vs the chunk-shuffled one.

    python benchmarks/loader_bench.py [--images 4000] [--images-per-prompt 1] [--workers 0 2] [--out FILE]

Writes a synthetic pairs folder with real SDXL sizes (embedding 1024, conditioning [77, 2048] +
pooled [1280], fp16; one image per prompt by default: the worst case, every sample its own
conditioning), then measures training batches per second delivered by
  row-by-row   the reader before this change: rows shuffled one by one, each batch's conditionings
               read one HDF5 row per call (`Pairs.cond`), in this process (the baseline)
  chunked      `PairsDataModule(in_memory=False)`'s train loader: chunk-shuffled batches, each read
               as a few contiguous runs, with 0 and --workers loader processes
Each measurement starts with the pairs files dropped from the page cache (posix_fadvise
DONTNEED), so it reads from disk, and covers one epoch (at most --max-seconds). Ratios are
against row-by-row in the same run.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from extraction.pairs import Pairs  # noqa: E402
from extraction.synthetic import write_synthetic_pairs  # noqa: E402
from projector.data import PairsDataModule  # noqa: E402


def drop_cache(folder: Path) -> None:
    for f in folder.glob("*.h5"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def row_by_row(folder: Path, rows: np.ndarray, batch: int, max_s: float, seed: int) -> tuple[float, int]:
    """The reader before: a random permutation, per batch `Pairs.cond(unique prompts)` (one row per call)."""
    with Pairs(folder) as p:
        order = np.random.default_rng(seed).permutation(rows)
        n, start = 0, time.perf_counter()
        for i in range(0, len(order), batch):
            b = order[i : i + batch]
            pid = p.prompt_id[b]
            uniq, inv = np.unique(pid, return_inverse=True)
            out = {"x": torch.from_numpy(np.ascontiguousarray(p.embed[b])),
                   "cond": torch.from_numpy(p.cond(uniq)[inv]), "pooled": torch.from_numpy(p.pooled(uniq)[inv])}
            n += len(out["x"])
            if time.perf_counter() - start > max_s:
                break
        return n / (time.perf_counter() - start), n


def chunked(dm: PairsDataModule, max_s: float) -> tuple[float, int]:
    n, start = 0, time.perf_counter()
    for batch in dm.train_dataloader():
        n += len(batch["x"])
        if time.perf_counter() - start > max_s:
            break
    return n / (time.perf_counter() - start), n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--images-per-prompt", type=int, default=1)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--chunk-rows", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--parts", type=int, default=8)
    ap.add_argument("--max-seconds", type=float, default=30.0)
    ap.add_argument("--work", default=None, help="scratch folder (kept; default: a temporary one, removed)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(args.work or tempfile.mkdtemp(prefix="loader_bench_"))
    folder = work / f"pairs-{args.images}-{args.images_per_prompt}"
    t = time.perf_counter()
    if not (folder / "complete").exists():
        shutil.rmtree(folder, ignore_errors=True)
        write_synthetic_pairs(folder, args.images, args.images // args.images_per_prompt, 1024, text_dims=(768, 1280),
                              pooled_dim=1280, n_clusters=64, parts=args.parts, prompt_order="blocks")
        (folder / "complete").write_text("ok")
    gen_s = time.perf_counter() - t
    size = sum(f.stat().st_size for f in folder.glob("*.h5"))
    rows = []
    try:
        common = dict(batch_size=args.batch, val_prompts=0.05, val_checkpoints=0, in_memory=False,
                      chunk_rows=args.chunk_rows, stats_prompts=256, knn_max_queries=16)
        dm = PairsDataModule(str(folder), num_workers=0, **common)
        dm.setup()
        train = dm.splits["train"]
        drop_cache(folder)
        base, n = row_by_row(folder, train, args.batch, args.max_seconds, seed=0)
        rows.append(("row-by-row (before), 0 workers", base, n))
        for w in args.workers:
            dmw = PairsDataModule(str(folder), num_workers=w, **common)
            dmw.setup()
            drop_cache(folder)
            rate, n = chunked(dmw, args.max_seconds)
            rows.append((f"chunk-shuffled runs, {w} workers", rate, n))
            rate, n = chunked(dmw, args.max_seconds)
            rows.append((f"chunk-shuffled runs, {w} workers, 2nd epoch (page cache warm)", rate, n))
            dmw.teardown()
        dm.teardown()
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    lines = [
        "```", f"python benchmarks/loader_bench.py {' '.join(argv if argv is not None else sys.argv[1:])}", "```", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared), 1-minute load {os.getloadavg()[0]:.1f}; "
        f"{args.images} images, {args.images // args.images_per_prompt} prompts, conditioning [77, 2048] + [1280] fp16, "
        f"embedding 1024; {size / 1e9:.2f} GB in {args.parts} parts (written in {gen_s:.0f} s); batch {args.batch}, "
        f"chunk_rows {args.chunk_rows}; page cache dropped before each first epoch.", "",
        "| loader | samples/s | samples timed | vs row-by-row | conditioning MB/s |", "| --- | ---: | ---: | ---: | ---: |",
    ]
    per = (77 * 2048 + 1280) * 2 / args.images_per_prompt
    for name, rate, n in rows:
        lines.append(f"| {name} | {rate:,.0f} | {n:,} | {rate / base:.1f}x | {rate * per / 1e6:,.0f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
