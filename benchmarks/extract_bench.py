"""Extraction throughput against the bare vision forward, text-encoder calls, bytes per sample.

    python benchmarks/extract_bench.py                          # tiny preset, CPU (about a minute)
    python benchmarks/extract_bench.py --arch ViT-H-14 --images 4096 --shards 8 --batch-size 128 --workers 8
    python benchmarks/extract_bench.py --arch ViT-L-14-336 --images 4096 --shards 8 --batch-size 128 --workers 8

Shards are written with the factory's own writer (factory/shards.py), PNG images at `--size`, prompts
repeating over images and two text-encoder families. The baseline, measured in the same run, is
the vision tower's forward alone over pixels already decoded and preprocessed (same batch size,
same autocast). End to end is `extract()` as `luna extract` runs it: decoding in worker processes,
the forward, deduplicated text encoding, HDF5 writing. Real architectures use random weights (no
download); the ratio, not the weights, is what is measured.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_text_encoders(folder: Path, family: str) -> Path:
    """A tiny SDXL diffusers folder with only what extraction reads (index, UNet config, text encoders)."""
    from luna.models.configs import SDXL_TINY
    from luna.models.tiny import tiny_text_encoders

    (folder / "unet").mkdir(parents=True, exist_ok=True)
    shutil.copy(SDXL_TINY / "model_index.json", folder / "model_index.json")
    shutil.copy(SDXL_TINY / "unet" / "config.json", folder / "unet" / "config.json")
    te1, te2 = tiny_text_encoders(family)
    te1.save_pretrained(folder / "text_encoder")
    te2.save_pretrained(folder / "text_encoder_2")
    return folder


def image_png(rng: np.random.Generator, size: int) -> bytes:
    from PIL import Image

    # smooth colour field + mild noise: decodes like a generated image, not like pure noise
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(6 * x + rng.uniform(0, 6)), np.cos(5 * y + rng.uniform(0, 6)), x * y], -1)
    img = np.clip((base * 0.5 + 0.5) * 255 + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(folder: Path, ckpts: list[dict], n_images: int, n_shards: int, n_prompts: int, size: int) -> None:
    """The benchmark's input shards, one process per shard (PNG encoding is the slow part; not measured)."""
    from concurrent.futures import ProcessPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    procs = max(1, min(n_shards, (os.cpu_count() or 1)))
    args = [(folder, ckpts, n_images, n_shards, n_prompts, size, s) for s in range(n_shards)]
    if procs == 1:
        for a in args:
            _write_shard(*a)
        return
    with ProcessPoolExecutor(procs) as pool:
        list(pool.map(_write_shard, *zip(*args)))


