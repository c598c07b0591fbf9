"""The detailer inside real ComfyUI: N crops batched vs one by one, and the node's overhead over the runtime.

    python benchmarks/comfyui_bench.py                  # tiny preset through ComfyUI's own loader, CPU
    python benchmarks/comfyui_bench.py --crops 8 --repeats 3 --working 128

Needs ../shared/vendor/ComfyUI (the project's vendored copy, as the tests use it). Arms, all on the same
canvas, detections, scaffold and conditioning, measured in the same run:

1. batching: the Luna Semantic Detailer node with batch_size=N (one comfy.sample call for N crops)
   vs batch_size=1 (N calls): the ratio is the speed-up of true batches through ComfyUI's sampler
   (target >= 1.5x on GPU, DESIGN.md §5; on CPU the tiny UNet's batches gain less).
2. node overhead: the node (ComfyUI conditioning in, IMAGE out, progress bar, source building)
   vs calling lsd_runtime.detailer.detail with lsd_runtime.denoiser.ComfyDenoiser directly
   (target <= 5%). Arms alternate; ratios are paired per repeat and the median is reported, in
   process CPU time (one thread: robust to other jobs on the machine) and in wall time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "comfyui"))  # comfy_env / comfy_tiny: real ComfyUI + the tiny model config


def _detections(n: int):
    """n non-overlapping boxes on a grid (so one batch holds them all)."""
    from lsd_runtime.detect import Detection

    side = int(np.ceil(np.sqrt(n)))
    cell = 1.0 / side
    out = []
    for i in range(n):
        r, c = divmod(i, side)
        out.append(Detection((c * cell + 0.2 * cell, r * cell + 0.2 * cell, c * cell + 0.6 * cell,
                              r * cell + 0.6 * cell), None, "face", 1.0))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--crops", type=int, default=8)
    ap.add_argument("--working", type=int, default=128, help="crop working size (px)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="print where the node's time goes (cProfile) and exit")
    ap.add_argument("--work", default=None, help="folder for the ComfyUI copy (default: a temporary one)")
    args = ap.parse_args(argv)

    import comfy_env
    import comfy_tiny

    if comfy_env.VENDOR is None:
        print(comfy_env.SKIP_REASON, file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="luna-comfy-bench-"))
    t0 = time.perf_counter()
    state = comfy_env.start(work)
    ckpt = state["base"] / "models" / "checkpoints" / "tiny-base-0.safetensors"
    if not ckpt.exists():
        comfy_tiny.write_tiny_checkpoint(ckpt)
    nodes = state["nodes"]
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(ckpt.name)[:3]
    print(f"ComfyUI started and the tiny checkpoint loaded in {time.perf_counter() - t0:.1f} s")
    lsd = next(m for n, m in sys.modules.items() if n.endswith(f"{comfy_env.PACKAGE_NAME}.lsd_nodes"))
    sources = next(m for n, m in sys.modules.items() if n.endswith(f"{comfy_env.PACKAGE_NAME}.sources"))

    from lsd_runtime.denoiser import ComfyDenoiser
    from lsd_runtime.detailer import DetailSettings, detail
    from lsd_runtime.scaffold import NoiseScaffold

    size = args.working * int(np.ceil(np.sqrt(args.crops))) * 2
    rng = np.random.default_rng(0)
    canvas = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    image = torch.from_numpy(canvas.astype(np.float32) / 255.0)[None]
    dets = _detections(args.crops)
    scaffold = NoiseScaffold(1, (size, size))
    pos = nodes.CLIPTextEncode().encode(clip, "a portrait")[0]
    neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    node = lsd.LunaSemanticDetailer()
    det_in = lsd.LunaDetections((size, size), [dets])
    pad, feather = 0.25, 8.0

    def run_node(batch: int):
        with torch.inference_mode():
            return node.detail(model, vae, pos, neg, image, scaffold, args.steps, 3.0, "euler", "normal", 0.5, batch,
                               det_in, args.working, pad, feather)[0]

    def run_runtime(batch: int):
        settings = DetailSettings(working_size=args.working, pad=pad, feather=feather, batch_size=batch,
                                  min_crop=min(64, args.working))
        den = ComfyDenoiser(model, vae, neg, steps=args.steps, cfg=3.0, sampler_name="euler", scheduler="normal",
                            denoise=0.5)
        with torch.inference_mode():
            return detail(canvas.copy(), dets, scaffold, sources.ComfyText(pos), den, settings, scaffold.seed)[0]

    # warm-up: first calls load the model into ComfyUI's model management and fill caches
    run_node(args.crops)
    run_runtime(args.crops)
    if args.profile:
        import cProfile
        import pstats

        for name, fn in (("node", lambda: run_node(args.crops)), ("runtime", lambda: run_runtime(args.crops))):
            prof = cProfile.Profile()
            prof.runcall(fn)
            print(f"--- {name}")
            pstats.Stats(prof).sort_stats("tottime").print_stats(12)
        return 0
    arms = {"node_batched": lambda: run_node(args.crops), "node_single": lambda: run_node(1),
            "runtime_batched": lambda: run_runtime(args.crops)}
    wall = {k: [] for k in arms}
    cpu = {k: [] for k in arms}  # process CPU time: on one thread, robust to other jobs sharing the cores
    for _ in range(args.repeats):
        for arm, fn in arms.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            cpu[arm].append(time.process_time() - c)
            wall[arm].append(time.perf_counter() - w)
    out_b, out_s = run_node(args.crops), run_node(1)
    diff = float((out_b - out_s).abs().max()) * 255
    med = {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in arms}
    # paired per repeat (the arms of one repeat ran back to back), then the median
    speedup = statistics.median(s_ / b_ for s_, b_ in zip(cpu["node_single"], cpu["node_batched"]))
    speedup_wall = statistics.median(s_ / b_ for s_, b_ in zip(wall["node_single"], wall["node_batched"]))
    overhead = statistics.median(n / r for n, r in zip(cpu["node_batched"], cpu["runtime_batched"])) - 1.0
    overhead_wall = statistics.median(n / r for n, r in zip(wall["node_batched"], wall["runtime_batched"])) - 1.0
    print(f"\n{args.crops} crops at {args.working} px, {args.steps} steps at denoise 0.5, canvas {size} px, "
          f"torch threads {args.threads}, {args.repeats} repeats (median)")
    print("| arm | wall s (median) | CPU s (median) | CPU s, all runs |\n| --- | --- | --- | --- |")
    for k in arms:
        print(f"| {k} | {med[k][0]:.3f} | {med[k][1]:.3f} | {', '.join(f'{x:.3f}' for x in cpu[k])} |")
    print(f"\nbatched vs one by one through ComfyUI's sampler: {speedup:.2f}x CPU time, {speedup_wall:.2f}x wall "
          f"(target >= 1.5x on GPU); outputs differ by at most {diff:.2f}/255")
    print(f"node overhead vs the runtime called directly: {overhead * 100:+.1f}% CPU time, "
          f"{overhead_wall * 100:+.1f}% wall (target <= 5%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
