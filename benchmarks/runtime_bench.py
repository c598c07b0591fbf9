"""LSD runtime benchmark: N crops batched vs one by one, and peak memory at 4K-scale settings.

    python benchmarks/runtime_bench.py                       # tiny preset, CPU (a couple of minutes)
    python benchmarks/runtime_bench.py --preset sdxl-random  # real-size SDXL UNet/VAE, random weights (GPU)

Both arms run the same detailer (`lsd_runtime.detailer.detail`) on the same canvas, detections,
scaffold and conditioning; only `batch_size` differs, so the ratio is the batching speed-up
(target >= 1.5x on GPU, DESIGN.md §5). The baseline (one by one) is measured in the same run.
The 4K part refines crops of a 4096 px canvas at the working size (1024 for SDXL) with the
4 x 512 x 512 scaffold, and reports peak memory (CUDA allocator peak on GPU, process max RSS on CPU).
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lsd_runtime.conditioning import CondRow  # noqa: E402
from lsd_runtime.detailer import DetailSettings, detail  # noqa: E402
from lsd_runtime.detect import Detection  # noqa: E402
from lsd_runtime.sampler import Sampler, SamplerSettings, auto_batch_size, sampler_denoiser  # noqa: E402
from lsd_runtime.scaffold import NoiseScaffold  # noqa: E402


class RandomText:
    """A fixed random conditioning row of the UNet's widths (no text encoders needed)."""

    name = "text"

    def __init__(self, sampler: Sampler, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.cond = torch.randn(77, sampler.cross_attention_dim, generator=g)
        self.pooled = torch.randn(sampler.pooled_dim, generator=g)
        self.negative_row = (torch.zeros_like(self.cond), torch.zeros_like(self.pooled))

    def rows(self, crops):
        return [CondRow(self.cond, self.pooled, "text", 0.0) for _ in crops]


def build_sampler(preset: str, device: str, dtype: torch.dtype) -> Sampler:
    if preset == "tiny":
        from luna.models.tiny import tiny_scheduler, tiny_unet, tiny_vae

        unet, vae, sched = tiny_unet(0), tiny_vae(), tiny_scheduler()
    else:  # the real SDXL architecture from the configs kept in the repo, random weights
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

        from luna.models.configs import SDXL_BASE

        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL_BASE / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SDXL_BASE / "vae"))
        sched = EulerDiscreteScheduler.from_pretrained(SDXL_BASE, subfolder="scheduler")
        with torch.no_grad():  # random weights: keep activations in range so fp16 stays finite
            for p in unet.parameters():
                p.mul_(0.5)
    unet.to(device, dtype)
    vae.to(device)
    return Sampler(unet, vae, sched.config)


def grid_detections(n: int) -> list[Detection]:
    """n small, mutually non-overlapping face-sized boxes on a grid."""
    side = int(np.ceil(np.sqrt(n)))
    cell = 1.0 / side
    out = []
    for i in range(n):
        r, c = divmod(i, side)
        out.append(Detection(box=(c * cell + 0.3 * cell, r * cell + 0.3 * cell, c * cell + 0.6 * cell,
                                  r * cell + 0.6 * cell), label="face"))
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_detail(canvas, dets, scaffold, source, denoise, settings, device):
    sync(device)
    t, c = time.perf_counter(), time.process_time()
    out, crops, _ = detail(canvas, dets, scaffold, source, denoise, settings)
    sync(device)
    run_detail.cpu = time.process_time() - c  # CPU seconds: less sensitive to a shared machine than wall time
    return time.perf_counter() - t, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=["tiny", "sdxl-random"], default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--crops", type=int, default=8)
    ap.add_argument("--working", type=int, default=None, help="working size (default 128 tiny, 1024 sdxl)")
    ap.add_argument("--canvas", type=int, default=None, help="canvas side for the ratio (default 1024 tiny, 4096 sdxl)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--strength", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-4k", action="store_true", help="skip the 4K-scale peak-memory part")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    tiny = args.preset == "tiny"
    dtype = torch.float32 if args.device == "cpu" else (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    working = args.working or (128 if tiny else 1024)
    canvas_side = args.canvas or (1024 if tiny else 4096)

    sampler = build_sampler(args.preset, args.device, dtype)
    source = RandomText(sampler)
    ss = SamplerSettings(steps=args.steps, strength=args.strength, cfg=5.0)
    denoise = sampler_denoiser(sampler, ss, source.negative_row)
    rng = np.random.default_rng(0)
    canvas = rng.integers(0, 256, (canvas_side, canvas_side, 3), dtype=np.uint8)
    scaffold = NoiseScaffold(0, (canvas_side, canvas_side))
    dets = grid_detections(args.crops)
    common = dict(working_size=working, min_crop=64)
    batch = max(1, min(args.crops, auto_batch_size(sampler, working, True, cap=args.crops, cpu_default=args.crops)))

    run_detail(canvas, dets[:1], scaffold, source, denoise, DetailSettings(batch_size=1, **common), args.device)  # warm-up
    one, many, one_cpu, many_cpu = [], [], [], []
    for _ in range(args.repeats):
        t1, out1 = run_detail(canvas, dets, scaffold, source, denoise, DetailSettings(batch_size=1, **common), args.device)
        one_cpu.append(run_detail.cpu)
        tb, outb = run_detail(canvas, dets, scaffold, source, denoise, DetailSettings(batch_size=batch, **common),
                              args.device)
        many_cpu.append(run_detail.cpu)
        one.append(t1)
        many.append(tb)
    diff = int(np.abs(out1.astype(int) - outb.astype(int)).max())
    print(f"device={args.device} dtype={str(dtype).removeprefix('torch.')} preset={args.preset} "
          f"canvas={canvas_side} crops={args.crops} working={working} steps={args.steps} strength={args.strength}")
    print(f"one-by-one: {min(one):.3f} s ({min(one) / args.crops:.3f} s/crop)")
    print(f"batched (batch_size={batch}): {min(many):.3f} s ({min(many) / args.crops:.3f} s/crop)")
    print(f"speed-up batched vs one-by-one: {min(one) / min(many):.2f}x wall, {min(one_cpu) / min(many_cpu):.2f}x CPU time"
          f"  (max |batched - one-by-one| = {diff} / 255)")

    if not args.skip_4k:
        side, w4 = 4096, (args.working or 1024)
        big = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        scaffold4 = NoiseScaffold(0, (side, side))
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        b4 = max(1, auto_batch_size(sampler, w4, True, cap=4, cpu_default=4))
        t4, _ = run_detail(big, grid_detections(4), scaffold4, source, denoise,
                           DetailSettings(batch_size=b4, working_size=w4, min_crop=64), args.device)
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"4K-scale: canvas {side}x{side}, scaffold {tuple(scaffold4.noise.shape)}, 4 crops at {w4} px, "
              f"batch_size={b4}: {t4:.2f} s")
        if args.device.startswith("cuda"):
            print(f"peak GPU memory (allocator): {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        print(f"peak process RSS: {rss1 / 2**20:.2f} GiB (before the 4K part: {rss0 / 2**20:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
