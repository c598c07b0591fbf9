"""LightningDataModule over a pairs folder (extraction/pairs.py): splits, statistics, loaders.

- Splits: validation prompts are held out **by prompt text** (every image of a held-out prompt,
  under every text-encoder fingerprint); a second validation set holds out whole checkpoints
  (their images of training prompts). Training sees neither.
- Conditionings are deduplicated per prompt; they are loaded into RAM when they fit in
  `max_ram_gb`, otherwise read per batch from disk. From disk, training batches are
  **chunk-shuffled** (`ChunkShuffleSampler`): images are ordered by where their prompt's
  conditioning is stored, cut into chunks of `chunk_rows` consecutive images, the chunks are
  shuffled, then the images within a window of one batch of chunks; a batch's conditionings are
  then a few contiguous runs of rows, each read in one call (`_Source.cond`), by `num_workers`
  processes. Every image is still seen once per epoch, in an order fixed by the seed and epoch;
  under DDP each rank takes every world_size-th batch of that order, all ranks as many.
- Online targets (`conditionings=online`): the loader reads image columns only, plus each batch's
  prompts' token ids gathered from RAM (every prompt tokenized once per pairs folder and tokenizers,
  stored beside the parts: `extraction.pairs.PromptTokenIds`), and the conditioning of each batch's
  prompts is computed after the batch reaches the training device
  (`on_after_batch_transfer`) by the checkpoint's frozen text encoders, found by each prompt's
  text-encoder fingerprint among `text_encoders` (checkpoints or folders of them; none: where the
  factory recorded the checkpoints, as `luna extract` finds them) and run by the
  same code extraction stores with (`luna.models.conditioner.TextConditioner`), then rounded to the
  pairs' storage dtype; an LRU cache (`online_cache_gb`) keeps prompts met again.
- Statistics per channel over the training prompts: conditioning mean/std over tokens 1..76
  (CLIP-L and bigG channels each standardised on their own), the BOS state, pooled and input
  mean/std.
- Padding positions are computed from each prompt's length with the CLIP BPE tokenizer that
  open_clip ships (the same ids as both SDXL tokenizers), truncated at 77.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
import sys
from collections import OrderedDict
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from extraction.pairs import Pairs, PromptTokenIds
from projector import metrics
from projector.splits import (COMBO, CombinationSplitError, fingerprint_rows, split_images,  # noqa: F401 - split_images re-exported
                              split_pairs, with_combinations)
from projector.targets import target_view

log = logging.getLogger(__name__)
SEQ_LEN = 77
_TORCH_DTYPES = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


def _batch_buffer(shape: tuple, dtype: np.dtype, shared: bool) -> torch.Tensor:
    """An uninitialised tensor for a batch read from disk: allocated in shared memory inside a loader
    worker (as torch's own collate does, without `share_memory_()`'s copy of the empty buffer),
    else by numpy (huge pages for large arrays)."""
    if shared:
        storage = torch.UntypedStorage._new_shared(int(np.prod(shape)) * dtype.itemsize)
        return torch.empty(0, dtype=_TORCH_DTYPES[dtype]).set_(storage).view(shape)
    return torch.from_numpy(np.empty(shape, dtype=dtype))


class PairsDataError(ValueError):
    """Pairs that cannot train a projector (too few prompts, no tokens when asked for, ...)."""


@functools.lru_cache(maxsize=1)
def _tokenizer():
    """open_clip's SimpleTokenizer, loaded from its file: importing the open_clip package (and
    timm) costs seconds and is not needed to count tokens."""
    if "open_clip.tokenizer" in sys.modules:
        return sys.modules["open_clip.tokenizer"].SimpleTokenizer()
    path = Path(importlib.util.find_spec("open_clip").origin).parent / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("_luna_open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def content_lengths(texts: list[str], seq_len: int = SEQ_LEN) -> np.ndarray:
    """Positions that are not padding, per prompt: BOS + BPE tokens + EOS, capped at `seq_len`."""
    tok = _tokenizer()
    return np.array([min(len(tok.encode(t)) + 2, seq_len) for t in texts], dtype=np.int64)


def _std(x: np.ndarray, axis) -> np.ndarray:
    s = x.std(axis=axis)
    return np.maximum(s, 1e-3 * float(s.mean()) + 1e-8)  # a constant channel must not divide by zero



class OnlineTargets:
    """Conditionings of global prompt ids computed on demand with the frozen text encoders of each
    prompt's fingerprint (`data.conditionings=online`), exactly as extraction computes the stored
    ones, rounded to `out_dtype` (the pairs' storage dtype). `check` gives every prompt its token ids,
    tokenized once and stored beside the pairs (`extraction.pairs.PromptTokenIds`); the loader adds
    each batch's ids by prompt id (`token_ids`, a gather: no tokenizer in the per-batch path), and the
    batch is completed on the training device, in the main process, from those ids. A loader worker
    gets a copy without the encoders."""

    def __init__(self, pairs: Pairs, text_encoders, device: str = "cpu", dtype: str = "auto", batch_size: int = 64,
                 cache_gb: float = 1.0, out_dtype: str = "float16"):
        from luna.models.conditioner import TextConditioner

        dirs = [text_encoders] if isinstance(text_encoders, (str, Path)) else list(text_encoders or [])
        self.dirs = [str(d) for d in dirs]  # none: where the factory recorded the checkpoints (inventory cache)
        self.texts, self.fps = pairs.prompt_text, pairs.te_fingerprint
        self.folder = pairs.parts[0].parent  # where the token ids are stored
        names: dict[str, dict] = {}  # fingerprint -> the checkpoint names its images record (ordered, once each)
        for pid, name in zip(pairs.prompt_id, pairs.checkpoint):
            names.setdefault(self.fps[int(pid)], {}).setdefault(name, None)
        self.hints = {fp: [{"name": n} for n in ns] for fp, ns in names.items()}
        self.dtype = dtype if dtype != "auto" else ("float16" if str(device).startswith("cuda") else "float32")
        self.conditioner = TextConditioner("per_checkpoint", checkpoint_dirs=self.dirs, device=str(device),
                                           dtype=self.dtype, batch_size=batch_size, keep_loaded=16)
        self.out_dtype = getattr(torch, out_dtype)
        row_bytes = (SEQ_LEN * sum(pairs.text_dims) + int(pairs.attrs["pooled_dim"])) * torch.finfo(self.out_dtype).bits // 8
        self.cache_rows = int(cache_gb * 1e9 // max(row_bytes, 1))
        self._cache: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.tokenizers: dict[str, tuple] = {}  # fingerprint -> its encoders' (tokenizer, tokenizer_2), from check()
        self.ids: tuple[np.ndarray, np.ndarray] | None = None  # [num_prompts, 77] each, by global prompt id
        self.has_ids = np.zeros(len(self.texts), dtype=bool)
        self.digests: dict[str, str] = {}  # fingerprint -> its tokenizers' fingerprint (the store's key)
        self.tokenized = 0  # prompts tokenized by check() (not found in the token-ids store)

    def check(self, prompt_ids: np.ndarray) -> None:
        """Every fingerprint of `prompt_ids` has a checkpoint under `text_encoders` (a clear error now,
        not in the first training step), and every prompt its token ids (`load_token_ids`)."""
        from luna.models.conditioner import TextEncoderNotFound

        prompt_ids = np.unique(np.asarray(prompt_ids, dtype=np.int64))
        for fp in sorted({self.fps[int(p)] for p in prompt_ids}):
            try:
                self.tokenizers[fp] = self.conditioner.tokenizers(fp, self.hints.get(fp, []))
            except TextEncoderNotFound as e:
                raise PairsDataError(f"data.conditionings=online, data.text_encoders={self.dirs or None}: {e} (the pairs "
                                     "record fingerprints and checkpoint names, not paths: data.text_encoders=PATH names "
                                     "a checkpoint or a folder of them)") from e
        self.load_token_ids(prompt_ids)

    def load_token_ids(self, prompt_ids: np.ndarray, progress: bool | None = None) -> None:
        """Token ids of `prompt_ids` from the pairs folder's store, keyed by their tokenizers'
        fingerprint; prompts it lacks are tokenized now (once: they are stored for later runs)."""
        from luna.models.sdxl import tokenize, tokenizers_fingerprint

        groups: dict[str, tuple[tuple, list[int]]] = {}  # tokenizers fingerprint -> (tokenizers, prompt ids)
        for fp, toks in self.tokenizers.items():
            if fp not in self.digests:  # ~0.1 s a pair: it hashes both tokenizers' vocabularies and merges
                self.digests[fp] = tokenizers_fingerprint(toks)
        for p in (int(p) for p in prompt_ids):
            fp = self.fps[p]
            groups.setdefault(self.digests[fp], (self.tokenizers[fp], []))[1].append(p)
        found = []
        for digest, (toks, pids) in sorted(groups.items()):
            store = PromptTokenIds(self.folder, digest)
            encode = lambda texts, toks=toks: [t.numpy() for t in tokenize(toks, texts)]  # noqa: E731
            found.append((pids, store.get([self.texts[p] for p in pids], encode, progress=progress)))
            self.tokenized += store.tokenized
        if not found:
            return
        dtype = np.result_type(*(self.ids or ()), *(a for _, got in found for a in got))
        old, self.ids = self.ids, tuple(np.zeros((len(self.texts), SEQ_LEN), dtype=dtype) for _ in range(2))
        for dst, src in zip(self.ids, old or ()):
            dst[:] = src
        for pids, got in found:
            for dst, src in zip(self.ids, got):
                dst[pids] = src
            self.has_ids[pids] = True

    @property
    def device(self) -> torch.device:
        return torch.device(self.conditioner.device)

    def to(self, device) -> None:
        device = torch.device(device)
        if device != self.device:
            self.conditioner.to(device)
            self._cache.clear()

    def token_ids(self, prompt_ids) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Token ids `[N, 77]` (int64, as `luna.models.sdxl.tokenize` gives them) of both tokenizers for
        `prompt_ids`, gathered from the stored ids (what the loader adds to a batch); None when a
        prompt has none (not given to `check`)."""
        p = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
        if self.ids is None or not self.has_ids[p].all():
            return None
        return tuple(torch.from_numpy(a[p].astype(np.int64)) for a in self.ids)

    def __call__(self, prompt_ids, token_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond [N, 77, C], pooled [N, P]) in `out_dtype` on the encoders' device; `token_ids`: the rows'
        token ids (the batch's, from `token_ids`), else the stored ones (a prompt without: tokenized here)."""
        ids = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
        if token_ids is None:
            token_ids = self.token_ids(ids)
        uniq, first, inv = np.unique(ids, return_index=True, return_inverse=True)
        missing = [int(p) for p in uniq if int(p) not in self._cache]
        fresh = {}
        by_fp: dict[str, list[int]] = {}
        for p in missing:
            by_fp.setdefault(self.fps[p], []).append(p)
        for fp in sorted(by_fp):
            pids = by_fp[fp]
            tok = None
            if token_ids is not None:  # the rows of these prompts' first images
                rows = torch.from_numpy(first[np.searchsorted(uniq, pids)])
                tok = tuple(t[rows.to(t.device)] for t in token_ids)
            with torch.random.fork_rng(devices=[]):  # loading encoders must not move the training's random stream
                cond, pooled, _ = self.conditioner.encode_tensors(fp, [self.texts[p] for p in pids], self.hints.get(fp, []),
                                                                  token_ids=tok)
            cond, pooled = cond.to(self.out_dtype), pooled.to(self.out_dtype)
            for i, p in enumerate(pids):
                fresh[p] = (cond[i], pooled[i])
        rows = []
        for p in (int(p) for p in uniq):
            if p in fresh:
                rows.append(fresh[p])
            else:
                self._cache.move_to_end(p)
                rows.append(self._cache[p])
        for p, v in fresh.items():  # cloned: a cached row must not keep its whole batch alive
            self._cache[p] = (v[0].clone(), v[1].clone())
        while len(self._cache) > self.cache_rows:
            self._cache.popitem(last=False)
        index = torch.from_numpy(inv).to(self.device)
        return torch.stack([r[0] for r in rows])[index], torch.stack([r[1] for r in rows])[index]

    def __getstate__(self):  # loader workers never encode nor tokenize: they gather stored ids
        state = self.__dict__.copy()
        state["conditioner"], state["_cache"], state["tokenizers"] = None, OrderedDict(), {}
        return state

class _Source:
    """Everything a batch is read from: image columns in RAM, conditionings in RAM, on disk or
    computed online (`online`: batches then carry no cond/pooled until `complete`)."""

    def __init__(self, pairs: Pairs, prompt_ids: np.ndarray, n_content: np.ndarray, use_tokens: bool, in_memory: bool,
                 online: OnlineTargets | None = None):
        self.pairs, self.use_tokens = pairs, use_tokens
        self.n_content = n_content  # per global prompt id
        self.online = online
        self.in_memory = in_memory and online is None
        self.cond_rows = np.full(pairs.num_prompts, -1, dtype=np.int64)
        if self.in_memory:
            ids = np.unique(prompt_ids)
            self.cond_rows[ids] = np.arange(len(ids))
            self._cond = np.concatenate([pairs.cond(c) for c in np.array_split(ids, max(1, len(ids) // 512))])
            self._pooled = np.concatenate([pairs.pooled(c) for c in np.array_split(ids, max(1, len(ids) // 512))])

    def cond(self, prompt_ids: np.ndarray) -> np.ndarray:
        if self.online is not None:
            return self.online(prompt_ids)[0].cpu().numpy()
        if self.in_memory:
            return self._cond[self.cond_rows[prompt_ids]]
        return self._read_runs("cond", prompt_ids).numpy()

    def pooled(self, prompt_ids: np.ndarray) -> np.ndarray:
        if self.online is not None:
            return self.online(prompt_ids)[1].cpu().numpy()
        if self.in_memory:
            return self._pooled[self.cond_rows[prompt_ids]]
        return self._read_runs("pooled", prompt_ids).numpy()

    def _read_runs(self, name: str, prompt_ids: np.ndarray) -> torch.Tensor:
        """Rows of `prompt_ids` read as contiguous runs: sorted by location, each run of consecutive
        rows of one file read in one call straight into the returned tensor (a row per call is what
        starves a GPU; reading the rows between two runs and copying the wanted ones out, as this
        did before, cost a second pass over the batch). The tensor is in shared memory inside a
        loader worker (no copy on the way to training), numpy's allocation (transparent huge pages:
        ~4x fewer page-fault costs on an 80 MB batch) in the training process."""
        prompt_ids = np.asarray(prompt_ids, dtype=np.int64)
        uniq, inv = np.unique(prompt_ids, return_inverse=True)
        files, rows = self.pairs.prompt_locations(uniq)
        order = np.lexsort((rows, files))
        f, r = files[order], rows[order]
        shape, dtype = self.pairs.row_shape(name)
        shared = torch.utils.data.get_worker_info() is not None
        out = _batch_buffer((len(uniq), *shape), np.dtype(dtype), shared)
        dst = out.numpy()
        cut = np.flatnonzero((np.diff(f) != 0) | (np.diff(r) != 1)) + 1
        for lo, hi in zip(np.r_[0, cut], np.r_[cut, len(order)]):
            self.pairs.read_rows(name, f[lo], r[lo], r[hi - 1] + 1, out=dst[lo:hi])
        # out holds uniq[order]; the caller wants prompt_ids' order
        pos = np.empty(len(uniq), dtype=np.int64)
        pos[order] = np.arange(len(uniq))
        want = pos[inv]
        if np.array_equal(want, np.arange(len(uniq))):
            return out
        # a prompt with several images in the batch: gathered into shared memory too inside a worker
        # (else the batch would be copied there once more on its way to the training process)
        dst = _batch_buffer((len(want), *shape), np.dtype(dtype), shared)
        return torch.index_select(out, 0, torch.from_numpy(want), out=dst)

    def storage_order(self, images: np.ndarray) -> np.ndarray:
        """A sort key of image rows by where their conditioning is stored (file, row)."""
        files, rows = self.pairs.prompt_locations(self.pairs.prompt_id[images])
        return files * (int(rows.max(initial=0)) + 1) + rows

    def inputs(self, images: np.ndarray) -> np.ndarray:
        if self.use_tokens:
            order = np.argsort(images)
            out = self.pairs.tokens(images[order])
            return out[np.argsort(order)]
        return self.pairs.embed[images]

    def batch(self, images: np.ndarray) -> dict[str, torch.Tensor]:
        pid = self.pairs.prompt_id[images]
        out = {
            "x": torch.from_numpy(np.ascontiguousarray(self.inputs(images))),
            "n_content": torch.from_numpy(self.n_content[pid]),
            "prompt": torch.from_numpy(pid),
        }
        if self.online is None:
            if self.in_memory:
                cond, pooled = (torch.from_numpy(np.ascontiguousarray(a)) for a in (self.cond(pid), self.pooled(pid)))
            else:
                cond, pooled = self._read_runs("cond", pid), self._read_runs("pooled", pid)
            out.update(cond=cond, pooled=pooled)
        else:  # online: the prompts' stored token ids (a gather; the encoders run on the training device)
            tok = self.online.token_ids(pid)
            if tok is not None:
                out["input_ids"], out["input_ids_2"] = tok
        return out

    def complete(self, batch: dict) -> dict:
        """A batch with its targets: online ones computed on the device the batch is on."""
        if self.online is not None and "cond" not in batch:
            self.online.to(batch["x"].device)
            tok = (batch["input_ids"], batch["input_ids_2"]) if "input_ids" in batch else None
            batch["cond"], batch["pooled"] = self.online(batch["prompt"].cpu().numpy(), tok)
        return batch


class _EpochForward:
    """`batch_sampler.sampler` of a `ChunkShuffleSampler`: Lightning sets the epoch on a loader's
    sampler and on its batch sampler's `sampler`, never on the batch sampler itself; this passes the
    epoch on to the batch sampler (and to a sampler Lightning injected, which orders nothing here)."""

    def __init__(self, owner: ChunkShuffleSampler, injected=None):
        self.owner, self.injected = owner, injected

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)
        if callable(getattr(self.injected, "set_epoch", None)):
            self.injected.set_epoch(epoch)


class ChunkShuffleSampler(BatchSampler):
    """Batches of dataset positions for reads from disk: positions sorted by `key` (where their
    data lies), cut into chunks of `chunk_rows` (boundaries shifted at random each epoch), chunks
    shuffled, then the positions within each window of `window` batches' worth of chunks shuffled
    and batched, each batch listed in storage order (the order within a batch does not matter to
    training). Every position once per epoch; the order depends only on (seed, epoch). With
    `batch_size` a multiple of `chunk_rows`, a batch is at most batch_size / chunk_rows + 1 runs.

    Distributed (`num_replicas` > 1): every rank draws the same epoch and takes every
    `num_replicas`-th batch from `rank`, so the ranks' batches are disjoint and cover the epoch;
    all ranks get the same number of batches (`len`), the step count DDP needs in lock-step: the
    last batches are split into smaller ones (`drop_last`: the extra last batches are dropped;
    rows are repeated only when there are fewer rows than batches to fill).
    Lightning re-creates a loader's batch sampler under DDP with its `DistributedSampler` as
    `sampler` and the other arguments as given (this class subclasses `BatchSampler` so that
    Lightning records them): its `num_replicas` and `rank` are taken, its order is not. Lightning
    calls `set_epoch` on `self.sampler` (`_EpochForward`), which sets this sampler's epoch."""

    def __init__(self, key: np.ndarray, batch_size: int, chunk_rows: int = 32, window: int = 1, seed: int = 0,
                 drop_last: bool = False, sampler=None, num_replicas: int = 1, rank: int = 0):
        if isinstance(key, Sampler):
            raise TypeError(f"ChunkShuffleSampler: key is a {type(key).__name__}, expected the storage position of "
                            "each dataset row (a sampler is passed as sampler=, as Lightning does when it re-creates "
                            "a loader that a dataloader hook returned)")
        if chunk_rows < 1 or batch_size < 1 or window < 1:
            raise PairsDataError(f"chunk_rows={chunk_rows}, batch_size={batch_size}, window={window}: expected >= 1")
        if sampler is not None and hasattr(sampler, "num_replicas") and hasattr(sampler, "rank"):
            num_replicas, rank = sampler.num_replicas, sampler.rank  # the process group Lightning runs
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise PairsDataError(f"ChunkShuffleSampler: rank {rank} of num_replicas={num_replicas}")
        self.order = np.argsort(np.asarray(key), kind="stable")
        self.batch_size, self.chunk_rows, self.window = batch_size, chunk_rows, window
        self.seed, self.epoch, self.drop_last = seed, 0, drop_last
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.sampler = _EpochForward(self, sampler)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _num_batches(self) -> int:  # of the whole epoch, before it is shared out between ranks
        n = len(self.order)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        b, r = self._num_batches(), self.num_replicas
        return b // r if self.drop_last else -(-b // r)

    def _epoch_batches(self) -> list[np.ndarray]:
        """The whole epoch's batches (every rank draws the same)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.order)
        c = self.chunk_rows
        order = np.roll(self.order, -int(rng.integers(c)))  # chunk boundaries move between epochs
        full = n // c
        chunks = [order[i * c : (i + 1) * c] for i in rng.permutation(full)]
        if n % c:  # the short chunk goes last, so windows of whole chunks stay batch-aligned
            chunks.append(order[full * c :])
        per_window = max(1, self.window * self.batch_size // self.chunk_rows)
        rows = np.concatenate([rng.permutation(np.concatenate(chunks[i : i + per_window]))
                               for i in range(0, len(chunks), per_window)]) if chunks else self.order
        return [rows[i : i + self.batch_size] for i in range(0, self._num_batches() * self.batch_size, self.batch_size)]

    def _even(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        """`batches` made a multiple of `num_replicas`: the extra ones dropped (`drop_last`), else the
        last ones' rows split into more, smaller batches (rows repeated only when too few)."""
        r = self.num_replicas
        if len(batches) % r == 0:
            return batches
        if self.drop_last:
            return batches[: len(batches) - len(batches) % r]
        need = r - len(batches) % r  # batches to add
        t = 1
        while t < len(batches) and sum(len(b) for b in batches[-t:]) < t + need:
            t += 1
        tail = np.concatenate(batches[-t:])
        if len(tail) < t + need:  # fewer rows than batches: the first ones again
            tail = np.resize(tail, t + need)
        return batches[:-t] + np.array_split(tail, t + need)

    def __iter__(self):
        batches = self._epoch_batches()
        if self.num_replicas > 1:
            batches = self._even(batches)[self.rank :: self.num_replicas]
        pos = np.empty(len(self.order), dtype=np.int64)  # storage rank of each position
        pos[self.order] = np.arange(len(self.order))
        for batch in batches:
            yield batch[np.argsort(pos[batch])].tolist()  # in storage order: read straight into the batch


_STALE_HANDLES: list = []  # a forked worker must not close (or share) the parent's HDF5 handles


def _reopen_files(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    pairs = info.dataset.source.pairs
    pairs = getattr(pairs, "_pairs", pairs)  # a target view (projector/targets.py) reads through its Pairs
    _STALE_HANDLES.append((pairs._handles, pairs._datasets))
    pairs._handles, pairs._datasets = {}, {}


class PairsDataset(Dataset):
    """Image rows of one split; a whole batch is read at once (`__getitems__`)."""

    def __init__(self, source: _Source, images: np.ndarray):
        self.source, self.images = source, np.asarray(images, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices) -> dict[str, torch.Tensor]:
        return self.source.batch(self.images[np.asarray(indices, dtype=np.int64)])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


def _whole_batch(batch):  # __getitems__ already returns the collated batch
    return batch


def available_ram_gb() -> float:
    """Memory this machine can give now (MemAvailable; physical pages free where /proc is absent), GB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9


def ram_budget_gb(value) -> float:
    """`data.max_ram_gb` in GB: a number as given, or "auto" = half the memory available now, shared by
    this machine's training processes (LOCAL_WORLD_SIZE under DDP: each loads its own copy). On one H200
    the step outruns a full-size loader from disk 3 to 1 (benchmarks/results/gpu_all.md); a campaign's
    conditionings (50k prompts x 318 KB = 16 GB) fit in half of such a machine's 128 GiB."""
    from luna.settings import number_or_auto

    try:
        gb = number_or_auto(value, "data.max_ram_gb", float, "a number of GB (0: never in RAM)")
    except ValueError as exc:
        raise PairsDataError(str(exc)) from None
    if gb is None:
        return available_ram_gb() / 2 / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return gb


class PairsDataModule(L.LightningDataModule):
    """Splits, statistics and loaders over a pairs folder; `dims` and `stats` after `setup()`."""

    def __init__(
        self,
        pairs: str,
        batch_size: int = 256,
        val_batch_size: int | None = None,
        val_prompts: float = 0.1,
        val_checkpoints: int = 1,
        input: str = "embed",
        te_fingerprint: str | None = None,
        in_memory: str | bool = "auto",
        max_ram_gb: float | str = "auto",
        num_workers: int | str = 0,
        chunk_rows: int = 32,
        stats_prompts: int = 4096,
        knn_k: int = 8,
        knn_max_queries: int = 2048,
        seed: int = 0,
        val_combinations: list | None = None,
        targets: str = "sdxl",
        conditionings: str = "stored",
        text_encoders=None,
        text_device: str = "auto",
        text_dtype: str = "auto",
        text_batch_size: int = 64,
        online_cache_gb: float = 1.0,
    ):
        super().__init__()
        if input not in {"embed", "tokens"}:
            raise PairsDataError(f"data.input must be 'embed' or 'tokens', not {input!r}")
        if conditionings not in {"stored", "online"}:
            raise PairsDataError(f"data.conditionings must be 'stored' or 'online', not {conditionings!r}")
        if conditionings == "online" and targets != "sdxl":
            raise PairsDataError(f"data.conditionings=online computes SDXL conditionings; targets={targets!r} "
                                 "(model.heads) trains on the stored ones: use data.conditionings=stored")
        self.path = Path(pairs)
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.val_prompts, self.val_checkpoints = val_prompts, val_checkpoints
        self.input, self.te_fingerprint = input, te_fingerprint
        self.in_memory, self.max_ram_gb = in_memory, ram_budget_gb(max_ram_gb)
        from luna.settings import number_or_auto

        try:
            number_or_auto(num_workers, "data.num_workers", int, "a number of loader processes (0: in this process)")
        except ValueError as exc:
            raise PairsDataError(str(exc)) from None
        self.num_workers, self.stats_prompts, self.seed = num_workers, stats_prompts, seed
        self.chunk_rows = chunk_rows
        self.knn_k, self.knn_max_queries = knn_k, knn_max_queries
        self.val_combinations = [list(c) for c in (val_combinations or [])]  # interpolation split (projector/splits.py)
        self.targets = targets  # sdxl | clip_l (projector/targets.py; set from model.heads)
        self.conditionings, self.text_encoders = conditionings, text_encoders
        self.text_device, self.text_dtype, self.text_batch_size = text_device, text_dtype, text_batch_size
        self.online_cache_gb = online_cache_gb
        self.pairs: Pairs | None = None

    # --- setup ---------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.pairs is not None:
            return
        pairs = target_view(Pairs(self.path), self.targets)
        if self.input == "tokens" and not pairs.has_tokens:
            raise PairsDataError(f"{self.path}: data.input=tokens but the pairs have no /images/tokens")
        try:  # the one implementation of the splits: `luna ab crops.split=...` samples the same (split_keys)
            splits = split_pairs(pairs, val_prompts=self.val_prompts, val_checkpoints=self.val_checkpoints,
                                 seed=self.seed, combinations=self.val_combinations, te_fingerprint=self.te_fingerprint)
        except CombinationSplitError:
            raise
        except ValueError as e:
            raise PairsDataError(f"{self.path}: {e}") from e
        keep = fingerprint_rows(pairs, self.te_fingerprint)
        texts = [pairs.prompt_text[p] for p in pairs.prompt_id[keep]]
        if not len(splits["train"]) or not len(splits["val"]):
            raise PairsDataError(
                f"{self.path}: {len(keep)} images of {len(set(texts))} prompts give {len(splits['train'])} training"
                f" and {len(splits['val'])} validation images; more prompts are needed (or change data.val_prompts)"
            )
        self.splits = splits
        n_content = content_lengths(pairs.prompt_text)
        used = pairs.prompt_id[keep]
        c = sum(pairs.text_dims)
        need_gb = len(np.unique(used)) * (SEQ_LEN * c + int(pairs.attrs["pooled_dim"])) * 2 / 1e9
        in_memory = need_gb <= self.max_ram_gb if self.in_memory == "auto" else bool(self.in_memory)
        online = None
        if self.conditionings == "online":
            device = self.text_device if self.text_device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
            online = OnlineTargets(pairs, self.text_encoders, device, self.text_dtype, self.text_batch_size,
                                   self.online_cache_gb, str(pairs.attrs.get("dtype", "float16")))
            online.check(used)
        log.info("pairs %s: %d images, %d prompts, conditionings %.2f GB %s", self.path, len(keep), len(np.unique(used)),
                 need_gb, "computed online" if online else "in RAM" if in_memory else "read per batch")
        self.source = _Source(pairs, used, n_content, self.input == "tokens", in_memory, online)
        self.pairs = pairs
        self.stats = self._compute_stats()
        self.knn = {name: self._knn_cos(rows) for name, rows in splits.items() if name != "train" and len(rows)}

    @property
    def dims(self) -> dict:
        p = self.pairs
        num_tokens = in_dim = None
        if self.input == "tokens":
            _, num_tokens, in_dim = p.tokens([0]).shape
        return {
            "input": self.input,
            "in_dim": int(in_dim or p.vision_dim),
            "vision_dim": p.vision_dim,
            "vision_model": p.vision_model,
            "num_tokens": int(num_tokens) if num_tokens else None,
            "text_dims": list(p.text_dims),
            "cond_dim": int(sum(p.text_dims)),
            "pooled_dim": int(p.attrs["pooled_dim"]),
            "seq_len": SEQ_LEN,
            "targets": self.targets,
        }

    @property
    def te_fingerprints(self) -> list[str]:
        return sorted({self.pairs.te_fingerprint[p] for p in self.pairs.prompt_id[self.splits["train"]]})

    def _compute_stats(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        train = self.splits["train"]
        prompts = np.unique(self.pairs.prompt_id[train])
        prompts = np.sort(rng.permutation(prompts)[: self.stats_prompts])
        total, total_sq, bos, count = 0.0, 0.0, 0.0, 0
        for chunk in np.array_split(prompts, max(1, len(prompts) // 256)):  # bounded memory at 77 x 2048
            cond = self.source.cond(chunk).astype(np.float64)
            body = cond[:, 1:].reshape(-1, cond.shape[-1])
            total, total_sq = total + body.sum(0), total_sq + (body**2).sum(0)
            bos, count = bos + cond[:, 0].sum(0), count + len(chunk)
        mean = total / (count * (SEQ_LEN - 1))
        std = np.sqrt(np.maximum(total_sq / (count * (SEQ_LEN - 1)) - mean**2, 0.0))
        std = np.maximum(std, 1e-3 * float(std.mean()) + 1e-8)
        pooled = self.source.pooled(prompts).astype(np.float32)
        sample = np.sort(rng.permutation(train)[: max(self.stats_prompts, 1)])
        x = self.source.inputs(sample).astype(np.float32)
        x_axes = (0, 1) if x.ndim == 3 else 0
        return {
            "input_mean": x.mean(axis=x_axes), "input_std": _std(x, x_axes),
            "cond_mean": mean.astype(np.float32), "cond_std": std.astype(np.float32), "bos": (bos / count).astype(np.float32),
            "pooled_mean": pooled.mean(0), "pooled_std": _std(pooled, 0),
        }

    def _knn_cos(self, val_rows: np.ndarray) -> float:
        """The vault's answer on this split: score-weighted mean of the k nearest training images'
        conditionings (cosine of L2-normalised embeddings), scored like `val/cos_content`."""
        train = self.splits["train"]
        q_rows = val_rows[: self.knn_max_queries]
        emb = torch.nn.functional.normalize(torch.from_numpy(self.pairs.embed[train].astype(np.float32)), dim=1)
        q = torch.nn.functional.normalize(torch.from_numpy(self.pairs.embed[q_rows].astype(np.float32)), dim=1)
        k = min(self.knn_k, len(train))
        total, count = 0.0, 0
        for start in range(0, len(q_rows), 256):
            rows = q_rows[start : start + 256]
            scores, idx = (q[start : start + 256] @ emb.T).topk(k, dim=1)
            w = scores.clamp_min(0) + 1e-6
            w = w / w.sum(1, keepdim=True)
            nbr = self.pairs.prompt_id[train[idx.numpy()]]  # [q, k]
            cond = torch.from_numpy(self.source.cond(nbr.reshape(-1)).astype(np.float32)).view(*nbr.shape, SEQ_LEN, -1)
            blend = (w[:, :, None, None] * cond).sum(1)
            pid = self.pairs.prompt_id[rows]
            target = torch.from_numpy(self.source.cond(pid).astype(np.float32))
            content, _ = metrics.content_pad_cosine(blend, target, torch.from_numpy(self.source.n_content[pid]))
            total += float(content.sum())
            count += len(rows)
        return total / max(count, 1)

    # --- loaders -------------------------------------------------------------------------
    def loader_workers(self) -> int:
        """`num_workers` as a number. "auto": 0 when batches come from RAM (in RAM or online targets: a
        worker would only add a copy between processes); from disk, every core but two (at most 8) when
        a GPU trains, so reading overlaps the step (on one H200 the full-size step ran 10,218 samples/s,
        8 workers read 3,115/s), and 0 on the CPU, where the step needs the cores (2 workers read
        2,103-2,178/s against 3,267-3,720 with none here: benchmarks/results/loader.md)."""
        from luna.settings import number_or_auto, usable_cores

        n = number_or_auto(self.num_workers, "data.num_workers", int)
        if n is not None:
            return n
        if self.source.in_memory or self.source.online is not None or not torch.cuda.is_available():
            return 0
        return max(1, min(8, usable_cores() - 2))

    def _loader(self, rows: np.ndarray, batch_size: int, shuffle: bool) -> DataLoader:
        dataset = PairsDataset(self.source, rows)
        n = self.loader_workers()
        workers = {"num_workers": n, "persistent_workers": n > 0, "worker_init_fn": _reopen_files if n > 0 else None}
        if shuffle and not self.source.in_memory and self.source.online is None and self.chunk_rows > 0:
            # under DDP each rank takes its share of the batches (Lightning re-creates the sampler with its
            # DistributedSampler, which gives the same num_replicas and rank: ChunkShuffleSampler)
            trainer = getattr(self, "trainer", None)
            world = int(getattr(trainer, "world_size", 1) or 1)
            rank = int(getattr(trainer, "global_rank", 0) or 0) if world > 1 else 0
            sampler = ChunkShuffleSampler(self.source.storage_order(rows), batch_size, self.chunk_rows, seed=self.seed,
                                          num_replicas=world, rank=rank)
            return DataLoader(dataset, batch_sampler=sampler, collate_fn=_whole_batch, **workers)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=_whole_batch,
                          drop_last=False, **workers)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Online targets are computed here, on the training device (a no-op for stored ones)."""
        return self.source.complete(batch)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.splits["train"], self.batch_size, shuffle=True)

    def val_dataloader(self):
        """[held-out prompts] (+ held-out checkpoints) (+ held-out attribute combinations), as `val_names`."""
        return [self._loader(self.splits[n], self.val_batch_size, shuffle=False) for n in self.val_names]

    @property
    def val_names(self) -> list[str]:
        """Metric prefixes of the validation loaders, in order."""
        return [n for n in ("val", "val_ckpt", COMBO) if len(self.splits.get(n, ()))]

    def teardown(self, stage: str | None = None) -> None:
        if self.pairs is not None:
            self.pairs.close()
