"""The pairs file format (DESIGN.md §2): HDF5 parts of paired image embeddings and SDXL conditionings.

One part file holds
  /images/{key, embed, prompt_id, checkpoint, category, campaign, seed}  (+ optional /images/tokens)
  /prompts/{text, te_fingerprint, cond_row}  one row per unique (prompt, text-encoder fingerprint) its images use
  /prompts/{cond, pooled}   the conditionings this part stores: row `cond_row[i]` of prompt i, or none
                            (cond_row -1) when an earlier part of the folder already stores it
  attrs: format_version, vision_model, vision_dim, text_dims (CLIP-L width, bigG width), pooled_dim
`prompt_id` indexes the part's own /prompts. A pairs folder is any number of parts (`*.h5`);
`Pairs` presents them as one dataset with prompts deduplicated across parts by (text, fingerprint).
Each (prompt, fingerprint) conditioning is stored once per folder whatever the number of parts
(format_version 2; version 1 parts, which store every prompt they use, are still read).

Optional datasets (they do not change format_version, which stays 2: a reader that does not know
them reads the file as before; a reader that needs one checks `has_*` and names the part that lacks
it; a part that stores no conditionings may lack them):
  /prompts/clip_l_cond [P, 77, 768]   CLIP-L final layer after its final norm (SD 1.x's conditioning)
  /prompts/clip_l_pooled [P, 768]     CLIP-L pooled EOS state (Flux's `vector`)
written by `luna extract clip_l=true` from the same CLIP-L encoder as the SDXL conditioning.
Parts are written to a temporary name and renamed, so a part that exists is complete.

Beside the parts, `token_ids/<tokenizers fingerprint>/ids-*.h5` (`PromptTokenIds`) keeps both SDXL
tokenizers' ids of prompt texts, written by the first projector run with online targets (it is no
part: `*.h5` is not searched below the folder).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from luna.files import atomic_path

SEQ_LEN = 77
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
PART_GLOB = "*.h5"
_STR = h5py.string_dtype(encoding="utf-8")
IMAGE_COLUMNS = ("key", "embed", "prompt_id", "checkpoint", "category", "campaign", "seed")
PROMPT_COLUMNS = ("text", "cond", "pooled", "te_fingerprint")
OPTIONAL_PROMPT_COLUMNS = ("clip_l_cond", "clip_l_pooled")
log = logging.getLogger(__name__)


class PairsFormatError(ValueError):
    """A pairs file or folder that cannot be read as this format (names the file and what is wrong)."""


@dataclass
class PairsPart:
    """The arrays of one part, in memory, ready to write."""

    images: dict[str, np.ndarray]  # IMAGE_COLUMNS (+ "tokens")
    prompts: dict[str, np.ndarray]  # PROMPT_COLUMNS (+ "cond_row": cond/pooled hold only rows >= 0)
    attrs: dict = field(default_factory=dict)  # vision_model, vision_dim, text_dims, pooled_dim, extra


def write_part(path: str | os.PathLike, part: PairsPart, dtype: str = "float16") -> Path:
    """Write one part atomically (temporary file, fsync, rename)."""
    path = Path(path)
    missing = [c for c in IMAGE_COLUMNS if c not in part.images] + [c for c in PROMPT_COLUMNS if c not in part.prompts]
    if missing:
        raise PairsFormatError(f"{path}: part is missing columns {missing}")
    n, p = len(part.images["key"]), len(part.prompts["text"])
    for k, v in part.images.items():
        if len(v) != n:
            raise PairsFormatError(f"{path}: /images/{k} has {len(v)} rows, expected {n}")
    cond_row = np.asarray(part.prompts.get("cond_row", np.arange(p)), dtype=np.int64)
    stored = int((cond_row >= 0).sum())
    if len(cond_row) != p or not np.array_equal(cond_row[cond_row >= 0], np.arange(stored)):
        raise PairsFormatError(f"{path}: /prompts/cond_row must give the stored prompts rows 0..{stored - 1} in order")
    for k, v in part.prompts.items():
        want = stored if k in ("cond", "pooled") else p
        if len(v) != want:
            raise PairsFormatError(f"{path}: /prompts/{k} has {len(v)} rows, expected {want}")
    pid = np.asarray(part.images["prompt_id"], dtype=np.int64)
    if n and (pid.min() < 0 or pid.max() >= p):
        raise PairsFormatError(f"{path}: prompt_id out of range [0, {p})")
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            img, pr = f.create_group("images"), f.create_group("prompts")
            for k in ("key", "checkpoint", "category", "campaign"):
                img.create_dataset(k, data=np.asarray(part.images[k], dtype=object), dtype=_STR)
            img.create_dataset("prompt_id", data=pid)
            img.create_dataset("seed", data=np.asarray(part.images["seed"], dtype=np.int64))
            embed = np.asarray(part.images["embed"], dtype=dtype)
            img.create_dataset("embed", data=embed, chunks=(max(1, min(n, 1024)), embed.shape[1]) if n else None)
            if "tokens" in part.images:
                tok = np.asarray(part.images["tokens"], dtype=dtype)
                img.create_dataset("tokens", data=tok, chunks=(1, *tok.shape[1:]) if n else None)
            for k in ("text", "te_fingerprint"):
                pr.create_dataset(k, data=np.asarray(part.prompts[k], dtype=object), dtype=_STR)
            pr.create_dataset("cond_row", data=cond_row)
            cond = np.asarray(part.prompts["cond"], dtype=dtype)
            pooled = np.asarray(part.prompts["pooled"], dtype=dtype)
            if not stored:  # shapes of an empty store: [0, 77, C] / [0, Pd] from the part's attrs
                width = sum(part.attrs.get("text_dims") or [cond.shape[-1] if cond.ndim == 3 else 0])
                cond = cond.reshape(0, SEQ_LEN, width)
                pooled = pooled.reshape(0, int(part.attrs.get("pooled_dim") or (pooled.shape[-1] if pooled.ndim == 2 else 0)))
            # one prompt per chunk: random reads of a single conditioning touch one chunk
            pr.create_dataset("cond", data=cond, chunks=(1, *cond.shape[1:]) if stored else None)
            pr.create_dataset("pooled", data=pooled, chunks=(1, pooled.shape[1]) if stored else None)
            for k in OPTIONAL_PROMPT_COLUMNS:
                if k in part.prompts:
                    arr = np.asarray(part.prompts[k], dtype=dtype)
                    pr.create_dataset(k, data=arr, chunks=(1, *arr.shape[1:]) if len(arr) else None)
            attrs = {"format_version": FORMAT_VERSION, **part.attrs}
            for k, v in attrs.items():
                f.attrs[k] = json.dumps(v) if isinstance(v, (dict, list, tuple)) else v
            f.flush()
    return path


def read_attrs(path: str | os.PathLike) -> dict:
    """Attributes of one part, with format and required datasets checked."""
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise PairsFormatError(f"{path}: not a readable HDF5 pairs file ({e})") from e
    with f:
        attrs = {k: _decode_attr(v) for k, v in f.attrs.items()}
        version = attrs.get("format_version")
        if version not in READ_VERSIONS:
            raise PairsFormatError(
                f"{path}: pairs format_version {version!r}, this code reads {list(READ_VERSIONS)}"
            )
        missing = [f"/images/{c}" for c in IMAGE_COLUMNS if f"images/{c}" not in f]
        missing += [f"/prompts/{c}" for c in PROMPT_COLUMNS if f"prompts/{c}" not in f]
        if version >= 2 and "prompts/cond_row" not in f:
            missing.append("/prompts/cond_row")
        if missing:
            raise PairsFormatError(f"{path}: missing datasets {missing}")
        attrs["has_tokens"] = "images/tokens" in f
        # a part that stores no conditioning (all in earlier parts) has nothing to hold them for
        attrs["has_clip_l"] = (all(f"prompts/{c}" in f for c in OPTIONAL_PROMPT_COLUMNS)
                               or ("prompts/cond" in f and f["prompts/cond"].shape[0] == 0))
    return attrs


def _decode_attr(v):
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, str) and v[:1] in "[{":
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    if isinstance(v, np.generic):
        return v.item()
    return v


def list_parts(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise PairsFormatError(f"{folder}: no such pairs folder or file")
    return sorted(p for p in folder.glob(PART_GLOB) if not p.name.startswith("."))


def _strings(ds) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else str(s) for s in ds[()]]


def read_prompt_table(f: h5py.File) -> tuple[list[str], list[str], np.ndarray]:
    """(texts, fingerprints, cond_row) of an open part; version 1 parts store every row (cond_row = i)."""
    texts, fps = _strings(f["prompts/text"]), _strings(f["prompts/te_fingerprint"])
    rows = f["prompts/cond_row"][()] if "prompts/cond_row" in f else np.arange(len(texts))
    return texts, fps, np.asarray(rows, dtype=np.int64)


class Pairs:
    """All parts of a pairs folder as one dataset.

    Image columns are loaded into memory (they are small: N x D); conditionings stay on
    disk and are read per prompt with `cond(ids)` / `pooled(ids)`.
    """

    def __init__(self, folder: str | os.PathLike):
        self.parts = list_parts(folder)
        if not self.parts:
            raise PairsFormatError(f"{folder}: no pairs parts ({PART_GLOB})")
        self.attrs = None
        cols: dict[str, list] = {c: [] for c in IMAGE_COLUMNS if c != "prompt_id"}
        prompt_id: list[np.ndarray] = []
        self.prompt_text: list[str] = []
        self.te_fingerprint: list[str] = []
        self._prompt_loc: list[tuple[int, int]] = []  # global prompt id -> (part index, cond row); (-1, -1): unknown
        index: dict[tuple[str, str], int] = {}
        for pi, path in enumerate(self.parts):
            attrs = read_attrs(path)
            if self.attrs is None:
                self.attrs = attrs
            else:
                for k in ("vision_model", "vision_dim", "text_dims", "pooled_dim"):
                    if attrs.get(k) != self.attrs.get(k):
                        raise PairsFormatError(
                            f"{path}: {k}={attrs.get(k)!r} differs from {self.parts[0].name} ({self.attrs.get(k)!r})"
                        )
            with h5py.File(path, "r") as f:
                texts, fps, cond_rows = read_prompt_table(f)
                remap = np.empty(len(texts), dtype=np.int64)
                for row, tk in enumerate(zip(texts, fps)):
                    if tk not in index:
                        index[tk] = len(self.prompt_text)
                        self.prompt_text.append(tk[0])
                        self.te_fingerprint.append(tk[1])
                        self._prompt_loc.append((-1, -1))
                    if cond_rows[row] >= 0 and self._prompt_loc[index[tk]][0] < 0:
                        self._prompt_loc[index[tk]] = (pi, int(cond_rows[row]))
                    remap[row] = index[tk]
                local = f["images/prompt_id"][()]
                prompt_id.append(remap[local] if len(local) else local.astype(np.int64))
                for c in ("key", "checkpoint", "category", "campaign"):
                    cols[c].extend(_strings(f[f"images/{c}"]))
                cols["embed"].append(f["images/embed"][()])
                cols["seed"].append(f["images/seed"][()])
        self.key = cols["key"]
        self.checkpoint, self.category, self.campaign = cols["checkpoint"], cols["category"], cols["campaign"]
        self.embed = np.concatenate(cols["embed"]) if cols["embed"] else np.zeros((0, 0), np.float16)
        self.seed = np.concatenate(cols["seed"])
        self.prompt_id = np.concatenate(prompt_id)
        self._handles: dict[int, h5py.File] = {}
        self._datasets: dict[tuple[int, str], h5py.Dataset] = {}  # (file, name) -> open dataset (read_rows)
        self._row_shapes: dict[str, tuple[tuple[int, ...], np.dtype]] = {}  # name -> row_shape(name)
        self._files = list(self.parts)  # the parts, then siblings holding conditionings they use
        if any(loc[0] < 0 for loc in self._prompt_loc):
            self._find_in_siblings(index)

    def _find_in_siblings(self, index: dict[tuple[str, str], int]) -> None:
        """Conditionings stored by parts of the same folders that were not opened (a part opened alone)."""
        mine = {p.resolve() for p in self._files}
        for path in (s for d in sorted({p.resolve().parent for p in self.parts}) for s in list_parts(d)):
            if path.resolve() in mine:
                continue
            try:
                with h5py.File(path, "r") as f:
                    texts, fps, cond_rows = read_prompt_table(f)
            except (OSError, KeyError):
                continue  # not a pairs part: it cannot hold what is missing
            fi = None
            for tk, r in zip(zip(texts, fps), cond_rows):
                g = index.get(tk)
                if g is not None and r >= 0 and self._prompt_loc[g][0] < 0:
                    if fi is None:
                        fi = len(self._files)
                        self._files.append(path)
                    self._prompt_loc[g] = (fi, int(r))
            if all(loc[0] >= 0 for loc in self._prompt_loc):
                return

    # --- sizes and identity -------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.key)

    @property
    def num_prompts(self) -> int:
        return len(self.prompt_text)

    @property
    def vision_model(self) -> str:
        return self.attrs["vision_model"]

    @property
    def vision_dim(self) -> int:
        return int(self.attrs["vision_dim"])

    @property
    def text_dims(self) -> tuple[int, int]:
        return tuple(int(x) for x in self.attrs["text_dims"])

    @property
    def has_tokens(self) -> bool:
        return all(read_attrs(p)["has_tokens"] for p in self.parts)

    # --- lazy reads ----------------------------------------------------------------------
    def _file(self, pi: int) -> h5py.File:
        if pi not in self._handles:
            # reads here are whole chunks (a prompt, an image's tokens): without a chunk cache HDF5
            # reads them straight into the caller's buffer (twice the bandwidth at [77, 2048])
            self._handles[pi] = h5py.File(self._files[pi], "r", rdcc_nbytes=0)
        return self._handles[pi]

    def prompt_locations(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """(file index, row in its /prompts/cond) of global prompt ids; a clear error for a prompt
        whose conditioning no part of the folder stores (a part was removed)."""
        loc = np.asarray(self._prompt_loc, dtype=np.int64).reshape(-1, 2)[np.atleast_1d(np.asarray(ids, dtype=np.int64))]
        if len(loc) and loc[:, 0].min() < 0:
            i = int(np.atleast_1d(np.asarray(ids))[np.flatnonzero(loc[:, 0] < 0)[0]])
            raise PairsFormatError(
                f"{self.parts[0].parent}: the conditioning of prompt {self.prompt_text[i]!r} "
                f"({self.te_fingerprint[i]}) is stored in no part of the folder (was a part removed? "
                "extract the missing shards again)")
        return loc[:, 0], loc[:, 1]

    def read_rows(self, name: str, file: int, lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows lo..hi-1 of /prompts/`name` (cond, pooled or an optional column) of one file: one contiguous read,
        into `out` (hi - lo rows) when given."""
        key = (int(file), name)
        ds = self._datasets.get(key)
        if ds is None:  # looking a dataset up by name costs as much as reading a small run
            ds = self._datasets[key] = self._file(int(file))[f"prompts/{name}"]
        if out is None:
            return ds[int(lo) : int(hi)]
        ds.read_direct(out, source_sel=np.s_[int(lo) : int(hi)])
        return out

    def row_shape(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        """(shape of one row, dtype) of /prompts/`name` as stored, read from a file that stores
        conditionings of this folder's prompts (a part whose prompts are all stored by another part
        may lack the optional columns: `luna extract clip_l=true` writes them only beside rows)."""
        if name not in self._row_shapes:
            files = sorted({fi for fi, _ in self._prompt_loc if fi >= 0})
            holding = [fi for fi in files if f"prompts/{name}" in self._file(fi)]
            if not holding:
                raise PairsFormatError(f"{self.parts[0].parent}: no part that stores conditionings has /prompts/{name} "
                                       f"({[self._files[fi].name for fi in files] or 'none stores any'})")
            ds = self._file(holding[0])[f"prompts/{name}"]
            self._row_shapes[name] = (ds.shape[1:], ds.dtype)
        return self._row_shapes[name]

    def _read_prompts(self, name: str, ids) -> np.ndarray:
        files, rows = self.prompt_locations(ids)
        out = [self._file(fi)[f"prompts/{name}"][r] for fi, r in zip(files, rows)]
        return np.stack(out) if out else np.zeros((0,), np.float16)

    def cond(self, prompt_ids) -> np.ndarray:
        """Conditionings `[len(ids), 77, sum(text_dims)]` of global prompt ids."""
        return self._read_prompts("cond", prompt_ids)

    def pooled(self, prompt_ids) -> np.ndarray:
        """Pooled projections `[len(ids), pooled_dim]` of global prompt ids."""
        return self._read_prompts("pooled", prompt_ids)

    @property
    def has_clip_l(self) -> bool:
        return all(read_attrs(p)["has_clip_l"] for p in self.parts)

    def clip_l(self, prompt_ids) -> np.ndarray:
        """SD 1.x-style CLIP-L targets `[len(ids), 77, 768]` (optional dataset; see `has_clip_l`)."""
        return self._read_prompts("clip_l_cond", prompt_ids)

    def clip_l_pooled(self, prompt_ids) -> np.ndarray:
        """CLIP-L pooled vectors `[len(ids), 768]` (optional dataset)."""
        return self._read_prompts("clip_l_pooled", prompt_ids)

    def tokens(self, image_ids) -> np.ndarray:
        """Penultimate vision tokens `[len(ids), T, W]` of image rows (global order)."""
        sizes = np.cumsum([0] + [self._file(i)["images/key"].shape[0] for i in range(len(self.parts))])
        out = []
        for g in np.atleast_1d(np.asarray(image_ids, dtype=np.int64)):
            pi = int(np.searchsorted(sizes, g, side="right") - 1)
            out.append(self._file(pi)["images/tokens"][g - sizes[pi]])
        return np.stack(out)

    def close(self) -> None:
        self._datasets.clear()
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):  # picklable for DataLoader workers: reopen files lazily
        state = self.__dict__.copy()
        state["_handles"], state["_datasets"] = {}, {}
        return state


