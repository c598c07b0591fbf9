"""Projector benchmark: ridge vs the seed MLP vs the learned-query decoder, on the same data.

Prints, from one run: parameters (at the benchmark's dims and at full size 1024 -> 77x2048),
training samples/s and validation metrics of each model, and the data loader's throughput
alone against training throughput (ratio > 1: the loader is not the bottleneck).

    python benchmarks/projector_bench.py [--prompts 1000] [--epochs 4] [--out benchmarks/results/projector.md]

Data: the closed-loop synthetic pairs of projector/synthetic.py (held-out prompts are the
validation split). Not a test: timings depend on the machine.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.report import emit  # noqa: E402

FULL = {"in_dim": 1024, "cond_dim": 2048, "pooled_dim": 1280, "seq_len": 77}
# the full-size configurations (conf/model/*.yaml defaults)
FULL_SPECS = {
    "ridge": {"_target_": "projector.models.RidgeProjector"},
    "seed MLP": {"_target_": "projector.models.SeedMLP", "hidden": [2048, 4096]},
    "learned queries": {"_target_": "projector.models.LearnedQueryDecoder", "width": 512, "depth": 4, "heads": 8},
}


def full_size_parameters(spec: dict) -> int:
    """Parameters at full size, counted on the meta device (nothing allocated)."""
    from projector import models

    with torch.device("meta"):
        return models.count_parameters(models.build(spec, **FULL))


def loader_throughput(dm, epochs: int) -> float:
    n, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in dm.train_dataloader():
            n += len(batch["x"])
    return n / (time.perf_counter() - start)


def run_model(name: str, spec: dict, dm, epochs: int, lr: float) -> dict:
    import lightning as L

    from projector.models import count_parameters
    from projector.module import ProjectorModule

    L.seed_everything(0, verbose=False)
    module = ProjectorModule(net=spec, dims=dm.dims, pooled_head={"_target_": "projector.models.PooledHead", "hidden": 256},
                             optim={"lr": lr, "warmup_steps": 20})
    module.projector.set_stats(dm.stats)
    closed = module.projector.closed_form
    trainer = L.Trainer(accelerator="cpu", max_epochs=1 if closed else epochs, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=None if closed else 1.0)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    samples = len(dm.splits["train"]) * (1 if closed else epochs)
    val = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = val.validate(module, datamodule=dm, verbose=False)[0]
    return {
        "model": name, "params": count_parameters(module.projector.net) + (count_parameters(module.projector.pooled_head) if module.projector.pooled_head else 0),
        "full_params": full_size_parameters(FULL_SPECS[name]), "samples_s": samples / seconds, "seconds": seconds,
        **{k: metrics.get(k, float("nan")) for k in ("val/cos_content", "val/cos_pad", "val/cos_pooled", "val/cos_shuffled", "val/r_at_1", "val/knn_cos", "val/loss")},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--checkpoints", type=int, default=2)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--text-dims", type=int, nargs=2, default=(96, 160))
    ap.add_argument("--pooled", type=int, default=160)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, default=None, help="write the markdown result here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from projector.data import PairsDataModule
    from projector.synthetic import write_closed_loop_pairs

    tmp = Path(tempfile.mkdtemp(prefix="projector_bench_"))
    pairs = write_closed_loop_pairs(tmp / "pairs", n_prompts=args.prompts, checkpoints=tuple(f"ck{i}" for i in range(args.checkpoints)),
                                    dim=args.dim, text_dims=tuple(args.text_dims), pooled_dim=args.pooled, cond_noise=0.3, seed=0)
    dm = PairsDataModule(str(pairs), batch_size=args.batch, val_prompts=0.2, val_checkpoints=0, num_workers=args.workers)
    dm.setup()
    d = args.dim
    specs = {
        "ridge": ({"_target_": "projector.models.RidgeProjector", "lam": 1.0}, 0.0),
        "seed MLP": ({"_target_": "projector.models.SeedMLP", "hidden": [2 * d, 4 * d]}, 1e-3),
        "learned queries": ({"_target_": "projector.models.LearnedQueryDecoder", "width": 128, "depth": 2, "heads": 4}, 2e-3),
    }
    loader = loader_throughput(dm, args.epochs)
    chunked_dm = PairsDataModule(str(pairs), batch_size=args.batch, val_prompts=0.2, val_checkpoints=0,
                                 num_workers=args.workers, in_memory=False)
    chunked_dm.setup()
    chunked = loader_throughput(chunked_dm, 1)  # conditionings read per batch from the HDF5 chunks
    rows = [run_model(name, spec, dm, args.epochs, lr) for name, (spec, lr) in specs.items()]

    lines = [
        f"# Projector benchmark\n",
        f"Command: `python benchmarks/projector_bench.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
        f"Machine: {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, CPU  ",
        f"Data: closed-loop synthetic pairs, {args.prompts} prompts x {args.checkpoints} checkpoints, embed {d}, "
        f"conditioning 77x{sum(args.text_dims)} ({args.text_dims[0]}+{args.text_dims[1]}), pooled {args.pooled}; "
        f"{len(dm.splits['train'])} training / {len(dm.splits['val'])} held-out-prompt images; {args.epochs} epochs, batch {args.batch}.\n",
        "| model | params (bench dims, with pooled head) | network params at full size 1024 -> 77x2048 | train samples/s | val/cos_content | val/cos_pad | val/cos_pooled | val/cos_shuffled | val/r_at_1 | val/loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params']:,} | {r['full_params']:,} | {r['samples_s']:,.0f} | {r['val/cos_content']:.4f} | "
                     f"{r['val/cos_pad']:.4f} | {r['val/cos_pooled']:.4f} | {r['val/cos_shuffled']:.4f} | {r['val/r_at_1']:.3f} | {r['val/loss']:.3f} |")
    knn = rows[0]["val/knn_cos"]
    lines.append(f"\nVault-style k-NN (k={dm.knn_k}) on the same split: val/knn_cos = {knn:.4f}.\n")
    lines.append("| data loader alone, in RAM (samples/s) | data loader alone, chunked HDF5 reads (samples/s) | training throughput, learned queries (samples/s) | loader / training (RAM, chunked) |")
    lines.append("| ---: | ---: | ---: | ---: |")
    q = rows[-1]["samples_s"]
    lines.append(f"| {loader:,.0f} | {chunked:,.0f} | {q:,.0f} | {loader / q:.1f}x, {chunked / q:.1f}x |")
    best_baseline = max(r["val/cos_content"] for r in rows[:-1])
    lines.append(f"\nLearned queries vs best baseline on val/cos_content: {rows[-1]['val/cos_content'] / best_baseline:.3f}x; "
                 f"parameters at full size vs the seed MLP: {rows[-1]['full_params'] / rows[1]['full_params']:.3f}x.")
    emit("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
