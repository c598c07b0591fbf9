"""FAISS indices: the autofaiss-style choice of index type, build, search tuning, filtered search, I/O.

Vectors are L2-normalised and searched by inner product (= cosine similarity).
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np

from luna.files import atomic_path
from vault.manifest import VaultError

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_bytes(size) -> int:
    """'4G' / '512M' / 1234 -> bytes."""
    if isinstance(size, (int, float)):
        return int(size)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)i?B?\s*", str(size).upper())
    if not m:
        raise VaultError(f"memory_budget={size!r}: expected a size like 4G, 512M or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def normalize(x) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _ivf_clusters(n: int) -> int:
    if n < 1_000_000:
        return max(1, 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n)))))
    return 16384 if n < 10_000_000 else 65536


def choose_index_spec(n: int, d: int, memory_budget: int) -> str:
    """The index_factory string autofaiss (get_optimal_index_keys_v2) would pick, not memory-mapped.

    Flat below 1000 vectors, HNSW15 below 10k, then the largest HNSW (M <= 32) that fits the
    budget, else IVF-Flat below 1M if it fits, else OPQ + IVF-HNSW + PQ with the widest PQ that fits.
    """
    if n < 1000:
        return "Flat"
    if n < 10_000:
        return "HNSW15"
    m = int((memory_budget / (4 * n) - d) // 2)
    if m >= 8:
        return f"HNSW{min(m, 32)}"
    k = _ivf_clusters(n)
    if n < 1_000_000 and index_bytes(f"IVF{k},Flat", n, d) <= memory_budget:
        return f"IVF{k},Flat"
    for pq in (256, 128, 64, 32, 16, 8):
        if d % pq == 0 and index_bytes(f"OPQ{pq},IVF{k}_HNSW32,PQ{pq}x8", n, d) <= memory_budget:
            return f"OPQ{pq},IVF{k}_HNSW32,PQ{pq}x8"
    raise VaultError(
        f"no index of {n} x {d} vectors fits memory_budget={memory_budget} bytes; raise memory_budget"
    )


def index_bytes(spec: str, n: int, d: int) -> int | None:
    """Memory of an index of `spec` over n x d vectors, the reckoning `choose_index_spec` fits to the budget
    (None for specs it does not size)."""
    if spec == "Flat":
        return 4 * n * d
    if m := re.fullmatch(r"HNSW(\d+)", spec):
        return 4 * n * (d + 2 * int(m.group(1)))
    if m := re.fullmatch(r"IVF(\d+),Flat", spec):
        return n * (4 * d + 8) + int(m.group(1)) * 4 * d
    if m := re.fullmatch(r"(?:OPQ\d+,)?IVF(\d+)(?:_HNSW\d+)?,PQ(\d+)(?:x8)?", spec):
        return n * (int(m.group(2)) + 8) + int(m.group(1)) * 4 * d
    return None


def _train_size(spec: str, n: int) -> int:
    m = re.search(r"IVF(\d+)", spec)
    if not m:
        return min(n, 100_000)
    return min(n, int(m.group(1)) * 100)


# faiss' default 40 leaves a prompt's images poorly linked to the rest. 500k x 1024 (vault_bench data,
# shuffled insertion, 1,000 held-out queries, efSearch 256): efConstruction 80 -> recall@10 0.990,
# 120 -> 0.999 (build 258 s), 160 -> 1.000 (464 s, over the 6-minute budget at load ~5)
HNSW_EF_CONSTRUCTION = 120


def _train_rows(n: int, spec: str, seed: int, rows: np.ndarray | None = None) -> np.ndarray:
    """The sorted rows an index of `spec` is trained on: a seeded random sample of `rows` (default: all n)."""
    rows = np.arange(n) if rows is None else np.asarray(rows)
    rng = np.random.default_rng(seed)
    return np.sort(rows[rng.choice(len(rows), size=_train_size(spec, len(rows)), replace=False)])


def _new_index(x: np.ndarray, spec: str, seed: int, rows: np.ndarray | None = None) -> tuple[faiss.Index, np.ndarray]:
    """An empty, trained IP index of `spec` and the rows it was trained on (a random sample of `rows`,
    default all, up to 100 points per IVF cluster; none when `spec` needs no training)."""
    d = x.shape[1]
    m = re.search(r"IVF(\d+)", spec)
    if rows is not None and m and int(m.group(1)) > len(rows):
        rows = None  # fewer rows outside the held-out slice than clusters: train on all (as build_index would)
    n = len(x) if rows is None else len(rows)
    try:
        index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise VaultError(f"index={spec!r}: not a valid faiss index_factory string for dim {d} ({e})") from e
    inner = _hnsw_of(index)
    if inner is not None:
        inner.hnsw.efConstruction = max(inner.hnsw.efConstruction, HNSW_EF_CONSTRUCTION)
    if m and int(m.group(1)) > n:
        raise VaultError(f"index={spec!r}: {m.group(1)} IVF clusters need at least as many vectors (have {n})")
    if index.is_trained:
        return index, np.zeros(0, np.int64)
    trained = _train_rows(len(x), spec, seed, rows) if n else np.zeros(0, np.int64)
    index.train(x[trained] if n else x)
    return index, trained


def build_index(vectors: np.ndarray, spec: str, seed: int = 0) -> faiss.Index:
    """Train (on a random sample, up to 100 points per IVF cluster) and fill an IP index."""
    x = normalize(vectors)
    index, _ = _new_index(x, spec, seed)
    add_vectors(index, x, seed=seed)
    return index


def _hnsw_of(index: faiss.Index) -> faiss.IndexHNSW | None:
    """The HNSW index inside `index` (itself, or behind a PCA / OPQ IndexPreTransform), else None."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    return inner if isinstance(inner, faiss.IndexHNSW) else None


