"""`luna make-toy`'s render workers: ms a step of the stages that render their batches (vae, decoder,
vision) with `render_workers=0` (the baseline: rendering inside the step) and with N workers, same run,
runs alternated so machine load hits both alike.

    python benchmarks/toy_render_bench.py                    # 40 steps a stage, 1 worker, 2 rounds, 1 torch thread
    python benchmarks/toy_render_bench.py --workers 2 --steps 80 --threads 2

Steps are timed from the stages' own loop (step starts after the first quarter: no setup, no final
save); batches are conf/make_toy.yaml's. The weights are the same either way (tests/luna/test_toy_train.py).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stages", nargs="+", default=["vision", "vae", "decoder"], choices=["vision", "vae", "decoder"])
    args = ap.parse_args(argv)
    import torch
    from omegaconf import OmegaConf

    from luna.models.toy import train

    torch.set_num_threads(args.threads)
    defaults = OmegaConf.load(ROOT / "conf" / "make_toy.yaml").stages
    stages = {k: train.StageConfig(steps=args.steps if k in args.stages else 2, batch=int(defaults[k].batch),
                                   lr=float(defaults[k].lr)) for k in train.STAGES}
    calls: list[float] = []
    run = train.Stage.run

    def timed(self, step_fn, *a, **kw):
        def step(i):
            calls.append(time.perf_counter())
            return step_fn(i)
        return run(self, step, *a, **kw)

    train.Stage.run = timed
    ms: dict[tuple[str, int], list[float]] = {}
    print(f"toy render workers: {os.cpu_count()} CPUs, torch threads {args.threads}, load {os.getloadavg()[0]:.1f}, "
          f"{args.steps} steps a stage, batches {[stages[k].batch for k in args.stages]}")
    try:
        for _ in range(args.rounds):
            for workers in (0, args.workers):
                for name in args.stages:
                    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()):
                        only = [name] if name != "decoder" else ["vae", "decoder"]  # the decoder needs a VAE
                        calls.clear()
                        train.make_toy(tmp, Path(tmp) / "out", seed=1, stages=stages, only=only, pool_size=8,
                                       render_workers=workers, checkpoint_every_s=1e9)
                        mine = calls[-stages[name].steps:]  # this stage's step starts (after the VAE's, for decoder)
                        first = len(mine) // 4
                        ms.setdefault((name, workers), []).append((mine[-1] - mine[first]) / (len(mine) - 1 - first) * 1000)
    finally:
        train.Stage.run = run
    for name in args.stages:
        base, new = ms[(name, 0)], ms[(name, args.workers)]
        print(f"{name}: render_workers=0 {' / '.join(f'{v:.1f}' for v in base)} ms/step, "
              f"render_workers={args.workers} {' / '.join(f'{v:.1f}' for v in new)} ms/step")
        print(f"RATIO toy {name} step, 0 / {args.workers} render workers = {min(base) / min(new):.3f}  (> 1: the workers help)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
