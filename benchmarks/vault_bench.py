"""Vault benchmark on synthetic clustered vectors (CPU): recall on held-out queries, latency, build,
bytes, and autofaiss side by side on the same data.

    python benchmarks/vault_bench.py --sizes 100000 500000 [--index auto IVF1024,Flat] [--work DIR]
        [--no-autofaiss] [--out benchmarks/results/vault_NNN.md]

For each size N: write a synthetic pairs folder (N x dim embeddings stored in fp16, N/10 prompts,
clustered: extraction/synthetic.py), build a stored vault with the index chosen as autofaiss
would (or --index), its search tuned by the vault's own tuner (held-out vectors, `tune_recall`
within `tune_latency_ms`), then measure against exact search (faiss IndexFlatIP, same run):
  recall@10 on --queries **held-out queries**: new images of the stored prompts (same generator,
             other offsets, rounded to fp16), none of them in the index; for comparison also
             recall on stored vectors plus small noise (what the tuner used to measure)
  latency    single queries (batch 1) on ONE faiss thread, p50/p99: the bare index (`index`),
             the vault's search with its bookkeeping (`search`), and with the conditioning
             fetch and blend (`query+cond`, cold first touch then warm)
  autofaiss  `autofaiss.build_index` on the same vectors with the same memory budget (it picks
             the index and tunes its search to its default 10 ms query budget); its build time,
             parameters, held-out recall and bare-index latency, and the ratio of the two p50s.
Then the vault is shrunk to prompts-only (drop_conditionings) and its bytes counted. Builds use
every core; every latency is measured on one thread. autofaiss is a benchmark-only dependency
(`pip install -e .[bench]`; see BENCHMARKS.md), never imported by the package.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
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
from extraction.synthetic import synthetic_queries, write_synthetic_pairs  # noqa: E402
from vault.build import build_vault, drop_conditionings  # noqa: E402
from vault.index import normalize, read_index, recall_at  # noqa: E402
from vault.query import Vault  # noqa: E402

CATEGORIES = ("eyes", "hands", "faces", "hair", "skin")


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@contextlib.contextmanager
def one_thread():
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


def latencies(fn, queries: np.ndarray) -> np.ndarray:
    with one_thread():
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


def p50(ms: np.ndarray) -> float:
    return float(np.percentile(ms, 50))


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
                              prompt_order="blocks", categories=CATEGORIES)
        done.write_text("ok")
    return pairs_dir, n_prompts, time.perf_counter() - t


def index_params(index: faiss.Index) -> str:
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexHNSW):
        return f"efSearch={inner.hnsw.efSearch}"
    with contextlib.suppress(RuntimeError):
        return f"nprobe={faiss.extract_index_ivf(index).nprobe}"
    return "exact"


def run_autofaiss(base: np.ndarray, q: np.ndarray, truth: np.ndarray, args) -> dict:
    from autofaiss import build_index  # benchmark-only dependency

    logging.getLogger("autofaiss").setLevel(logging.WARNING)
    t = time.perf_counter()
    index, infos = build_index(embeddings=base, max_index_memory_usage=args.memory_budget, metric_type="ip",
                           save_on_disk=False, min_nearest_neighbors_to_retrieve=10, verbose=logging.WARNING,
                           index_path=None, index_infos_path=None)
    build_s = time.perf_counter() - t
    _, found = index.search(q, 10)
    lq = q[: args.latency_queries]
    ms = latencies(lambda x: index.search(x, 10), lq)
    sweep = ef_sweep(index, q, truth, lq, args.ef_sweep) if args.ef_sweep else []
    key = (infos or {}).get("index_key") or type(faiss.downcast_index(index)).__name__
    return dict(spec=key, params=index_params(index), build_s=build_s, recall=recall_at(found, truth), index=ms,
                sweep=sweep)


def at_equal_recall(points: list[tuple[float, float, str]], level: float) -> tuple[float, str] | None:
    """The fastest (p50 ms, setting) among (recall, p50 ms, setting) points reaching `level` (recall
    compared at the 3 decimals the tables print), if any."""
    ok = [(ms, name) for rec, ms, name in points if round(rec, 3) >= level - 1e-9]
    return min(ok) if ok else None


def equal_recall_rows(r: dict) -> list[str]:
    """Luna vs autofaiss at equal recall: for each recall level either index reaches (its default
    point or an efSearch of the sweep), each one's fastest setting reaching it and their ratio."""
    a = r["auto"]
    luna = [(r["recall"], p50(r["index"]), f"default {r['params']}")]
    luna += [(e["recall"], p50(e["index"]), f"efSearch={e['ef']}") for e in r.get("sweep", [])]
    auto = [(a["recall"], p50(a["index"]), f"default {a['params']}")]
    auto += [(e["recall"], p50(e["index"]), f"efSearch={e['ef']}") for e in a.get("sweep", [])]
    out = []
    for level in sorted({round(x[0], 3) for x in luna + auto} | {0.97, 0.99}):
        lb, ab = at_equal_recall(luna, level), at_equal_recall(auto, level)
        if not lb and not ab:
            continue
        ratio = f"{ab[0] / lb[0]:.1f}x" if lb and ab else "n/a"
        cell = lambda b: f"{b[0]:.3f} ({b[1]})" if b else "not reached"  # noqa: E731
        out.append(f"| {r['n']:,} | {level:.3f} | {cell(lb)} | {cell(ab)} | {ratio} |")
    return out