# --- prompt token ids, beside the parts --------------------------------------------------------
TOKEN_IDS_DIR = "token_ids"
_FINGERPRINT = re.compile(r"[0-9A-Za-z_-]{1,128}")


def _compact_ids(ids, ids_2) -> tuple[np.ndarray, np.ndarray]:
    """Token ids as uint16 when every id fits (CLIP's 49,408), else int32."""
    ids, ids_2 = np.asarray(ids), np.asarray(ids_2)
    lo, hi = min(ids.min(initial=0), ids_2.min(initial=0)), max(ids.max(initial=0), ids_2.max(initial=0))
    dtype = np.uint16 if lo >= 0 and hi <= np.iinfo(np.uint16).max else np.int32
    return ids.astype(dtype, copy=False), ids_2.astype(dtype, copy=False)


class PromptTokenIds:
    """Both SDXL tokenizers' ids `[77]` of prompt texts, tokenized once per pairs folder and kept in
    `<folder>/token_ids/<tokenizers fingerprint>/ids-<digest>.h5` (what online targets train from).

    A block file holds /text [n] (utf-8), /ids and /ids_2 [n, 77] (uint16 when every id fits, else
    int32); it is written atomically, so a block that exists is complete and an interrupted run keeps
    the blocks it wrote. Ids are keyed by prompt **text** under the tokenizers' fingerprint
    (`luna.models.sdxl.tokenizers_fingerprint`): valid whatever parts are added, removed or
    re-extracted, and never reused by tokenizers that would give other ids. Prompts that no block
    holds are tokenized by `get` and written as new blocks; blocks are never rewritten."""

    def __init__(self, folder: str | os.PathLike, fingerprint: str):
        if not _FINGERPRINT.fullmatch(str(fingerprint)):
            raise PairsFormatError(f"token ids: {fingerprint!r} is not a tokenizers fingerprint (hex digest)")
        folder = Path(folder)
        self.dir = (folder if folder.is_dir() else folder.parent) / TOKEN_IDS_DIR / str(fingerprint)
        self.tokenized = 0  # prompts this object sent to the tokenizers
        self.writable = True

    def blocks(self) -> list[Path]:
        return sorted(self.dir.glob("ids-*.h5")) if self.dir.is_dir() else []

    def read(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(texts, ids [n, 77], ids_2 [n, 77]) of every block, in file-name order."""
        texts, ids, ids_2 = [], [], []
        for path in self.blocks():
            try:
                with h5py.File(path, "r") as f:
                    t, a, b = _strings(f["text"]), f["ids"][()], f["ids_2"][()]
            except (OSError, KeyError) as e:
                raise PairsFormatError(f"{path}: not a readable token-ids block ({e}); remove it to tokenize its "
                                       "prompts again") from e
            if not (len(t) == len(a) == len(b)) or a.ndim != 2 or a.shape != b.shape:
                raise PairsFormatError(f"{path}: token-ids block with {len(t)} texts, ids {a.shape}, ids_2 {b.shape}")
            texts += t
            ids.append(a)
            ids_2.append(b)
        if not ids:
            return [], np.zeros((0, SEQ_LEN), np.uint16), np.zeros((0, SEQ_LEN), np.uint16)
        return texts, np.concatenate(ids), np.concatenate(ids_2)

    def write(self, texts: list[str], ids: np.ndarray, ids_2: np.ndarray) -> Path | None:
        """One new block (None when the folder cannot be written: the ids then last this run only)."""
        ids, ids_2 = _compact_ids(ids, ids_2)
        path = self.dir / f"ids-{hashlib.sha256(chr(0).join(texts).encode()).hexdigest()[:24]}.h5"
        try:
            with atomic_path(path) as tmp:
                with h5py.File(tmp, "w") as f:
                    f.create_dataset("text", data=np.asarray(texts, dtype=object), dtype=_STR)
                    f.create_dataset("ids", data=ids)
                    f.create_dataset("ids_2", data=ids_2)
                    f.attrs["seq_len"] = ids.shape[1]
        except OSError as e:
            if self.writable:
                log.warning("cannot store token ids in %s (%s): prompts are tokenized again on every run", self.dir, e)
            self.writable = False
            return None
        return path

    def get(self, texts: list[str], tokenize, block: int = 65536, batch: int = 1024,
            progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, ids_2) `[len(texts), 77]` of `texts`: stored rows, and the prompts no block holds yet
        tokenized by `tokenize(list of texts) -> (ids [n, 77], ids_2 [n, 77])`, `batch` at a time, and
        stored every `block` prompts (a progress bar on a terminal; `progress=None`: only there)."""
        known, ids, ids_2 = self.read()
        row: dict[str, int] = {}
        for i, t in enumerate(known):
            row.setdefault(t, i)
        missing = list(dict.fromkeys(t for t in texts if t not in row))
        if missing:
            from tqdm.auto import tqdm

            start = time.perf_counter()
            new_a, new_b = [ids], [ids_2]
            bar = tqdm(total=len(missing), unit="prompt", desc="tokenizing prompts (once per pairs folder)",
                       disable=progress if progress is None else not progress, dynamic_ncols=True)
            with bar:
                for lo in range(0, len(missing), block):
                    chunk = missing[lo : lo + block]
                    parts = []
                    for i in range(0, len(chunk), batch):
                        parts.append([np.asarray(a) for a in tokenize(chunk[i : i + batch])])
                        bar.update(len(chunk[i : i + batch]))
                    a, b = (np.concatenate([p[k] for p in parts]) for k in (0, 1))
                    if a.shape != (len(chunk), SEQ_LEN) or b.shape != a.shape:
                        raise PairsFormatError(f"token ids: the tokenizers gave {a.shape} and {b.shape} for "
                                               f"{len(chunk)} prompts, expected [n, {SEQ_LEN}]")
                    a, b = _compact_ids(a, b)
                    self.write(chunk, a, b)
                    for i, t in enumerate(chunk):
                        row[t] = len(known) + lo + i
                    new_a.append(a)
                    new_b.append(b)
            self.tokenized += len(missing)
            dtype = np.result_type(*new_a, *new_b)
            ids, ids_2 = (np.concatenate([x.astype(dtype, copy=False) for x in xs]) for xs in (new_a, new_b))
            log.info("tokenized %d prompts into %s in %.1f s", len(missing), self.dir, time.perf_counter() - start)
        take = np.fromiter((row[t] for t in texts), dtype=np.int64, count=len(texts))
        return ids[take], ids_2[take]