def _is_hnsw(index: faiss.Index) -> bool:
    return _hnsw_of(index) is not None


def _permute_entries(index: faiss.Index, perm: np.ndarray) -> None:
    """Reorder an HNSW index's entries (through a pre-transform, which only maps vectors)."""
    _hnsw_of(index).permute_entries(perm)


def add_vectors(index: faiss.Index, vectors: np.ndarray, batch: int = 65536, seed: int = 0,
                desc: str | None = None) -> None:
    """Append `vectors` to `index`; their ids continue the index's row numbers.

    An HNSW graph gets them in a seeded random order, then its entries are permuted back to row
    order: inserted in file order, batch by batch, the rows of one prompt (which a pairs folder
    keeps together) link mostly to each other, and new queries reach fewer of them (500k x 1024,
    HNSW32, efSearch 2048: recall@10 0.982 in file order, 0.997 shuffled).
    """
    x = normalize(vectors)
    if x.shape[1] != index.d:
        raise VaultError(f"vectors of dim {x.shape[1]} cannot go into an index of dim {index.d}")
    n0 = index.ntotal
    if not _is_hnsw(index):
        for i in range(0, len(x), batch):  # slices: no gathered copy
            index.add(x[i : i + batch])
        return
    order = np.random.default_rng([seed, 11]).permutation(len(x))
    _add_rows(index, x, order, with_ids=False, batch=batch, desc=desc)
    _permute_entries(index, np.concatenate([np.arange(n0), n0 + np.argsort(order)]).astype(np.int64))


def exact_search(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k (the ground truth for recall)."""
    flat = faiss.IndexFlatIP(base.shape[1])
    flat.add(normalize(base))
    return flat.search(normalize(queries), k)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's true top-k found in its returned top-k."""
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t)) / k for f, t in zip(found, truth)]))


EF_SEARCH = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
NPROBE = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096)
MIN_HELD_OUT = 20  # fewer held-out queries than this: tune on stored vectors plus noise instead
# A small add re-tunes by rebuilding the index over its stored vectors plus the new ones (a graph cannot
# leave stored rows out to hold them out): only where the stored vectors come back exactly (no PQ/SQ/PCA
# codes, which a rebuild would re-quantise, compounding with every add) and the rebuild is short.
WHOLE_RETUNE_MAX = 100_000


def whole_retune_ok(spec: str, n: int) -> bool:
    """Whether an add of too few vectors to tune on may rebuild `spec` over all n vectors to re-tune."""
    lossless = bool(re.fullmatch(r"Flat|HNSW\d+(_Flat)?|IVF\d+(_HNSW\d+)?,Flat", spec))
    return lossless and n <= WHOLE_RETUNE_MAX


