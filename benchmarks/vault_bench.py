"""Vault benchmark on synthetic clustered vectors (CPU): latency, recall, speed-up, build time, bytes.

    python benchmarks/vault_bench.py --sizes 100000 500000 [--index auto IVF1024,Flat] [--work DIR]

For each size N: write a synthetic pairs folder (N x dim embeddings, N/10 prompts with real SDXL
conditionings [77,2048] + [1280] by default), build a stored vault with the index chosen as
autofaiss would (or --index), then measure single-query latency of
  exact      brute-force inner product over all N (faiss IndexFlatIP), the baseline
  search     the vault's index alone (category=None)
  query      the vault's index + neighbour weighting + the conditioning fetch and blend (stored mode),
             first with the conditionings cold (first touch), then again warm (page cache)
  auto       the same with routing to the nearest category index
and recall@10 of the vault against exact search, on noisy copies of stored items (new "images"
of the same prompts). With --work DIR the synthetic pairs are kept there and reused by later runs.
Then the vault is shrunk to prompts-only (drop_conditionings) and its bytes
counted. Ratios are against the exact search measured in the same run. faiss runs on 1 thread.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from extraction.pairs import Pairs  # noqa: E402
from extraction.synthetic import write_synthetic_pairs  # noqa: E402
from vault.build import build_vault, drop_conditionings  # noqa: E402
from vault.index import normalize, recall_at  # noqa: E402
from vault.query import Vault  # noqa: E402


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def latencies(fn, queries: np.ndarray) -> np.ndarray:
    fn(queries[:1])  # warm up
    out = np.empty(len(queries))
    for i in range(len(queries)):
        t = time.perf_counter()
        fn(queries[i : i + 1])
        out[i] = time.perf_counter() - t
    return out * 1000.0


def pct(ms: np.ndarray | None) -> str:
    if ms is None:
        return "n/a"
    return f"{np.percentile(ms, 50):.3f} / {np.percentile(ms, 99):.3f}"


def pairs_for(n: int, args, work: Path) -> tuple[Path, int, float]:
    """The synthetic pairs folder of size n (reused from an earlier run in the same --work folder)."""
    n_prompts = max(1, int(n * args.prompts_per_image))
    pairs_dir = work / f"pairs-{n}-{args.dim}-{n_prompts}-{args.clusters}-{'x'.join(map(str, args.text_dims))}"
    done = pairs_dir / "complete"
    t = time.perf_counter()
    if not done.exists():
        shutil.rmtree(pairs_dir, ignore_errors=True)
        write_synthetic_pairs(pairs_dir, n, n_prompts, args.dim, text_dims=tuple(args.text_dims),
                              pooled_dim=args.pooled_dim, n_clusters=args.clusters, parts=max(1, n // 50_000),
                              prompt_order="blocks", categories=("eyes", "hands", "faces", "hair", "skin"))
        done.write_text("ok")
    return pairs_dir, n_prompts, time.perf_counter() - t


def run_size(n: int, spec: str | None, args, work: Path) -> dict:
    pairs_dir, n_prompts, gen_s = pairs_for(n, args, work)
    vault_dir = work / f"vault-{n}"
    shutil.rmtree(vault_dir, ignore_errors=True)
    t = time.perf_counter()
    m = build_vault(pairs_dir, vault_dir, index=spec, memory_budget=args.memory_budget,
                    categories=not args.no_categories)
    build_s = time.perf_counter() - t
    with Pairs(pairs_dir) as p:
        base = normalize(p.embed)
    rng = np.random.default_rng(1)
    q = base[rng.choice(n, args.queries, replace=False)]
    q = normalize(q + rng.standard_normal(q.shape, dtype=np.float32) * (args.noise / np.sqrt(args.dim)))

    vault = Vault.open(vault_dir, use_gpu=False)
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(base)
    _, truth = flat.search(q, 10)
    found = vault.search(q, k=10)
    ids = np.array([[int(x["key"]) for x in nb] for nb in found.neighbours])  # synthetic keys are row numbers
    recall = recall_at(ids, truth)
    del base

    lq = q[: args.latency_queries]
    exact_ms = latencies(lambda x: flat.search(x, 10), lq)
    del flat
    search_ms = latencies(lambda x: vault.search(x, k=10), lq)
    cold_ms = latencies(lambda x: vault.query(x, k=10), lq)  # first touch of these prompts' conditionings
    query_ms = latencies(lambda x: vault.query(x, k=10), lq)  # the same queries again: page cache warm
    auto_ms = latencies(lambda x: vault.query(x, k=10, category="auto"), lq) if vault.categories else None
    stored_b = folder_bytes(vault_dir)
    cond_b = sum((vault_dir / c).stat().st_size for c in m.cond_files)
    del vault
    drop_conditionings(vault_dir)
    prompts_b = folder_bytes(vault_dir)
    index_b = sum(f.stat().st_size for f in (vault_dir / "index").iterdir())
    shutil.rmtree(vault_dir)
    return dict(n=n, prompts=n_prompts, spec=m.index_spec, params=m.search_params, gen_s=gen_s, build_s=build_s,
                recall=recall, exact=exact_ms, search=search_ms, query=query_ms, cold=cold_ms, auto=auto_ms,
                stored_b=stored_b / n, prompts_b=prompts_b / n, index_b=index_b / n, cond_b=cond_b / n_prompts,
                categories=len(m.categories),
                cat_params=sorted({i["search_params"] or "exact" for i in m.categories.values()}))


def report(rows: list[dict], args) -> str:
    lines = [
        f"dim {args.dim}, {args.clusters} clusters, prompts = {args.prompts_per_image} x images, "
        f"text dims {args.text_dims} + pooled {args.pooled_dim}, faiss threads 1, "
        f"{args.latency_queries} single queries (latency), {args.queries} queries (recall)",
        "",
        "| N | index (params) | build s | recall@10 | exact p50/p99 ms | search p50/p99 ms "
        "| query+cond cold p50/p99 ms | query+cond p50/p99 ms | auto-routed p50/p99 ms "
        "| speed-up (exact p50 / query p50) | B/sample stored | B/sample prompts-only |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = np.percentile(r["exact"], 50) / np.percentile(r["query"], 50)
        lines.append(
            f"| {r['n']:,} | {r['spec']} ({r['params'] or 'exact'}; +{r['categories']} category indices: "
            f"{'/'.join(r['cat_params']) or '-'}) "
            f"| {r['build_s']:.1f} | {r['recall']:.3f} | {pct(r['exact'])} | {pct(r['search'])} | {pct(r['cold'])} "
            f"| {pct(r['query'])} "
            f"| {pct(r['auto'])} | {speed:.1f}x | {r['stored_b']:,.0f} | {r['prompts_b']:,.0f} |"
        )
    lines.append("")
    for r in rows:
        lines.append(f"- N={r['n']:,}: {r['prompts']:,} prompts; indices {r['index_b']:,.0f} B/sample (global + "
                     f"categories); conditioning store {r['cond_b']:,.0f} B/prompt; synthetic data written in "
                     f"{r['gen_s']:.1f} s (not part of the build)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--clusters", type=int, default=256)
    ap.add_argument("--prompts-per-image", type=float, default=0.1)
    ap.add_argument("--text-dims", type=int, nargs=2, default=[768, 1280])
    ap.add_argument("--pooled-dim", type=int, default=1280)
    ap.add_argument("--index", nargs="+", default=["auto"],
                    help="faiss index_factory strings to compare; auto = chosen by size and memory")
    ap.add_argument("--memory-budget", default="8G")
    ap.add_argument("--no-categories", action="store_true")
    ap.add_argument("--noise", type=float, default=0.3, help="query offset from a stored item (relative norm)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--latency-queries", type=int, default=500)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    faiss.omp_set_num_threads(1)
    import torch

    torch.set_num_threads(1)
    rows = []
    load = [os.getloadavg()[0]]
    with contextlib.ExitStack() as stack:
        work = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for n in args.sizes:
            for spec in args.index:
                rows.append(run_size(n, None if spec == "auto" else spec, args, work))
                load.append(os.getloadavg()[0])
                print(report(rows, args), flush=True)
    text = report(rows, args) + f"\n- 1-minute load average during the run: {', '.join(f'{x:.1f}' for x in load)} " \
        f"on {os.cpu_count()} CPUs (shared machine)"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(f"```\npython benchmarks/vault_bench.py {' '.join(argv or sys.argv[1:])}\n```\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