def run_size(n: int, spec: str | None, args, work: Path) -> dict:
    pairs_dir, n_prompts, gen_s = pairs_for(n, args, work)
    vault_dir = work / f"vault-{n}"
    shutil.rmtree(vault_dir, ignore_errors=True)
    t = time.perf_counter()
    m = build_vault(pairs_dir, vault_dir, index=spec, memory_budget=args.memory_budget,
                    categories=not args.no_categories, tune_recall=args.tune_recall,
                    tune_latency_ms=args.tune_latency_ms)
    build_s = time.perf_counter() - t
    with Pairs(pairs_dir) as p:
        base = normalize(p.embed)
    q, _ = synthetic_queries(args.queries, n_prompts, args.dim, args.clusters, categories=CATEGORIES)
    q = normalize(q)
    rng = np.random.default_rng(1)
    qs = base[rng.choice(n, args.queries, replace=False)]
    qs = normalize(qs + rng.standard_normal(qs.shape, dtype=np.float32) * (0.05 / np.sqrt(args.dim)))

    _, truth = faiss.knn(q, base, 10, faiss.METRIC_INNER_PRODUCT)
    _, truth_s = faiss.knn(qs, base, 10, faiss.METRIC_INNER_PRODUCT)
    vault = Vault.open(vault_dir, use_gpu=False)
    keys = lambda found: np.array([[int(x["key"]) for x in nb] for nb in found.neighbours])  # noqa: E731 - keys are row numbers
    recall = recall_at(keys(vault.search(q, k=10)), truth)
    recall_stored = recall_at(keys(vault.search(qs, k=10)), truth_s)

    lq = q[: args.latency_queries]
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(base)
    exact_ms = latencies(lambda x: flat.search(x, 10), lq[: max(20, args.latency_queries // 5)])
    del flat
    index = read_index(vault_dir / m.files["global"])
    faiss.ParameterSpace().set_index_parameters(index, m.search_params) if m.search_params else None
    index_ms = latencies(lambda x: index.search(x, 10), lq)
    sweep = ef_sweep(index, q, truth, lq, args.ef_sweep) if args.ef_sweep else []
    del index
    search_ms = latencies(lambda x: vault.search(x, k=10), lq)
    cold_ms = latencies(lambda x: vault.query(x, k=10), lq)  # first touch of these prompts' conditionings
    query_ms = latencies(lambda x: vault.query(x, k=10), lq)  # the same queries again: page cache warm
    stored_b = folder_bytes(vault_dir)
    del vault
    drop_conditionings(vault_dir)
    prompts_b = folder_bytes(vault_dir)
    index_b = sum(f.stat().st_size for f in (vault_dir / "index").iterdir())
    shutil.rmtree(vault_dir)
    return dict(n=n, prompts=n_prompts, spec=m.index_spec, params=m.search_params, tuning=m.tuning, gen_s=gen_s,
                build_s=build_s, recall=recall, recall_stored=recall_stored, exact=exact_ms, index=index_ms,
                search=search_ms, query=query_ms, cold=cold_ms, auto=None, data=(base, q, truth), stored_b=stored_b / n,
                sweep=sweep,
                prompts_b=prompts_b / n, index_b=index_b / n, categories=len(m.categories),
                cat_params=sorted({i["search_params"] or "exact" for i in m.categories.values()}))


def ef_sweep(index, q: np.ndarray, truth: np.ndarray, lq: np.ndarray, efs: list[int]) -> list[dict]:
    """Recall@10 on the held-out queries and single-query latency of the Luna index at other efSearch
    values (HNSW only): where it stands at the recall another index reaches."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if not isinstance(inner, faiss.IndexHNSW):
        return []
    saved = inner.hnsw.efSearch
    out = []
    for ef in efs:
        inner.hnsw.efSearch = int(ef)
        _, found = index.search(q, 10)
        out.append({"ef": int(ef), "recall": recall_at(found, truth), "index": latencies(lambda x: index.search(x, 10), lq)})
    inner.hnsw.efSearch = saved
    return out


def report(rows: list[dict], args) -> str:
    lines = [
        f"dim {args.dim} (stored fp16), {args.clusters} clusters, prompts = {args.prompts_per_image} x images, "
        f"text dims {args.text_dims} + pooled {args.pooled_dim}; {args.queries} held-out queries (recall), "
        f"{args.latency_queries} single queries on 1 faiss thread (latency); tune_recall {args.tune_recall}, "
        f"tune_latency_ms {args.tune_latency_ms}; memory budget {args.memory_budget}",
        "",
        "| N | Luna index (params) | tuner: recall / p50 ms / target met | build s | recall@10 held-out "
        "| recall@10 stored+noise | exact p50 ms | index p50/p99 ms | search p50/p99 ms | query+cond cold p50/p99 ms "
        "| query+cond warm p50/p99 ms | B/sample stored | B/sample prompts-only |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["tuning"] or {}
        tuner = (f"{t.get('recall', float('nan')):.3f} / {t.get('latency_ms') or float('nan'):.2f} / "
                 f"{'yes' if t.get('met') else 'NO'}")
        cats = (f"; +{r['categories']} category indices: {'/'.join(r['cat_params'])}" if r["categories"]
                else "; no category indices")
        lines.append(
            f"| {r['n']:,} | {r['spec']} ({r['params'] or 'exact'}{cats}) | {tuner} | {r['build_s']:.1f} "
            f"| {r['recall']:.3f} | {r['recall_stored']:.3f} | {p50(r['exact']):.2f} | {pct(r['index'])} "
            f"| {pct(r['search'])} | {pct(r['cold'])} | {pct(r['query'])} | {r['stored_b']:,.0f} | {r['prompts_b']:,.0f} |"
        )
    autos = [r for r in rows if r["auto"]]
    if autos:
        lines += ["", "| N | autofaiss index (params) | build s | recall@10 held-out | index p50/p99 ms "
                  "| Luna index p50 / autofaiss p50 | Luna recall - autofaiss recall |",
                  "|---|---|---|---|---|---|---|"]
        for r in autos:
            a = r["auto"]
            lines.append(f"| {r['n']:,} | {a['spec']} ({a['params']}) | {a['build_s']:.1f} | {a['recall']:.3f} "
                         f"| {pct(a['index'])} | {p50(a['index']) / p50(r['index']):.1f}x faster "
                         f"| {r['recall'] - a['recall']:+.3f} |")
    equal = [row for r in rows if r["auto"] and (r.get("sweep") or r["auto"].get("sweep"))
             for row in equal_recall_rows(r)]
    if equal:
        lines += ["", "At equal recall (the fastest setting of each index reaching it; default points and both "
                  "efSearch sweeps on the same held-out queries):", "",
                  "| N | recall@10 ≥ | Luna p50 ms (setting) | autofaiss p50 ms (setting) | autofaiss p50 / Luna p50 |",
                  "|---|---|---|---|---|", *equal]
    sweeps = [r for r in rows if r.get("sweep")]
    if sweeps:
        lines += ["", "| N | Luna index at efSearch | recall@10 held-out | index p50/p99 ms | vs autofaiss p50 "
                  "| recall - autofaiss recall |", "|---|---|---|---|---|---|"]
        for r in sweeps:
            a = r["auto"]
            for e in r["sweep"]:
                vs = f"{p50(a['index']) / p50(e['index']):.1f}x faster" if a else "n/a"
                d = f"{e['recall'] - a['recall']:+.3f}" if a else "n/a"
                lines.append(f"| {r['n']:,} | {e['ef']} | {e['recall']:.3f} | {pct(e['index'])} | {vs} | {d} |")
    auto_sweeps = [r for r in rows if r["auto"] and r["auto"].get("sweep")]
    if auto_sweeps:
        lines += ["", "| N | autofaiss index at efSearch | recall@10 held-out | index p50/p99 ms |", "|---|---|---|---|"]
        for r in auto_sweeps:
            for e in r["auto"]["sweep"]:
                lines.append(f"| {r['n']:,} | {e['ef']} | {e['recall']:.3f} | {pct(e['index'])} |")
    lines.append("")
    for r in rows:
        lines.append(f"- N={r['n']:,}: {r['prompts']:,} prompts; indices {r['index_b']:,.0f} B/sample; synthetic "
                     f"data written in {r['gen_s']:.1f} s (not part of the build); speed-up of the vault search "
                     f"over exact search {p50(r['exact']) / p50(r['search']):.0f}x (p50)")
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
    ap.add_argument("--no-autofaiss", action="store_true")
    ap.add_argument("--tune-recall", type=float, default=0.97)
    ap.add_argument("--tune-latency-ms", type=float, default=1.0)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--latency-queries", type=int, default=500)
    ap.add_argument("--ef-sweep", type=int, nargs="*", default=[],
                    help="also measure the Luna HNSW index and autofaiss's (when HNSW) at these efSearch values "
                         "(recall and latency), and compare the two at equal recall")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
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
                data = rows[-1].pop("data")
                if not args.no_autofaiss and spec == args.index[0]:  # once per size, on the same vectors
                    rows[-1]["auto"] = run_autofaiss(*data, args)
                    load.append(os.getloadavg()[0])
                    print(report(rows, args), flush=True)
                del data
    text = report(rows, args) + f"\n- 1-minute load average during the run: {', '.join(f'{x:.1f}' for x in load)} " \
        f"on {os.cpu_count()} CPUs (shared machine)"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(f"```\npython benchmarks/vault_bench.py {' '.join(argv or sys.argv[1:])}\n```\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