def retune_blocker(spec: str, n_old: int, n_new: int, n_queries: int) -> str | None:
    """Why an add of `n_new` vectors to an index of `spec` holding `n_old` cannot re-tune on held-out
    vectors (its tuning is then stale), or None when it can (`add_tuned` decides by this)."""
    n, need = n_old + n_new, 10 * MIN_HELD_OUT
    if n_queries < MIN_HELD_OUT:
        return f"tune_queries={n_queries} is below the {MIN_HELD_OUT} held-out queries an add tunes on"
    if n < need:
        return (f"its {n} vectors are too few to hold out {MIN_HELD_OUT} tuning queries, a tenth of them; "
                f"a vault of {need} or more re-tunes on every add")
    if n_new < need and not whole_retune_ok(spec, n):
        return (f"{n_new} new vectors are too few to tune on, and re-tuning on the whole vault would rebuild "
                + (f"{n} vectors (more than {WHOLE_RETUNE_MAX})" if n > WHOLE_RETUNE_MAX else f"{spec}'s lossy codes")
                + "; rebuild=true re-tunes it")
    return None


def _tunable(spec: str, k: int = 10) -> list[str]:
    if "IVF" in spec:
        nlist = int(re.search(r"IVF(\d+)", spec).group(1))
        return [f"nprobe={p}" for p in NPROBE if p <= nlist]
    if spec.startswith("HNSW") or ",HNSW" in spec:
        return [f"efSearch={e}" for e in EF_SEARCH if e >= k]
    return []


@dataclass
class Tuning:
    """How an index's search parameters were chosen, and what they reach (stored in the manifest)."""

    params: str  # faiss ParameterSpace string, "" for exact indices
    recall: float  # recall@k of `params` on the tuning queries
    met: bool  # recall >= target within the latency budget
    target: float
    latency_ms: float | None = None  # p50 of one query at a time on one thread at `params`
    budget_ms: float | None = None
    queries: int = 0
    method: str = "exact"  # held-out | stored+noise | exact
    k: int = 10
    # rows held out as queries and rows the index was trained on (held-out tuning only; not in the manifest)
    held_rows: np.ndarray | None = field(default=None, repr=False, compare=False)
    train_rows: np.ndarray | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict:
        out = asdict(self)
        del out["held_rows"], out["train_rows"]
        return out

    def describe(self) -> str:
        lat = f", p50 {self.latency_ms:.2f} ms" if self.latency_ms is not None else ""
        return f"{self.params or 'exact'}: recall@{self.k} {self.recall:.4f}{lat} on {self.queries} {self.method} queries"


