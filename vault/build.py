"""Build a vault from pairs folders, or add new pairs parts to an existing vault without a rebuild.

Every add writes a new generation of index/metadata/prompt files next to the old ones and
commits by replacing manifest.json; the previous generation is removed afterwards, so a
crash leaves the last committed vault intact.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from extraction.pairs import Pairs, PairsFormatError, list_parts, read_attrs
from luna.files import atomic_dir
from vault import index as vindex
from vault.manifest import MANIFEST, MODES, Manifest, VaultError
from vault.store import Metadata, read_prompts, write_cond_file, write_prompts

log = logging.getLogger(__name__)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60] or "_"


def _code(table: list[str], values: list[str]) -> np.ndarray:
    """Codes of `values` in `table`, appending unseen names to the table."""
    pos = {v: i for i, v in enumerate(table)}
    out = np.empty(len(values), dtype=np.int32)
    for j, v in enumerate(values):
        if v not in pos:
            pos[v] = len(table)
            table.append(v)
        out[j] = pos[v]
    return out


def build_vault(pairs, out, index: str | None = None, mode: str | None = None, memory_budget="4G",
                categories: bool | None = None, tune_recall: float = 0.97, shards=None, rebuild: bool = False,
                seed: int = 0, tune_latency_ms: float | None = 1.0, tune_queries: int = 1000) -> Manifest:
    """Build `out` from the parts of `pairs` (a folder, a part file, or a list of them).

    If `out` already is a vault (and not `rebuild`), only parts it does not list yet are
    added (see `add_pairs`). `index` is a faiss index_factory string; None chooses by size
    and `memory_budget` as autofaiss does. `mode`: "stored" keeps fp16 conditionings,
    "prompts" keeps only prompt texts for re-encoding at query time (None: "stored" for a new vault,
    the vault's own when adding); `categories` None means True for a new vault, the vault's own when
    adding; an explicit `index`, `mode` or `categories` that differs from an existing vault's is an error
    (rebuild=True to change them). efSearch / nprobe are tuned
    on held-out vectors to recall@10 >= `tune_recall` within `tune_latency_ms` per query (p50,
    one thread); a target that cannot be met is a warning and is recorded in the manifest.
    """
    out = Path(out)
    if mode is not None and mode not in MODES:
        raise VaultError(f"mode={mode!r}: expected one of {MODES}")
    tune = _tune_args(tune_recall, tune_latency_ms, tune_queries)
    if (out / MANIFEST).exists() and not rebuild:
        _check_same(out, Manifest.read(out), index=index, mode=mode, categories=categories)
        return add_pairs(out, pairs, shards=shards, tune_recall=tune_recall, seed=seed,
                         tune_latency_ms=tune_latency_ms, tune_queries=tune_queries)
    mode = mode or "stored"
    categories = True if categories is None else categories
    parts = _collect_parts(pairs)
    with atomic_dir(out) as tmp:  # an existing vault is replaced only once the new one is complete
        first = Pairs(parts[0])
        manifest = Manifest(
            vision_model=str(first.vision_model), vision_dim=first.vision_dim, text_dims=list(first.text_dims),
            pooled_dim=int(first.attrs["pooled_dim"]), mode=mode, index_spec=index or "",
            memory_budget=vindex.parse_bytes(memory_budget),
        )
        manifest.shard_folders = [str(s) for s in _as_list(shards)] or _shard_folders(parts)
        first.close()
        _add(tmp, manifest, None, parts, index_override=index, categories=categories, tune=tune, seed=seed)
    return manifest


def _check_same(out: Path, manifest: Manifest, **asked) -> None:
    """An add keeps the vault's index, mode and categories: an explicit different value is an error."""
    has = {"index": manifest.index_spec, "mode": manifest.mode, "categories": bool(manifest.categories)}
    for key, value in asked.items():
        if value is not None and value != has[key]:
            raise VaultError(
                f"{key}={value!r}: {out} is an existing vault with {key}={has[key]!r}; adding pairs keeps it "
                f"(leave {key} unset, or pass rebuild=true to build the vault anew)"
            )


def add_pairs(vault_dir, pairs, shards=None, tune_recall: float = 0.97, seed: int = 0,
              tune_latency_ms: float | None = 1.0, tune_queries: int = 1000) -> Manifest:
    """Add the parts of `pairs` that the vault does not hold yet (incremental, no rebuild)."""
    vault_dir = Path(vault_dir)
    tune = _tune_args(tune_recall, tune_latency_ms, tune_queries)
    manifest = Manifest.read(vault_dir)
    new = [p for p in _collect_parts(pairs) if str(p.resolve()) not in set(manifest.sources)]
    for s in [str(s) for s in _as_list(shards)] or _shard_folders(new):
        if str(s) not in manifest.shard_folders:
            manifest.shard_folders.append(str(s))
    if not new:
        log.info("%s: no new pairs parts to add", vault_dir)
        return manifest
    meta = Metadata.read(vault_dir / manifest.files["metadata"])
    _add(vault_dir, manifest, meta, new, index_override=None, categories=bool(manifest.categories),
         tune=tune, seed=seed)
    return manifest


def _tune_args(recall: float, latency_ms: float | None, queries: int) -> dict:
    if not 0.0 < float(recall) <= 1.0:
        raise VaultError(f"tune_recall={recall!r}: expected a recall in (0, 1]")
    if latency_ms is not None and float(latency_ms) <= 0:
        raise VaultError(f"tune_latency_ms={latency_ms!r}: expected a positive number of milliseconds (or null)")
    return {"target": float(recall), "budget_ms": None if latency_ms is None else float(latency_ms),
            "n_queries": int(queries)}


def _report_tuning(what: str, t: vindex.Tuning) -> None:
    if t.met:
        if t.method != "exact":
            log.info("%s tuned: %s", what, t.describe())
        return
    budget = f" within the latency budget of {t.budget_ms:g} ms" if t.budget_ms is not None else ""
    log.warning("%s: recall@%d target %.3f not met%s; using %s (raise tune_latency_ms, lower tune_recall, "
                "or choose another index=)", what, t.k, t.target, budget, t.describe())


def _add_retuned(what: str, index, x: np.ndarray, spec: str, old: dict, tune: dict, seed: int):
    """Add `x` to `index`, re-tuning its search parameters on held-out vectors: (the index, its tuning or None)."""
    n0 = index.ntotal
    index, tuning = vindex.add_tuned(index, x, spec, seed=seed, **tune)
    if tuning is None:
        why = (vindex.retune_blocker(spec, n0, len(x), tune["n_queries"])
               or "the index cannot return its stored vectors to re-tune on")
        log.warning("%s: search parameters %s kept from before this add (%s); its recorded recall %s is stale",
                    what, old.get("params") or "-", why, old.get("recall", "-"))
    else:
        if tuning.method == "held-out" and len(x) < 10 * vindex.MIN_HELD_OUT:
            log.info("%s: %d new vectors are too few to tune on; rebuilt over all %d to tune on held-out ones",
                     what, len(x), index.ntotal)
        _report_tuning(f"{what} after the add", tuning)
    return index, tuning


def _check_budget(what: str, spec: str, n_before: int, n_after: int, d: int, budget: int) -> None:
    """An add keeps the index type: refuse one that would take an index within `budget` over it."""
    before, after = vindex.index_bytes(spec, n_before, d), vindex.index_bytes(spec, n_after, d)
    if not budget or after is None or after <= budget or before > budget:
        return  # no budget recorded, a spec it does not size, or over it from the build (index= chosen by hand)
    raise VaultError(
        f"memory_budget={budget}: {what} {spec} over {n_after} x {d} vectors would take about {after:,} bytes "
        f"after this add, over the vault's memory_budget of {budget:,} bytes; an add keeps the index type: rebuild "
        f"the vault from all its pairs (`luna vault build pairs=... out=... rebuild=true memory_budget={budget}` "
        f"chooses an index that fits, or give a larger memory_budget=)"
    )


def _shards_of(attrs: dict) -> list[str]:
    """The shard folder a pairs part's attrs record (extraction writes `shards_dir`, the folder it read)."""
    return [str(attrs["shards_dir"])] if attrs.get("shards_dir") else []


def _shard_folders(parts: list[Path]) -> list[str]:
    """The shard folders the parts record, in order, each once."""
    out: list[str] = []
    for part in parts:
        try:
            attrs = read_attrs(part)
        except PairsFormatError as e:
            raise VaultError(str(e)) from e
        out.extend(s for s in _shards_of(attrs) if s not in out)
    return out


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _collect_parts(pairs) -> list[Path]:
    parts: list[Path] = []
    for p in _as_list(pairs):
        try:
            parts.extend(list_parts(p))
        except PairsFormatError as e:
            raise VaultError(str(e)) from e
    if not parts:
        raise VaultError(f"pairs={pairs}: no pairs parts (*.h5) found; an empty vault cannot be built")
    return [p.resolve() for p in parts]


def _add(folder: Path, manifest: Manifest, meta: Metadata | None, parts: list[Path], index_override,
         categories, tune: dict, seed: int) -> None:
    gen = manifest.generation + 1 if meta is not None else 1
    prompt_pos = {}
    text, fps = [], []
    if meta is not None:
        text, fps = read_prompts(folder / manifest.files["prompts"])
        prompt_pos = {tf: i for i, tf in enumerate(zip(text, fps))}
    cond_rows: list[tuple[int, int]] = []
    pairs_list, embeds = [], []
    cols = {"key": [], "prompt_id": [], "checkpoint": [], "category": [], "campaign": []}
    cat_table = list(manifest.category_table)
    for part in parts:
        try:
            pairs = Pairs(part)
        except PairsFormatError as e:
            raise VaultError(str(e)) from e
        if pairs.vision_model != manifest.vision_model or pairs.vision_dim != manifest.vision_dim:
            raise VaultError(
                f"{part}: embeddings of {pairs.vision_model} (dim {pairs.vision_dim}) cannot join a vault of "
                f"{manifest.vision_model} (dim {manifest.vision_dim})"
            )
        if list(pairs.text_dims) != list(manifest.text_dims):
            raise VaultError(f"{part}: text dims {list(pairs.text_dims)} differ from the vault's {manifest.text_dims}")
        if int(pairs.attrs["pooled_dim"]) != manifest.pooled_dim:
            raise VaultError(f"{part}: pooled dim {int(pairs.attrs['pooled_dim'])} differs from the vault's "
                             f"{manifest.pooled_dim}")
        pi = len(pairs_list)
        pairs_list.append(pairs)
        remap = np.empty(pairs.num_prompts, dtype=np.int64)
        for j, tf in enumerate(zip(pairs.prompt_text, pairs.te_fingerprint)):
            if tf not in prompt_pos:
                prompt_pos[tf] = len(text)
                text.append(tf[0])
                fps.append(tf[1])
                cond_rows.append((pi, j))
            remap[j] = prompt_pos[tf]
        embeds.append(vindex.normalize(pairs.embed))
        cols["key"].extend(pairs.key)
        cols["prompt_id"].append(remap[pairs.prompt_id])
        cols["checkpoint"].append(_code(manifest.checkpoints, pairs.checkpoint))
        cols["category"].append(_code(cat_table, pairs.category))
        cols["campaign"].append(_code(manifest.campaigns, pairs.campaign))
    x = np.concatenate(embeds)
    if len(x) == 0:
        raise VaultError(f"{parts[0]}: pairs hold no images; an empty vault cannot be built")
    new = Metadata(
        key=np.array(cols["key"], dtype=object), prompt_id=np.concatenate(cols["prompt_id"]),
        checkpoint=np.concatenate(cols["checkpoint"]), category=np.concatenate(cols["category"]),
        campaign=np.concatenate(cols["campaign"]),
        centroid_sum=np.zeros((len(cat_table), x.shape[1])),
    )
    np.add.at(new.centroid_sum, new.category, x.astype(np.float64))
    if meta is not None:
        old_sum = np.zeros_like(new.centroid_sum)
        old_sum[: len(meta.centroid_sum)] = meta.centroid_sum
        new.centroid_sum += old_sum
        new = Metadata(
            key=np.concatenate([meta.key, new.key]), prompt_id=np.concatenate([meta.prompt_id, new.prompt_id]),
            checkpoint=np.concatenate([meta.checkpoint, new.checkpoint]),
            category=np.concatenate([meta.category, new.category]),
            campaign=np.concatenate([meta.campaign, new.campaign]), centroid_sum=new.centroid_sum,
        )
    offset = manifest.count
    written: list[str] = []
    if meta is not None:  # before anything is written (category indices, with their shares, grow alike)
        _check_budget("global index", manifest.index_spec, offset, len(new), x.shape[1], manifest.memory_budget)

    # global index
    idx_dir = folder / "index"
    gname = f"index/global.g{gen}.faiss"
    if meta is None:
        spec = index_override or vindex.choose_index_spec(len(x), x.shape[1], manifest.memory_budget)
        log.info("building global index %s over %d x %d", spec, *x.shape)
        g, tuning = vindex.build_tuned(x, spec, seed=seed, **tune)
        _report_tuning(f"global index {spec}", tuning)
        manifest.index_spec = spec
        manifest.search_params, manifest.tuned_recall = tuning.params, tuning.recall
        manifest.tuning = tuning.as_dict()
    else:
        g = vindex.read_index(folder / manifest.files["global"])
        g, tuning = _add_retuned(f"global index {manifest.index_spec}", g, x, manifest.index_spec, manifest.tuning,
                                 tune, seed)
        if tuning is not None:
            manifest.search_params, manifest.tuned_recall = tuning.params, tuning.recall
            manifest.tuning = tuning.as_dict()
        else:
            manifest.tuning = {**manifest.tuning, "stale": True}
    vindex.write_index(g, folder / gname)
    written.append(gname)
    del g

    # category indices
    cat_info = dict(manifest.categories)
    if categories:
        for code, name in enumerate(cat_table):
            rows = np.flatnonzero(new.category[offset:] == code)
            if not len(rows):
                continue
            fname = f"index/cat-{code:03d}-{_safe(name)}.g{gen}.faiss"
            info = cat_info.get(name)
            if info is None:
                auto = vindex.choose_index_spec(
                    len(rows), x.shape[1], max(1, manifest.memory_budget * len(rows) // max(1, len(x))))
                spec = index_override or auto
                ivf = re.search(r"IVF(\d+)", spec)
                if ivf and int(ivf.group(1)) * 39 > len(rows):  # too few points to train the override's clusters
                    spec = auto
                try:
                    ci, tuning = vindex.build_tuned(x[rows], spec, seed=seed, **tune)
                except (VaultError, RuntimeError) as e:  # e.g. too few vectors to train the override
                    log.warning("category %s: index %s failed (%s); using %s", name, spec, e, auto)
                    spec = auto
                    ci, tuning = vindex.build_tuned(x[rows], spec, seed=seed, **tune)
                _report_tuning(f"category {name!r} index {spec}", tuning)
                info = {"count": 0, "index_spec": spec, "search_params": tuning.params,
                        "tuning": tuning.as_dict()}
            else:
                ci = vindex.read_index(folder / info["file"])
                ci, tuning = _add_retuned(f"category {name!r} index {info['index_spec']}", ci, x[rows],
                                          info["index_spec"], info.get("tuning") or {}, tune, seed)
                if tuning is not None:
                    info = {**info, "search_params": tuning.params, "tuning": tuning.as_dict()}
                else:
                    info = {**info, "tuning": {**(info.get("tuning") or {}), "stale": True}}
            info = {**info, "count": int(info["count"] + len(rows)), "file": fname}
            vindex.write_index(ci, folder / fname)
            written.append(fname)
            cat_info[name] = info
    # categories with no new rows keep their files
    manifest.categories = {name: cat_info[name] for name in cat_table if name in cat_info}
    manifest.category_table = cat_table

    # conditioning store (stored mode): only the prompts new in this add
    if manifest.mode == "stored" and cond_rows:
        cname = f"cond-{len(manifest.cond_files):05d}.h5"
        seq = pairs_list[cond_rows[0][0]].cond([cond_rows[0][1]]).shape[1]
        write_cond_file(folder / cname, pairs_list, cond_rows, seq, sum(manifest.text_dims), manifest.pooled_dim)
        manifest.cond_files.append(cname)
    for p in pairs_list:
        p.close()

    mname, pname = f"metadata.g{gen}.h5", f"prompts.g{gen}.h5"
    new.write(folder / mname)
    write_prompts(folder / pname, text, fps)
    old_files = dict(manifest.files)
    manifest.files = {"global": gname, "metadata": mname, "prompts": pname}
    manifest.generation = gen
    manifest.count = len(new)
    manifest.num_prompts = len(text)
    manifest.te_fingerprints = sorted(set(fps))
    manifest.sources = [*manifest.sources, *(str(p) for p in parts)]
    manifest.write(folder)  # the commit point
    keep = set(manifest.files.values()) | {i["file"] for i in manifest.categories.values()}
    for f in [*old_files.values(), *(i.get("file") for i in cat_info.values())]:
        if f and f not in keep:
            (folder / f).unlink(missing_ok=True)
    for f in (folder / "index").glob("*.faiss"):
        if f"index/{f.name}" not in keep:
            f.unlink(missing_ok=True)


def drop_conditionings(vault_dir) -> Manifest:
    """Turn a stored vault into a prompts-only one in place (same indices, no conditioning store)."""
    vault_dir = Path(vault_dir)
    manifest = Manifest.read(vault_dir)
    old = list(manifest.cond_files)
    manifest.mode, manifest.cond_files = "prompts", []
    manifest.write(vault_dir)  # commit first: a crash leaves a valid vault either way
    for name in old:
        (vault_dir / name).unlink(missing_ok=True)
    return manifest