def _write_shard(folder: Path, ckpts: list[dict], n_images: int, n_shards: int, n_prompts: int, size: int, s: int) -> None:
    from factory import shards

    rng = np.random.default_rng(s)
    per = -(-n_images // n_shards)
    samples = []
    for i in range(s * per, min(n_images, (s + 1) * per)):
        ck = ckpts[i % len(ckpts)]
        prompt = f"portrait {i % n_prompts}, blue eyes, silk"
        meta = {"key": f"k{i:07d}", "prompt": prompt, "negative": "", "campaign": "bench", "category": "eyes",
                "checkpoint": ck["name"], "checkpoint_fingerprint": ck["name"], "te_fingerprint": ck["te"],
                "seed": i, "format_version": shards.FORMAT_VERSION}
        samples.append(shards.ShardSample(f"k{i:07d}", image_png(rng, size), "png", prompt, meta))
    shards.write_shard(folder / f"{shards.shard_name('bench', 'pc1', 'w0', s)}.tar", samples,
                       {"count": len(samples), "successes": len(samples)})


def random_tower(arch: str, device: str):
    from luna.models.vision import TINY_NAME, VisionTower, create_open_clip, load_vision

    if arch in ("tiny", TINY_NAME):
        return load_vision("tiny", device=device)
    model = create_open_clip(arch).to(device).eval()
    dim = int(getattr(model.visual, "output_dim", 0) or model.visual.proj.shape[1])
    return VisionTower(model_id=f"open_clip:{arch}", dim=dim, preprocess=model.luna_preprocess, model=model)


def bare_forward(tower, pixels: torch.Tensor, batch: int, device: str, tokens: bool) -> float:
    """Images/s of the tower's forward alone on pre-decoded, preprocessed pixels (host memory, like the loader gives)."""
    from extraction.image import ImageEncoder

    enc = ImageEncoder(tower, device, tokens=tokens)
    enc(pixels[:batch])  # warm-up (kernels, allocator)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(0, len(pixels), batch):
        enc(pixels[i : i + batch])  # returns numpy: includes the device->host copy, as extraction does
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return len(pixels) / (time.perf_counter() - t)


def loader_only(folder: Path, preprocess, batch: int, workers: int) -> float:
    """Images/s of reading + decoding + preprocessing alone (the worker processes, no model)."""
    from extraction.reader import Batch, stream_batches

    t = time.perf_counter()
    n = sum(len(it.meta) for it in stream_batches(sorted(folder.glob("*.tar")), preprocess, batch, workers)
            if isinstance(it, Batch))
    return n / (time.perf_counter() - t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="tiny", help="tiny | ViT-B-32 | ViT-H-14 | ViT-L-14-336 | ViT-bigG-14 ...")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=48, help="distinct prompt texts (x 2 text-encoder families)")
    ap.add_argument("--size", type=int, default=336, help="image side in the shards (the factory's default)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", default="2", help="decoding processes, or auto (extraction's own rule for the device)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tokens", action="store_true")
    args = ap.parse_args(argv)

    from omegaconf import OmegaConf

    import extraction.extract as ex
    from extraction.cli_info import pairs_info
    from extraction.reader import decode_image
    from factory.shards import iter_samples
    from luna.models.fingerprint import te_fingerprint
    from luna.settings import resolve_device

    device = resolve_device(args.device)
    from extraction.reader import decode_workers

    args.workers = decode_workers(args.workers, device)
    torch.manual_seed(0)
    root = Path(tempfile.mkdtemp(prefix="extract_bench-"))
    try:
        ckpts = []
        for i, fam in enumerate(("base", "pony")):
            p = write_text_encoders(root / "ckpts" / f"tiny-{fam}-{i}", fam)
            ckpts.append({"name": p.name, "te": te_fingerprint(p)})
        t = time.perf_counter()
        write_shards(root / "shards", ckpts, args.images, args.shards, args.prompts, args.size)
        print(f"wrote {args.images} images in {args.shards} shards ({time.perf_counter() - t:.1f} s)")

        tower = random_tower(args.arch, device)
        ex.load_tower = lambda name, weights, dev: tower  # random weights for real architectures, no file needed
        pixels = torch.stack([tower.preprocess(decode_image(f)) for tar in sorted((root / "shards").glob("*.tar"))
                              for _, f in iter_samples(tar)])
        bare = bare_forward(tower, pixels, args.batch_size, device, args.tokens)
        loader = loader_only(root / "shards", tower.preprocess, args.batch_size, args.workers)

        cfg = OmegaConf.create({
            "shards": str(root / "shards"), "out": str(root / "pairs"), "vision": {"name": args.arch},
            "text": {"mode": "per_checkpoint", "batch_size": 64, "dtype": "auto", "keep_loaded": 4},
            "checkpoints": {"dirs": [str(root / "ckpts")]}, "device": device, "dtype": "float16",
            "tokens": args.tokens, "batch_size": args.batch_size, "workers": args.workers, "progress": False,
        })
        t = time.perf_counter()
        result = ex.extract(cfg)
        e2e_s = time.perf_counter() - t
        e2e = result.images / e2e_s
        info = pairs_info(root / "pairs")
        unique = len({(f"portrait {i % args.prompts}, blue eyes, silk", ckpts[i % 2]["te"]) for i in range(args.images)})

        print(f"\nextraction benchmark: arch={args.arch} device={device} images={args.images} size={args.size} "
              f"batch={args.batch_size} workers={args.workers} tokens={args.tokens} torch_threads={torch.get_num_threads()}")
        print(f"  bare vision forward (pre-decoded tensors): {bare:10.1f} images/s")
        print(f"  reader alone (decode + preprocess):        {loader:10.1f} images/s  ({args.workers} worker processes)")
        print(f"  end to end (luna extract path):            {e2e:10.1f} images/s  ({e2e_s:.2f} s)")
        print(f"  ratio end-to-end / bare forward:           {e2e / bare:10.3f}   (target >= 0.9)")
        print(f"  ratio end-to-end / min(bare, reader):      {e2e / min(bare, loader):10.3f}   (the slower side bounds it)")
        img_s = result.seconds.get("vision", 0) + result.seconds.get("wait_data", 0)
        if img_s > 0:  # the image side alone: the end-to-end time less the text encoders (loads) and the writer
            print(f"  image side (vision + waiting for data):    {result.images / img_s:10.1f} images/s  "
                  f"({img_s:.2f} s; ratio to the bare forward {result.images / img_s / bare:.3f})")
        print(f"  time split (s):                            {result.seconds}")
        print(f"  text-encoder prompts encoded:              {result.text['prompts_encoded']:10d}")
        print(f"  unique (prompt, text encoder) pairs:       {unique:10d}   (target: equal)")
        print(f"  text-encoder forward batches / loads:      {result.text['forward_batches']:10d} / "
              f"{sum(result.text['encoder_loads'].values())}")
        print(f"  bytes per sample on disk:                  {info['bytes_per_sample']:10.0f}   "
              f"({info['bytes']} bytes, {info['images']} images, {info['unique_prompts']} prompts, fp16)")
        return 0 if result.text["prompts_encoded"] == unique else 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
