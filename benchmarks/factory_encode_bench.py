"""Factory actor with image encoding off the critical path: an instant and a 150 ms/image generator.

    python benchmarks/factory_encode_bench.py [--images 64] [--size 336] [--threads 2] [--format png] [--png-level N]
                                              [--repeats 3]

No model: the generator returns 336 px images at once (`instant`: only the factory's own costs
remain) or after sleeping 150 ms per image (`sleep`: a GPU's generation time, CPU idle). The actor
body (`factory.worker.FactoryWorker.run`, quality gate + encoding included) runs each unit with
`image.encode_threads` 0 (gate and encoding in line after each batch: the actor before this
change) and `--threads` (on a pool, beside the next batch's generation). Baselines, same run:
  encode floor  the gate + encoding of the same images on the same number of threads, nothing else
                (instant: actor images/s / floor, target >= 0.9)
  sleep only    1 / 0.150 s = 6.67 images/s (sleep: actor images/s / that, target >= 0.95)
Images are smooth gradients with mild noise, so PNG compresses them like rendered images
(white noise would be slower and bigger than anything a model draws).
On shared cores one sample of a fraction of a second swings by 10-40% with the neighbours' load, so the
floor and the four actor rows are measured `--repeats` times, interleaved (floor, then the actor rows,
then again); the table shows each row's median, and each ratio is the median of the per-round ratios
(an actor row over the floor measured in the same round), with their range.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.report import emit  # noqa: E402

from factory import quality as qgate  # noqa: E402
from factory.shards import encode_image  # noqa: E402
from factory.worker import FactoryWorker  # noqa: E402


def picture(seed: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.stack([np.sin(6 * x + seed) * 0.5 + 0.5, np.cos(4 * y - seed) * 0.5 + 0.5, (x + y) / 2], -1)
    return np.clip(base * 0.85 + rng.random((size, size, 3), dtype=np.float32) * 0.15, 0, 1)


class Generator:
    def __init__(self, size: int, sleep_s: float):
        self.pool = [picture(i, size) for i in range(16)]
        self.sleep_s = sleep_s

    def load(self, path):
        pass

    def generate(self, prompts, negatives, seeds, sampler):
        if self.sleep_s:
            time.sleep(self.sleep_s * len(seeds))
        return [self.pool[int(s) % 16].copy() for s in seeds]


def actor_rate(gen: Generator, args, threads: int) -> tuple[float, dict]:
    task = {"unit_id": "u", "checkpoint": {"name": "c", "paths": {"n": "/m"}},
            "samples": [{"key": f"k{i}", "prompt": f"p{i}", "negative": "", "seed": i} for i in range(args.images)],
            "sampler": {"steps": 1, "cfg": 1.0, "scheduler": "euler", "width": args.size, "height": args.size,
                        "batch_size": args.batch},
            "image": {"format": args.format, "png_level": args.png_level, "encode_threads": threads},
            "quality": {"max_attempts": 1}}
    worker = FactoryWorker("w0", "n", lambda: gen)
    worker.run(dict(task, samples=task["samples"][: args.batch]))  # warm-up: pool threads, PIL
    t = time.perf_counter()
    res = worker.run(task)
    return len(res["samples"]) / (time.perf_counter() - t), res["timings"]


def encode_floor(gen: Generator, args) -> float:
    qcfg = qgate.QualityConfig.from_cfg({"max_attempts": 1})
    images = [gen.pool[i % 16] for i in range(args.images)]

    def one(im):
        if not qgate.check_image(im, qcfg):
            encode_image(im, args.format, 95, args.png_level)

    with ThreadPoolExecutor(args.threads) as pool:
        list(pool.map(one, images[: args.threads]))
        t = time.perf_counter()
        list(pool.map(one, images))
    return args.images / (time.perf_counter() - t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=336)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sleep-ms", type=float, default=150.0)
    ap.add_argument("--format", default="png")
    ap.add_argument("--png-level", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of floor + actor rows; medians reported")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    instant, sleeping = Generator(args.size, 0.0), Generator(args.size, args.sleep_ms / 1000)
    runs = [(name, gen, threads) for name, gen in (("instant", instant), (f"sleep {args.sleep_ms:g} ms/image", sleeping))
            for threads in (0, args.threads)]
    floors, rounds = [], []
    for _ in range(args.repeats):
        floors.append(encode_floor(instant, args))
        rounds.append([actor_rate(gen, args, threads) for _, gen, threads in runs])
    floor = statistics.median(floors)
    rows = []  # (name, threads, median images/s, median of per-round ratios to the floor, their range, timings)
    for j, (name, _, threads) in enumerate(runs):
        rates = [r[j][0] for r in rounds]
        ratios = [r[j][0] / f for r, f in zip(rounds, floors)]
        mid = sorted(rounds, key=lambda r: r[j][0])[len(rounds) // 2][j][1]  # the median round's timings
        rows.append((name, threads, statistics.median(rates), statistics.median(ratios), (min(ratios), max(ratios)), mid))
    sleep_rate = 1000.0 / args.sleep_ms
    lines = ["```", f"python benchmarks/factory_encode_bench.py {' '.join(argv if argv is not None else sys.argv[1:])}", "```", "",
             f"{os.cpu_count()} CPUs (shared; 1-minute load {os.getloadavg()[0]:.1f}), {args.images} images of {args.size} px per "
             f"unit, batch {args.batch}, {args.format}" + (f" level {args.png_level}" if args.png_level is not None else " (PIL default level)"),
             f"encode floor (gate + encode on {args.threads} threads, nothing else): {floor:.1f} images/s "
             f"(median of {args.repeats}: {', '.join(f'{f:.1f}' for f in floors)}); sleep-only rate {sleep_rate:.2f} images/s",
             "", "Medians of the rounds (vs floor: median of the per-round ratios; timings: the median round's).", "",
             "| generator | encode_threads | actor images/s | vs floor | vs sleep-only | generate s | gate+encode s (on the pool) | waited for encoding s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, threads, rate, vs_floor, _, t in rows:
        lines.append(f"| {name} | {threads} | {rate:.2f} | {vs_floor:.3f} | "
                     f"{rate / sleep_rate if 'sleep' in name else float('nan'):.3f} | {t['generate_s']:.2f} | "
                     f"{t['encode_s']:.2f} | {t['wait_s']:.2f} |")
    inst = [r for r in rows if r[0] == "instant" and r[1] == args.threads][0]
    slp = [r for r in rows if r[0] != "instant" and r[1] == args.threads][0]
    lines += ["", f"RATIO instant generator: actor / encode floor = {inst[3]:.3f} (target >= 0.9; rounds "
                  f"{inst[4][0]:.3f}-{inst[4][1]:.3f})",
              f"RATIO {args.sleep_ms:g} ms generator: actor / sleep-only rate = {slp[2] / sleep_rate:.3f} (target >= 0.95)"]
    text = "\n".join(lines)
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