def _p50_ms(index: faiss.Index, q: np.ndarray, k: int, n: int = 200) -> float:
    """Median latency of single queries on one faiss thread (how a crop is looked up at run time)."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        q = q[:n]
        index.search(q[:1], k)  # warm up
        out = np.empty(len(q))
        for i in range(len(q)):
            t = time.perf_counter()
            index.search(q[i : i + 1], k)
            out[i] = time.perf_counter() - t
    finally:
        faiss.omp_set_num_threads(threads)
    return float(np.median(out) * 1000.0)


def _sweep(index: faiss.Index, q: np.ndarray, truth: np.ndarray, options: list[str], target: float,
           budget_ms: float | None, map_ids=None) -> tuple[str, float, float | None, bool]:
    """Raise the search parameter until recall >= target or one query's p50 exceeds the budget.

    Returns (params, recall, p50 ms, met). Over budget, the last setting within it is kept.
    """
    space = faiss.ParameterSpace()
    k = truth.shape[1]
    best = None
    for opt in options:
        space.set_index_parameters(index, opt)
        _, found = index.search(q, k)
        if map_ids is not None:
            found = np.where(found >= 0, map_ids[np.clip(found, 0, None)], -1)
        recall = recall_at(found, truth)
        lat = _p50_ms(index, q, k) if budget_ms is not None else None
        if lat is not None and lat > budget_ms and best is not None:
            break  # this setting is too slow: keep the previous one
        best = (opt, recall, lat, recall >= target and (lat is None or lat <= budget_ms))
        if recall >= target or (lat is not None and lat > budget_ms):
            break
    space.set_index_parameters(index, best[0])
    return best


def tune_search(index: faiss.Index, vectors: np.ndarray, spec: str, k: int = 10, target: float = 0.99,
                n_queries: int = 200, seed: int = 0, budget_ms: float | None = None) -> Tuning:
    """Smallest nprobe / efSearch reaching recall@k >= target on stored vectors plus small noise.

    These queries are easier than new images (the graph was built around them), so builds tune
    on held-out vectors instead (`build_tuned`); this remains for indices too small to hold any out.
    """
    options = _tunable(spec, k)
    if not options or len(vectors) == 0:
        return Tuning("", 1.0, True, target)
    rng = np.random.default_rng(seed)
    x = normalize(vectors)
    q = x[rng.choice(len(x), size=min(n_queries, len(x)), replace=False)]
    q = normalize(q + rng.standard_normal(q.shape, dtype=np.float32) * (0.05 / math.sqrt(x.shape[1])))
    k = min(k, len(x))
    _, truth = exact_search(x, q, k)
    params, recall, lat, met = _sweep(index, q, truth, options, target, budget_ms)
    return Tuning(params, recall, met, target, lat, budget_ms, len(q), "stored+noise", k)


def _exact_excluding(x: np.ndarray, q: np.ndarray, k: int, exclude: np.ndarray) -> np.ndarray:
    """Exact top-k ids of `q` over the rows of `x` not in `exclude` (sorted ids)."""
    extra = min(len(x), k + len(exclude))
    _, ids = faiss.knn(q, x, min(extra, k + 64), faiss.METRIC_INNER_PRODUCT)
    keep = ~np.isin(ids, exclude)
    if (keep.sum(1) < k).any():  # rare: many held-out rows among a query's neighbours
        _, ids = faiss.knn(q, x, extra, faiss.METRIC_INNER_PRODUCT)
        keep = ~np.isin(ids, exclude)
    return np.stack([row[m][:k] for row, m in zip(ids, keep)])


def build_tuned(vectors: np.ndarray, spec: str, target: float = 0.97, budget_ms: float | None = 1.0,
                n_queries: int = 1000, k: int = 10, seed: int = 0) -> tuple[faiss.Index, Tuning]:
    """Build an index and tune its search on vectors held out of it (queries it has never seen).

    A random slice of the vectors (up to `n_queries`, at most a tenth) is left out while the
    others are added; efSearch / nprobe are raised until recall@k on the held-out slice reaches
    `target` or one query's p50 exceeds `budget_ms`; then the slice is added too, and ids are row
    numbers as with `build_index` (HNSW entries are permuted back, IVF entries carry their ids).
    """
    x = normalize(vectors)
    n = len(x)
    options = _tunable(spec, k)
    n_hold = min(n_queries, n // 10)
    if not options or n_hold < MIN_HELD_OUT:
        index = build_index(x, spec, seed=seed)
        return index, tune_search(index, x, spec, k=k, target=target, seed=seed, budget_ms=budget_ms)
    rng = np.random.default_rng([seed, 7])
    held = np.sort(rng.choice(n, size=n_hold, replace=False))
    rest = np.setdiff1d(np.arange(n), held)
    index, trained = _new_index(x, spec, seed, rows=rest)  # queries the quantizer never saw either
    hnsw = _is_hnsw(index)
    if hnsw:  # a graph gets its rows in random order (see add_vectors)
        rest = rng.permutation(rest)
    _add_rows(index, x, rest, with_ids=not hnsw, desc="index")
    k = min(k, len(rest))
    truth = _exact_excluding(x, x[held], k, held)
    params, recall, lat, met = _sweep(index, x[held], truth, options, target, budget_ms,
                                      map_ids=rest if hnsw else None)
    _add_rows(index, x, held, with_ids=not hnsw)
    if hnsw:  # entries are in (rest, held) order: permute them back to row order
        _permute_entries(index, np.argsort(np.concatenate([rest, held])).astype(np.int64))
    return index, Tuning(params, recall, met, target, lat, budget_ms, n_hold, "held-out", k,
                         held_rows=held, train_rows=trained)


def _stored_vectors(index: faiss.Index) -> np.ndarray | None:
    """All vectors of `index` in id order (decoded; through a pre-transform), None if it cannot reconstruct."""
    if index.ntotal == 0:
        return np.zeros((0, index.d), np.float32)
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    made_map = False
    try:
        if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
            ivf.make_direct_map()
            made_map = True
        return index.reconstruct_n(0, index.ntotal)
    except RuntimeError:
        return None
    finally:
        if made_map:
            ivf.set_direct_map_type(faiss.DirectMap.NoMap)


def add_tuned(index: faiss.Index, vectors: np.ndarray, spec: str, target: float = 0.97,
              budget_ms: float | None = 1.0, n_queries: int = 1000, k: int = 10,
              seed: int = 0) -> tuple[faiss.Index, Tuning | None]:
    """Append `vectors` (ids continue the row numbers) and re-tune efSearch / nprobe as `build_tuned` does.

    A random slice of the new vectors (up to `n_queries`, at most a tenth) is held out while the
    others are added, the search parameter is swept on it against exact neighbours among the
    stored vectors plus the added ones, then the slice is added too. With fewer than
    10 x MIN_HELD_OUT new vectors the slice is drawn from the whole index instead: a graph cannot
    leave stored rows out, so the stored vectors (decoded) and the new ones are built anew by
    `build_tuned` (the cost of a build of them all). Returns (the index, now holding every row,
    its tuning); the tuning is None, the search parameters left as they were, when the index
    cannot give back its stored vectors or even all its vectors are too few to hold out
    MIN_HELD_OUT: the caller must then mark the old tuning stale.
    """
    x = normalize(vectors)
    if x.shape[1] != index.d:
        raise VaultError(f"vectors of dim {x.shape[1]} cannot go into an index of dim {index.d}")
    options = _tunable(spec, k)
    n_hold = min(n_queries, len(x) // 10)
    # the stored vectors are decoded only when they will be tuned on (a 500k vault's are 2 GB)
    old = _stored_vectors(index) if options and retune_blocker(spec, index.ntotal, len(x), n_queries) is None else None
    if not options or old is None:
        add_vectors(index, x, seed=seed)
        return index, (Tuning("", 1.0, True, target) if not options else None)
    if n_hold < MIN_HELD_OUT:  # too few new vectors: hold out from the whole index, rebuilt
        return build_tuned(np.concatenate([normalize(old), x]), spec, target=target, budget_ms=budget_ms,
                           n_queries=n_queries, k=k, seed=seed)
    n0 = index.ntotal
    rng = np.random.default_rng([seed, 13])
    held = np.sort(rng.choice(len(x), size=n_hold, replace=False))
    rest = np.setdiff1d(np.arange(len(x)), held)
    hnsw = _is_hnsw(index)
    if hnsw:  # a graph gets its rows in random order (see add_vectors)
        rest = rng.permutation(rest)
    _add_rows(index, x, rest, with_ids=not hnsw, desc="index", id_offset=n0)
    every = np.concatenate([normalize(old), x])
    k = min(k, n0 + len(rest))
    truth = _exact_excluding(every, x[held], k, n0 + held)
    map_ids = np.concatenate([np.arange(n0), n0 + rest]) if hnsw else None
    params, recall, lat, met = _sweep(index, x[held], truth, options, target, budget_ms, map_ids=map_ids)
    _add_rows(index, x, held, with_ids=not hnsw, id_offset=n0)
    if hnsw:  # entries are in (old, rest, held) order: permute the new ones back to row order
        _permute_entries(index, np.concatenate([np.arange(n0), n0 + np.argsort(np.concatenate([rest, held]))]).astype(np.int64))
    return index, Tuning(params, recall, met, target, lat, budget_ms, n_hold, "held-out", k, held_rows=n0 + held)


def _add_rows(index: faiss.Index, x: np.ndarray, rows: np.ndarray, with_ids: bool, batch: int = 65536,
              desc: str | None = None, id_offset: int = 0) -> None:
    """Add x[rows] in batches (ids `id_offset + rows` when `with_ids`), with a progress bar (named `desc`)
    when there is more than one batch."""
    from tqdm.auto import tqdm

    with tqdm(total=len(rows), unit="vec", desc=desc or "index", dynamic_ncols=True,
              disable=desc is None or len(rows) <= batch) as bar:
        for i in range(0, len(rows), batch):
            r = rows[i : i + batch]
            if with_ids:
                index.add_with_ids(x[r], (id_offset + r).astype(np.int64))
            else:
                index.add(x[r])
            bar.update(len(r))


def apply_search_params(index: faiss.Index, params: str) -> None:
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)


def write_index(index: faiss.Index, path: str | Path) -> None:
    if hasattr(faiss, "index_gpu_to_cpu") and _is_gpu(index):
        index = faiss.index_gpu_to_cpu(index)
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def read_index(path: str | Path, mmap: bool = False) -> faiss.Index:
    path = Path(path)
    if not path.is_file():
        raise VaultError(f"{path}: index file missing (rebuild the vault with `luna vault build`)")
    try:
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        return faiss.read_index(str(path), flags)
    except RuntimeError as e:
        raise VaultError(f"{path}: corrupted or unreadable faiss index ({str(e).splitlines()[0][:200]})") from e


def _is_gpu(index) -> bool:
    return "Gpu" in type(index).__name__


def maybe_to_gpu(index: faiss.Index, use_gpu: bool) -> faiss.Index:
    """Move a GPU-capable index (Flat, IVF) to every GPU when faiss-gpu is installed and asked for."""
    if not use_gpu or not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        return index
    if _is_hnsw(index):
        return index  # HNSW has no GPU implementation
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError):
        return index


def _search_params(index: faiss.Index, selector) -> object | None:
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexHNSW):
        p = faiss.SearchParametersHNSW()
        p.efSearch = inner.hnsw.efSearch
    elif isinstance(inner, faiss.IndexIVF):
        p = faiss.SearchParametersIVF()
        p.nprobe = inner.nprobe
    elif isinstance(inner, (faiss.IndexFlat, faiss.IndexScalarQuantizer)):
        p = faiss.SearchParameters()
    else:
        return None  # e.g. IndexPQ: selectors unsupported (faiss #3559)
    p.sel = selector
    return p


EXHAUSTIVE_LIMIT = 200_000  # most vectors reconstructed for an exact fallback search


def search(index: faiss.Index, queries: np.ndarray, k: int, allowed: np.ndarray | None = None):
    """Top-k (scores, ids) with -1 padding; `allowed` is a bool mask over index ids.

    With a mask, CPU indices search through an IDSelectorBitmap; indices without selector
    support (GPU, PQ) over-fetch and filter, doubling the fetch until k matches or the whole index.
    Queries an approximate index leaves short of k (a k near the index size, a very selective
    filter) are answered exactly over the reconstructed candidates when there are few enough.
    """
    q = normalize(queries)
    scores, ids = _search(index, q, k, allowed)
    available = index.ntotal if allowed is None else int(allowed.sum())
    short = np.flatnonzero((ids >= 0).sum(1) < min(k, available))
    if len(short) and available <= EXHAUSTIVE_LIMIT:
        cand = np.arange(index.ntotal) if allowed is None else np.flatnonzero(allowed)
        try:
            base = index.reconstruct_batch(cand) if len(cand) < index.ntotal else index.reconstruct_n(0, index.ntotal)
        except RuntimeError:  # index without reconstruction (no direct map): keep the approximate answer
            return scores, ids
        s, i = exact_search(base, q[short], min(k, len(cand)))
        scores[short, : s.shape[1]], ids[short, : s.shape[1]] = s, cand[i]
    return scores, ids


def _search(index: faiss.Index, q: np.ndarray, k: int, allowed: np.ndarray | None):
    if allowed is None:
        return index.search(q, k)
    n_allowed = int(allowed.sum())
    if n_allowed == 0:
        return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
    params = None if _is_gpu(index) else _search_params(index, None)
    if params is not None:
        bits = np.packbits(allowed.astype(np.uint8), bitorder="little")
        sel = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bits))
        params.sel = sel
        if isinstance(params, faiss.SearchParametersHNSW):
            # a selective filter leaves fewer candidates in the beam: widen it in proportion
            ratio = len(allowed) / max(1, n_allowed)
            params.efSearch = int(min(max(params.efSearch, k) * min(ratio, 16), 4096))
        scores, ids = index.search(q, k, params=params)
        del bits
        return scores, ids
    fetch = min(index.ntotal, max(4 * k, int(k * len(allowed) / max(1, n_allowed))))
    while True:
        scores, ids = index.search(q, fetch)
        ok = (ids >= 0) & allowed[np.clip(ids, 0, None)]
        if ok.sum(1).min() >= min(k, n_allowed) or fetch >= index.ntotal:
            break
        fetch = min(index.ntotal, fetch * 2)
    out_s = np.full((len(q), k), -np.inf, np.float32)
    out_i = np.full((len(q), k), -1, np.int64)
    for r in range(len(q)):
        s, i = scores[r][ok[r]][:k], ids[r][ok[r]][:k]
        out_s[r, : len(s)], out_i[r, : len(i)] = s, i
    return out_s, out_i
