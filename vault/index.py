"""FAISS indices: the autofaiss-style choice of index type, build, search tuning, filtered search, I/O.

Vectors are L2-normalised and searched by inner product (= cosine similarity).
"""
from __future__ import annotations

import math
import re
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
    if n < 1_000_000 and n * (4 * d + 8) + k * 4 * d <= memory_budget:
        return f"IVF{k},Flat"
    for pq in (256, 128, 64, 32, 16, 8):
        if d % pq == 0 and n * (pq + 8) + k * 4 * d <= memory_budget:
            return f"OPQ{pq},IVF{k}_HNSW32,PQ{pq}x8"
    raise VaultError(
        f"no index of {n} x {d} vectors fits memory_budget={memory_budget} bytes; raise memory_budget"
    )


def _train_size(spec: str, n: int) -> int:
    m = re.search(r"IVF(\d+)", spec)
    if not m:
        return min(n, 100_000)
    return min(n, int(m.group(1)) * 100)


HNSW_EF_CONSTRUCTION = 80  # faiss' default 40 leaves well-separated clusters poorly linked (efSearch 512 for 0.99)


def build_index(vectors: np.ndarray, spec: str, seed: int = 0) -> faiss.Index:
    """Train (on a random sample, up to 100 points per IVF cluster) and fill an IP index."""
    x = normalize(vectors)
    n, d = x.shape
    try:
        index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise VaultError(f"index={spec!r}: not a valid faiss index_factory string for dim {d} ({e})") from e
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efConstruction = max(inner.hnsw.efConstruction, HNSW_EF_CONSTRUCTION)
    m = re.search(r"IVF(\d+)", spec)
    if m and int(m.group(1)) > n:
        raise VaultError(f"index={spec!r}: {m.group(1)} IVF clusters need at least as many vectors (have {n})")
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = x[rng.choice(n, size=_train_size(spec, n), replace=False)] if n else x
        index.train(sample)
    add_vectors(index, x)
    return index


def add_vectors(index: faiss.Index, vectors: np.ndarray, batch: int = 65536) -> None:
    x = normalize(vectors)
    if x.shape[1] != index.d:
        raise VaultError(f"vectors of dim {x.shape[1]} cannot go into an index of dim {index.d}")
    for i in range(0, len(x), batch):
        index.add(x[i : i + batch])


def exact_search(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k (the ground truth for recall)."""
    flat = faiss.IndexFlatIP(base.shape[1])
    flat.add(normalize(base))
    return flat.search(normalize(queries), k)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's true top-k found in its returned top-k."""
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t)) / k for f, t in zip(found, truth)]))


def _tunable(spec: str) -> list[str]:
    if "IVF" in spec:
        nlist = int(re.search(r"IVF(\d+)", spec).group(1))
        return [f"nprobe={p}" for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if p <= nlist]
    if spec.startswith("HNSW") or ",HNSW" in spec:
        return [f"efSearch={e}" for e in (32, 48, 64, 96, 128, 192, 256, 384, 512)]
    return []


def tune_search(index: faiss.Index, vectors: np.ndarray, spec: str, k: int = 10, target: float = 0.99,
                n_queries: int = 200, seed: int = 0) -> tuple[str, float]:
    """Smallest nprobe / efSearch reaching recall@k >= target on held-in sample queries.

    Queries are stored vectors with small noise (so the nearest item is not trivially the
    query itself). Returns (faiss ParameterSpace string, measured recall); ("", 1.0) for exact indices.
    """
    options = _tunable(spec)
    if not options or len(vectors) == 0:
        return "", 1.0
    rng = np.random.default_rng(seed)
    x = normalize(vectors)
    q = x[rng.choice(len(x), size=min(n_queries, len(x)), replace=False)]
    q = normalize(q + rng.standard_normal(q.shape, dtype=np.float32) * (0.05 / math.sqrt(x.shape[1])))
    k = min(k, len(x))
    _, truth = exact_search(x, q, k)
    space = faiss.ParameterSpace()
    recall = 0.0
    for opt in options:
        space.set_index_parameters(index, opt)
        _, found = index.search(q, k)
        recall = recall_at(found, truth)
        if recall >= target:
            return opt, recall
    return options[-1], recall


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
    if isinstance(faiss.downcast_index(index), (faiss.IndexHNSW,)):
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
