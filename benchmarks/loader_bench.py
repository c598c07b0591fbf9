"""Projector data loader from disk at full-size conditionings: today's reader vs the chunk-shuffled one
vs the online-targets loader, the disk's own bandwidth and the online targets' encoder cost, one run;
with --online, stored conditionings from disk vs online targets (text encoders in the loop) at tiny size.

    python benchmarks/loader_bench.py [--images 4000] [--images-per-prompt 1] [--workers 0 2] [--out FILE]
    python benchmarks/loader_bench.py --online [--images 4000] [--full-encoder-prompts 8] [--out FILE]

Writes a synthetic pairs folder with real SDXL sizes (embedding 1024, conditioning [77, 2048] +
pooled [1280], fp16; one image per prompt by default: the worst case, every sample its own
conditioning; text-encoder fingerprint of a tiny-preset checkpoint, so online targets can run on
it), then measures
  disk         the pairs files read start to end in 8 MB reads (the ceiling of any stored loader)
  open         `Pairs(folder)` from a dropped cache: image columns and prompt tables into RAM, all
               that the online loader ever reads from disk
and training batches per second delivered by
  row-by-row   the reader before chunked reads: rows shuffled one by one, each batch's conditionings
               read one HDF5 row per call (`Pairs.cond`), in this process (the baseline)
  chunked      `PairsDataModule(in_memory=False)`'s train loader: chunk-shuffled batches, each read
               as a few contiguous runs, with 0 and --workers loader processes
  online       `PairsDataModule(conditionings="online")`'s train loader: image embeddings, prompt ids,
               token counts and each prompt's token ids gathered from the pairs folder's token-ids
               store, i.e. everything a training step needs before the text encoders run on the
               training device (`on_after_batch_transfer`), which is not included here
Each measurement starts with the pairs files dropped from the page cache (posix_fadvise
DONTNEED), so it reads from disk, and covers one epoch (at most --max-seconds) less its first
batch (which includes starting loader workers). Ratios are against row-by-row in the same run and
against the 573 samples/s issue 16 measured. The online targets' cost is reported apart: the one-off
tokenizing of every prompt into the token-ids store (the store removed first) and reading it back at
a later setup, prompts/s of both SDXL tokenizers at batch size (what the store saves per sample and
epoch) and of the tiny text encoders on the stored ids on this CPU (--encode-prompts of them);
--full-encoder-prompts N adds the full-size encoders on this CPU. On a GPU the encoders are part of the training step, which
`benchmarks/gpu_all.py` measures.

--online writes a tiny-preset checkpoint (`luna.models.tiny`), encodes --images prompts (one image
each by default) with its text encoders through `luna.models.conditioner.TextConditioner` (what
extraction stores), writes them as pairs (fp16, [77, 32+64] + [64]) and measures one epoch of
  stored   `PairsDataModule(in_memory=False)`'s train loader from disk (chunk-shuffled, 0 workers)
  online   `PairsDataModule(conditionings="online")`: the loader reads image columns only and each
           batch's targets are computed by the tiny text encoders on this CPU (one thread, no cache
           hits: every prompt is new within the epoch), as Lightning would in on_after_batch_transfer
and the ratio online / stored. --full-encoder-prompts N also times N prompts through the full-size
SDXL text encoders (CLIP-L + OpenCLIP bigG, random weights, fp32 on this CPU, the same
`encode_prompt`) to show what online targets at full size need: a GPU.
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
from benchmarks.report import command, emit  # noqa: E402

from extraction.pairs import TOKEN_IDS_DIR, Pairs  # noqa: E402
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
        clock = _Clock(max_s)
        for i in range(0, len(order), batch):
            b = order[i : i + batch]
            pid = p.prompt_id[b]
            uniq, inv = np.unique(pid, return_inverse=True)
            out = {"x": torch.from_numpy(np.ascontiguousarray(p.embed[b])),
                   "cond": torch.from_numpy(p.cond(uniq)[inv]), "pooled": torch.from_numpy(p.pooled(uniq)[inv])}
            if clock.tick(len(out["x"])):
                break
        return clock.rate()


class _Clock:
    """Samples/s over the batches after the first (the first includes starting loader workers), for at
    most `max_s` seconds."""

    def __init__(self, max_s: float):
        self.max_s, self.n, self.start = max_s, 0, None

    def tick(self, n: int) -> bool:
        if self.start is None:
            self.start = time.perf_counter()
            return False
        self.n += n
        self.end = time.perf_counter()
        return self.end - self.start > self.max_s

    def rate(self) -> tuple[float, int]:
        if not self.n:
            raise SystemExit("loader_bench: one batch per epoch; use more --images (the first batch is not timed)")
        return self.n / (self.end - self.start), self.n


def chunked(dm: PairsDataModule, max_s: float) -> tuple[float, int]:
    clock = _Clock(max_s)
    for batch in dm.train_dataloader():
        if clock.tick(len(batch["x"])):
            break
    return clock.rate()


WORDS = ("blue eyes close-up gold ring hand silk dress red green freckles hair silver necklace denim jacket brown "
         "smiling cup straw hat wool scarf striped glasses portrait neon light soft shadow studio film grain").split()


def write_tiny_online_pairs(work: Path, n_prompts: int, images_per_prompt: int, parts: int) -> tuple[Path, Path]:
    """A tiny checkpoint and a pairs folder whose stored conditionings are its text encoders' (as extraction stores)."""
    from extraction.pairs import PairsPart, write_part
    from luna.models import tiny
    from luna.models.conditioner import TextConditioner

    ckpt = tiny.write_checkpoints(work / "tiny", n=1)[0].single_file
    text = TextConditioner("reference", reference=str(ckpt), batch_size=256)
    fp = text.fingerprint("", "")
    rng = np.random.default_rng(0)
    prompts = [f"{i} " + " ".join(rng.choice(WORDS, size=int(rng.integers(3, 20)))) for i in range(n_prompts)]
    cond, pooled = text.encode(fp, prompts)
    folder = work / "pairs"
    folder.mkdir(parents=True, exist_ok=True)
    for k, ids in enumerate(np.array_split(np.arange(n_prompts), parts)):
        n = len(ids) * images_per_prompt
        part = PairsPart(
            images={"key": np.array([f"p{k}_{i:06d}" for i in range(n)], dtype=object),
                    "embed": rng.standard_normal((n, 1024)).astype(np.float16),
                    "prompt_id": np.repeat(np.arange(len(ids)), images_per_prompt),
                    "checkpoint": np.array([ckpt.stem] * n, dtype=object), "category": np.array(["x"] * n, dtype=object),
                    "campaign": np.array(["bench"] * n, dtype=object), "seed": np.arange(n)},
            prompts={"text": np.array([prompts[i] for i in ids], dtype=object), "cond": cond[ids], "pooled": pooled[ids],
                     "te_fingerprint": np.array([fp] * len(ids), dtype=object)},
            attrs={"vision_model": "bench", "vision_dim": 1024, "text_dims": list(text.dims[0]),
                   "pooled_dim": int(text.dims[1]), "dtype": "float16"})
        write_part(folder / f"pairs-{k:04d}.h5", part)
    return folder, ckpt


def online_epoch(dm: PairsDataModule, max_s: float) -> tuple[float, int]:
    n, start = 0, time.perf_counter()
    for batch in dm.train_dataloader():
        batch = dm.on_after_batch_transfer(batch, 0)  # what Lightning calls once the batch is on the device
        n += len(batch["cond"])
        if time.perf_counter() - start > max_s:
            break
    return n / (time.perf_counter() - start), n


def full_encoders_cpu(n: int) -> float:
    """Prompts/s of the full-size SDXL text encoders (random weights, fp32) on this CPU, batch n."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from luna.models.configs import SDXL_BASE
    from luna.models.sdxl import TextEncoders, encode_prompt
    from luna.models.tokenizers import sdxl_tokenizers

    import json

    cfg = lambda sub: CLIPTextConfig(**json.loads((SDXL_BASE / sub / "config.json").read_text()))  # noqa: E731
    enc = TextEncoders(*sdxl_tokenizers(), CLIPTextModel(cfg("text_encoder")).eval(),
                       CLIPTextModelWithProjection(cfg("text_encoder_2")).eval())
    prompts = [" ".join(WORDS[i % len(WORDS) : i % len(WORDS) + 8]) for i in range(n)]
    with torch.inference_mode():
        encode_prompt(enc, prompts[:1])
        start = time.perf_counter()
        cond, pooled = encode_prompt(enc, prompts)[:2]
        rate = n / (time.perf_counter() - start)
    assert cond.shape == (n, 77, 2048) and pooled.shape == (n, 1280)
    return rate


def main_online(args, argv) -> int:
    work = Path(args.work or tempfile.mkdtemp(prefix="loader_bench_online_"))
    try:
        t = time.perf_counter()
        n_prompts = args.images // args.images_per_prompt
        folder, ckpt = write_tiny_online_pairs(work, n_prompts, args.images_per_prompt, args.parts)
        gen_s = time.perf_counter() - t
        common = dict(batch_size=args.batch, val_prompts=0.05, val_checkpoints=0, in_memory=False, num_workers=0,
                      chunk_rows=args.chunk_rows, stats_prompts=256, knn_max_queries=16)
        stored = PairsDataModule(str(folder), **common)
        stored.setup()
        online = PairsDataModule(str(folder), conditionings="online", text_encoders=str(ckpt), text_device="cpu",
                                 text_batch_size=args.batch, online_cache_gb=0.0, **common)
        online.setup()
        drop_cache(folder)
        s_rate, s_n = chunked(stored, args.max_seconds)
        o_rate, o_n = online_epoch(online, args.max_seconds)
        # the same targets: a batch of training rows both ways
        rows = stored.splits["train"][: args.batch]
        got = online.source.online(stored.pairs.prompt_id[rows])[0].float().numpy()
        diff = float(np.abs(got - stored.pairs.cond(stored.pairs.prompt_id[rows]).astype(np.float32)).max())
        stored.teardown()
        online.teardown()
        full = full_encoders_cpu(args.full_encoder_prompts) if args.full_encoder_prompts else None
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    lines = [
        *command("loader_bench.py", argv),
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared), 1-minute load {os.getloadavg()[0]:.1f}, torch on "
        f"1 thread; tiny preset: {args.images} images, {n_prompts} prompts (all new within the epoch), conditioning "
        f"[77, 96] + [64] fp16, embedding 1024; written in {gen_s:.0f} s; batch {args.batch}; page cache dropped first.",
        "", "| targets | samples/s | samples timed | vs stored |", "| --- | ---: | ---: | ---: |",
        f"| stored, from disk (chunk-shuffled, 0 workers) | {s_rate:,.0f} | {s_n:,} | 1.0x |",
        f"| online, tiny text encoders on CPU | {o_rate:,.0f} | {o_n:,} | {o_rate / s_rate:.2f}x |", "",
        f"Online vs stored targets of {len(rows)} training rows: max |difference| {diff:.2e} (fp16 storage).",
    ]
    if full is not None:
        lines.append(f"Full-size SDXL text encoders (CLIP-L + bigG, fp32, this CPU, batch {args.full_encoder_prompts}): "
                     f"{full:.2f} prompts/s, i.e. {full:.2f} samples/s at one image per prompt: online targets at full "
                     "size need the encoders on a GPU (the training device).")
    text = "\n".join(lines)
    emit(text, args.out)
    return 0


def disk_read(folder: Path, block: int = 8 << 20) -> float:
    """MB/s of reading the pairs files start to end in `block`-sized reads, page cache dropped first:
    what this disk gives one sequential reader (the ceiling of any loader of stored conditionings)."""
    drop_cache(folder)
    buf, total, start = bytearray(block), 0, time.perf_counter()
    for f in sorted(folder.glob("*.h5")):
        fd = os.open(f, os.O_RDONLY)
        try:
            while n := os.readv(fd, [buf]):
                total += n
        finally:
            os.close(fd)
    return total / (time.perf_counter() - start) / 1e6


def open_cold(folder: Path) -> tuple[float, int]:
    """Seconds to open the folder with the page cache dropped (`Pairs` reads every image column and the
    prompt tables into RAM: all that the online loader reads from disk), and its number of images."""
    drop_cache(folder)
    start = time.perf_counter()
    with Pairs(folder) as p:
        return time.perf_counter() - start, len(p)


def tokenize_rate(texts: list[str], batch: int) -> float:
    """Prompts/s through both SDXL tokenizers (`luna.models.sdxl._encode`'s first step) on this CPU."""
    from luna.models.tokenizers import sdxl_tokenizers

    toks = sdxl_tokenizers()
    for tok in toks:
        tok(texts[:8], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        for tok in toks:
            tok(texts[i : i + batch], padding="max_length", max_length=tok.model_max_length, truncation=True,
                return_tensors="pt")
    return len(texts) / (time.perf_counter() - start)


def encode_rate(dm: PairsDataModule, prompt_ids: np.ndarray, batch: int) -> float:
    """Prompts/s of the online targets (the text encoders on the stored token ids) of new prompts, where `dm` runs them."""
    online = dm.source.online
    online._cache.clear()
    online.cache_rows = 0  # every prompt new: no cache hits
    start = time.perf_counter()
    for i in range(0, len(prompt_ids), batch):
        online(prompt_ids[i : i + batch])
    return len(prompt_ids) / (time.perf_counter() - start)


TODAY = 573  # samples/s of the row-by-row reader the issue measured (issue 16)


def tokenize_once(dm: PairsDataModule, prompt_ids: np.ndarray) -> tuple[float, float, int, int]:
    """(seconds to tokenize `prompt_ids` into an empty token-ids store, seconds to read them back from it at
    a later setup, prompts tokenized, bytes stored): the one-off cost of stored token ids."""
    online = dm.source.online
    for fp in online.tokenizers:  # fresh tokenizers: their caches of words cold, as in a first run
        online.tokenizers[fp] = online.conditioner.tokenizers(fp, online.hints.get(fp, []))
    shutil.rmtree(dm.path / TOKEN_IDS_DIR, ignore_errors=True)
    before = online.tokenized
    start = time.perf_counter()
    online.load_token_ids(prompt_ids, progress=False)
    once = time.perf_counter() - start
    start = time.perf_counter()
    online.load_token_ids(prompt_ids, progress=False)
    read = time.perf_counter() - start
    size = sum(f.stat().st_size for f in (dm.path / TOKEN_IDS_DIR).rglob("*.h5"))
    return once, read, online.tokenized - before, size


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--images-per-prompt", type=int, default=1)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--chunk-rows", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--parts", type=int, default=8)
    ap.add_argument("--max-seconds", type=float, default=30.0)
    ap.add_argument("--encode-prompts", type=int, default=1024, help="prompts timed through the tokenizers and the "
                    "tiny text encoders (the online targets' cost, reported apart from the loader)")
    ap.add_argument("--work", default=None, help="scratch folder (kept; default: a temporary one, removed)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--online", action="store_true", help="stored vs online targets at tiny size (see above)")
    ap.add_argument("--full-encoder-prompts", type=int, default=0, help="also time N prompts through the "
                    "full-size text encoders on this CPU")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.online:
        return main_online(args, argv)
    from luna.models import tiny
    from luna.models.conditioner import TextConditioner

    work = Path(args.work or tempfile.mkdtemp(prefix="loader_bench_"))
    t = time.perf_counter()
    ckpt = work / "tiny" / "ckpt.safetensors"
    if not ckpt.exists():  # the online loader's text encoders (its fingerprint is the pairs')
        written = tiny.write_checkpoints(work / "tiny-write", n=1)[0].single_file
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(written, ckpt)
    fp = TextConditioner("reference", reference=str(ckpt)).fingerprint("", "")
    folder = work / f"pairs-{args.images}-{args.images_per_prompt}"
    if not (folder / "complete").exists() or (folder / "complete").read_text() != fp:
        shutil.rmtree(folder, ignore_errors=True)
        write_synthetic_pairs(folder, args.images, args.images // args.images_per_prompt, 1024, text_dims=(768, 1280),
                              pooled_dim=1280, n_clusters=64, parts=args.parts, prompt_order="blocks", te_fingerprint=fp)
        (folder / "complete").write_text(fp)
    gen_s = time.perf_counter() - t
    size = sum(f.stat().st_size for f in folder.glob("*.h5"))
    per = (77 * 2048 + 1280) * 2 / args.images_per_prompt  # conditioning bytes per sample
    rows, enc = [], {}
    load = lambda: os.getloadavg()[0]  # noqa: E731
    try:
        disks = [(disk_read(folder), load())]  # shared disk: read before, between and after the loaders
        open_s, n_images = open_cold(folder)
        common = dict(batch_size=args.batch, val_prompts=0.05, val_checkpoints=0, chunk_rows=args.chunk_rows,
                      stats_prompts=256, knn_max_queries=16)
        dm = PairsDataModule(str(folder), num_workers=0, in_memory=False, **common)
        dm.setup()
        train = dm.splits["train"]
        drop_cache(folder)
        base, n = row_by_row(folder, train, args.batch, args.max_seconds, seed=0)
        rows.append(("stored: row-by-row (before), 0 workers", base, n, load(), True))
        for w in args.workers:
            dmw = PairsDataModule(str(folder), num_workers=w, in_memory=False, **common)
            dmw.setup()
            drop_cache(folder)
            rate, n = chunked(dmw, args.max_seconds)
            rows.append((f"stored: chunk-shuffled runs, {w} workers", rate, n, load(), True))
            rate, n = chunked(dmw, args.max_seconds)
            rows.append((f"stored: chunk-shuffled runs, {w} workers, 2nd epoch (page cache warm)", rate, n, load(), True))
            dmw.teardown()
        disks.append((disk_read(folder), load()))
        shutil.rmtree(folder / TOKEN_IDS_DIR, ignore_errors=True)  # the first online setup tokenizes every prompt
        for w in args.workers:
            dmo = PairsDataModule(str(folder), num_workers=w, conditionings="online", text_encoders=str(ckpt),
                                  text_device="cpu", text_batch_size=args.batch, online_cache_gb=0.0, **common)
            dmo.setup()
            drop_cache(folder)
            rate, n = chunked(dmo, args.max_seconds)  # the loader alone: the encoders run after it, on the device
            rows.append((f"online: image embeddings + prompt ids + stored token ids, {w} workers", rate, n, load(), False))
            if not enc:
                used = np.unique(dm.pairs.prompt_id)
                enc["once"] = (*tokenize_once(dmo, used), load())
                pids = np.unique(dm.pairs.prompt_id[train])[: args.encode_prompts]
                enc["tokenize"] = (tokenize_rate([dm.pairs.prompt_text[p] for p in pids], args.batch), load())
                enc["tiny"] = (encode_rate(dmo, pids, args.batch), load())
            dmo.teardown()
        dm.teardown()
        disks.append((disk_read(folder), load()))
        if args.full_encoder_prompts:
            enc["full"] = (full_encoders_cpu(args.full_encoder_prompts), load())
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    lines = [
        *command("loader_bench.py", argv),
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared), torch on 1 thread; {args.images} images, "
        f"{args.images // args.images_per_prompt} prompts, conditioning [77, 2048] + [1280] fp16 "
        f"({per / 1e3:.0f} KB a sample), image embedding 1024 fp16; {size / 1e9:.2f} GB in {args.parts} parts (written in "
        f"{gen_s:.0f} s); batch {args.batch}, chunk_rows {args.chunk_rows}; page cache dropped (posix_fadvise "
        "DONTNEED) before each first epoch. Load: the 1-minute load average after each measurement.", "",
        "Disk: the pairs files read start to end in 8 MB reads, page cache dropped, before, between and after the "
        f"loaders: **{' / '.join(f'{d:,.0f}' for d, _ in disks)} MB/s** (load {' / '.join(f'{ld:.1f}' for _, ld in disks)}),"
        f" i.e. at most {max(d for d, _ in disks) * 1e6 / per:,.0f} samples/s of stored conditionings; 10x today "
        f"({10 * TODAY:,} samples/s) needs {10 * TODAY * per / 1e6:,.0f} MB/s.",
        f"Opening the folder from disk (`Pairs`: image columns and prompt tables into RAM, all the online loader "
        f"reads from disk): {open_s:.2f} s for {n_images:,} images ({n_images / open_s:,.0f} images/s).", "",
        "| loader | samples/s | samples timed | load | vs row-by-row | vs today (573) | MB/s from disk |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, rate, n, ld, stored in rows:
        mb = f"{rate * per / 1e6:,.0f}" if stored else "0 (RAM)"
        lines.append(f"| {name} | {rate:,.0f} | {n:,} | {ld:.1f} | {rate / base:.1f}x | {rate / TODAY:.1f}x | {mb} |")
    lines += ["", "Online targets' cost, apart from the loader (prompts/s = samples/s at one image per prompt; "
              "the loader rows above do not include it):", "",
              "| step | where it runs in training | prompts/s on this CPU | load |", "| --- | --- | ---: | ---: |",
              f"| tokenizing every prompt once into the token-ids store ({enc['once'][2]:,} prompts in "
              f"{enc['once'][0]:.2f} s = {enc['once'][0] / max(enc['once'][2], 1) * 1e6:.0f} µs a prompt; "
              f"{enc['once'][3] / max(enc['once'][2], 1):.0f} B a prompt on disk) | the first setup on a pairs "
              f"folder, once | {enc['once'][2] / enc['once'][0]:,.0f} | {enc['once'][4]:.1f} |",
              f"| reading the store back at a later setup ({enc['once'][2]:,} prompts in {enc['once'][1]:.2f} s; plus "
              "~0.1 s a tokenizer pair to fingerprint it) | every later setup | "
              f"{enc['once'][2] / enc['once'][1]:,.0f} | {enc['once'][4]:.1f} |",
              f"| both SDXL tokenizers (transformers CLIPTokenizer), batch {args.batch}: what the store saves per "
              f"sample and epoch | nowhere in training now | {enc['tokenize'][0]:,.0f} | {enc['tokenize'][1]:.1f} |",
              f"| tiny text encoders ([77, 96] + [64]) on the stored ids, batch {args.batch} | the training device | "
              f"{enc['tiny'][0]:,.0f} | {enc['tiny'][1]:.1f} |"]
    if "full" in enc:
        lines.append(f"| tokenizers + full-size SDXL text encoders (CLIP-L + bigG, random weights, fp32), batch "
                     f"{args.full_encoder_prompts} | the training device | {enc['full'][0]:.2f} | {enc['full'][1]:.1f} |")
    lines += ["", "On a GPU the text encoders are part of the training step: `benchmarks/gpu_all.py` (projector "
              "section) measures them at full size on the device against the step and the loaders."]
    text = "\n".join(lines)
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
