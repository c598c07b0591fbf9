"""SDXL conditionings of prompts with a checkpoint's frozen text encoders, the one implementation.

`TextConditioner` finds the encoders of a text-encoder fingerprint among checkpoints (each distinct
set loaded once), encodes prompts exactly as diffusers' `encode_prompt` builds the conditioning,
and counts its encoder calls. Extraction stores what it computes (`extraction/text.py`); the
projector's online targets (`data.conditionings=online`) compute the same on the training device.
"""
from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from luna.settings import get

log = logging.getLogger(__name__)

CLIP_L_COLUMNS = ("clip_l_cond", "clip_l_pooled")  # optional /prompts datasets (extraction.pairs)


class Encoded(tuple):
    """`(cond, pooled)` as before, plus optional per-prompt arrays in `.extra` (column -> [N, ...])."""

    def __new__(cls, cond, pooled, extra: dict | None = None):
        self = super().__new__(cls, (cond, pooled))
        self.extra = dict(extra or {})
        return self

    def __reduce__(self):  # crosses Ray with its extras
        return (Encoded, (self[0], self[1], self.extra))


def encode_clip_l(enc, prompts: list[str]):
    """The SD 1.x-style CLIP-L target of the same CLIP-L encoder SDXL uses: the final layer after the
    final layer norm `[B, 77, 768]` (what SD 1.x cross-attends to) and the pooled EOS state `[B, 768]`
    (what Flux takes as `vector`), float32 tensors."""
    import torch

    ids = enc.tokenizer(list(prompts), padding="max_length", max_length=enc.tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = enc.text_encoder(ids.to(next(enc.text_encoder.parameters()).device))
    return out.last_hidden_state.float(), out.pooler_output.float()


class TextEncoderNotFound(ValueError):
    """No checkpoint in `checkpoints.dirs` has the text-encoder fingerprint a sample names."""


# --- finding a checkpoint's text encoders -------------------------------------------------------
def list_checkpoints(dirs) -> list[Path]:
    """Single-file `.safetensors` and diffusers folders (with `model_index.json`) under `dirs`; an
    entry of `dirs` that is a `.safetensors` file is itself a checkpoint."""
    found: list[Path] = []
    for d in [dirs] if isinstance(dirs, (str, os.PathLike)) else list(dirs or []):
        d = Path(os.path.expanduser(str(d)))
        if d.is_file() and d.name.endswith(".safetensors"):
            found.append(d)
            continue
        if not d.is_dir():
            raise TextEncoderNotFound(f"checkpoints.dirs / data.text_encoders: {d} is neither a folder nor a "
                                      ".safetensors checkpoint")
        for root, subdirs, files in os.walk(d):
            if "model_index.json" in files:
                found.append(Path(root))
                subdirs[:] = []  # a diffusers folder's own safetensors are not checkpoints
                continue
            found += [Path(root) / f for f in files if f.endswith(".safetensors")]
    return sorted(found)


def checkpoint_name(path: Path) -> str:
    return path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.name


def _as_records(hint) -> list[dict]:
    """A sample's hint as a list of recorded checkpoints [{name, fingerprint, path, node}] (a bare name is one)."""
    if not hint:
        return []
    if isinstance(hint, str):
        return [{"name": hint}]
    if isinstance(hint, dict):
        return [hint]
    return [dict(h) if isinstance(h, dict) else {"name": str(h)} for h in hint]


class CheckpointLocator:
    """Text-encoder fingerprint -> a checkpoint that has it.

    With `dirs` (checkpoints.dirs): the checkpoints under those folders, those whose name matches the
    sample's fingerprinted first, so usually one file is hashed per fingerprint. Without: where the
    factory recorded it, in this order: the `checkpoint_path` a sample's metadata names, then the
    inventory facts cache the factory's checkpoint scan wrote (`cache`: its path, None for the
    default, False for none), whose entries give each scanned path's file and text-encoder
    fingerprints (a sample's `checkpoint_fingerprint` is its file fingerprint). A recorded file that
    is gone is an error naming the checkpoint and the recorded path."""

    def __init__(self, dirs, fingerprint_fn=None, cache=None):
        self.dirs = [dirs] if isinstance(dirs, (str, os.PathLike)) else list(dirs or [])
        self.cache = cache
        self._fingerprint = fingerprint_fn
        self._paths: list[Path] | None = None
        self._fp_of: dict[Path, str] = {}
        self._entries: dict[str, dict] | None = None

    @property
    def recorded(self) -> bool:
        """True when locations come from the factory's records (no checkpoints.dirs given)."""
        return not self.dirs

    def _fp(self, path: Path) -> str:
        if path not in self._fp_of:
            if self._fingerprint is None:
                from luna.models.fingerprint import te_fingerprint

                self._fingerprint = te_fingerprint
            self._fp_of[path] = self._fingerprint(path)
        return self._fp_of[path]

    def paths(self) -> list[Path]:
        if self._paths is None:
            self._paths = list_checkpoints(self.dirs)
        return self._paths

    # --- the factory's records ----------------------------------------------------------------
    def cache_entries(self) -> dict[str, dict]:
        """{path: {stamp, facts}} of the inventory facts cache (empty with cache=false or no cache file)."""
        if self._entries is None:
            self._entries = {}
            if self.cache is not False:
                from luna.models.inventory import FactsCache

                self._entries = dict(FactsCache(self.cache or None).entries)
        return self._entries

    def cache_path(self) -> str:
        from luna.models.inventory import default_cache_path

        return "none (checkpoints.cache=false)" if self.cache is False else str(
            Path(str(self.cache)).expanduser() if self.cache else default_cache_path())

    def _current(self, path: Path, entry: dict | None, fingerprint: str) -> bool:
        """`path` still holds encoders of `fingerprint`: its cache stamp is unchanged, or it is hashed again."""
        from luna.models.inventory import _stamp

        try:
            if entry is not None and entry.get("stamp") == _stamp(path) \
                    and (entry.get("facts") or {}).get("te_fingerprint") == fingerprint:
                return True
        except OSError:
            return False
        try:
            return self._fp(path) == fingerprint
        except Exception as e:  # noqa: BLE001 - an unreadable file is not the one we want
            log.warning("cannot fingerprint %s: %s", path, e)
            return False

    def _recorded_candidates(self, fingerprint: str, records: list[dict]) -> list[tuple[Path, str, dict | None]]:
        """(path, what recorded it, cache entry) in the order to try: sample paths, then cache entries of the
        samples' checkpoints (by file fingerprint or name), then any cache entry with these encoders."""
        entries = self.cache_entries()
        out: list[tuple[Path, str, dict | None]] = []
        for r in records:
            if r.get("path"):
                out.append((Path(r["path"]), "the samples' metadata" + (f" (node {r['node']})" if r.get("node") else ""),
                            entries.get(str(r["path"]))))
        names = {r.get("name") for r in records if r.get("name")}
        files = {r.get("fingerprint") for r in records if r.get("fingerprint")}
        mine = [(p, e) for p, e in entries.items() if (e.get("facts") or {}).get("te_fingerprint") == fingerprint]
        rank = lambda pe: (e_fp(pe[1]) not in files, checkpoint_name(Path(pe[0])) not in names, pe[0])  # noqa: E731
        for p, e in sorted(mine, key=rank):
            out.append((Path(p), f"the inventory cache {self.cache_path()}", e))
        seen, uniq = set(), []
        for c in out:
            if c[0] not in seen:
                seen.add(c[0])
                uniq.append(c)
        return uniq

    def _find_recorded(self, fingerprint: str, records: list[dict]) -> Path:
        missing = []
        for path, source, entry in self._recorded_candidates(fingerprint, records):
            if not path.exists():
                missing.append(f"{path} (recorded in {source})")
                continue
            if self._current(path, entry, fingerprint):
                return path
            missing.append(f"{path} (recorded in {source}, but its text encoders changed since)")
        names = ", ".join(repr(r["name"]) for r in records if r.get("name")) or "(unnamed)"
        if missing:
            raise TextEncoderNotFound(
                f"checkpoint {names} (text-encoder fingerprint {fingerprint!r}) is no longer where the factory "
                f"recorded it: {'; '.join(missing)}; pass checkpoints.dirs=[FOLDER] where it is now, or use "
                "text=reference text.checkpoint=PATH")
        raise TextEncoderNotFound(
            f"no recorded location for checkpoint {names} (text-encoder fingerprint {fingerprint!r}): the samples "
            f"name no checkpoint_path and the inventory cache {self.cache_path()} holds no checkpoint with these "
            "text encoders (the factory ran on another machine, or with checkpoints.cache=false); pass "
            "checkpoints.dirs=[FOLDER]")

    # --- lookups --------------------------------------------------------------------------------
    def find(self, fingerprint: str, name_hint="") -> Path:
        records = _as_records(name_hint)
        if self.recorded:
            return self._find_recorded(fingerprint, records)
        names = {r.get("name") for r in records}
        paths = self.paths()
        ordered = [p for p in paths if checkpoint_name(p) in names] + [p for p in paths if checkpoint_name(p) not in names]
        for p in ordered:
            try:
                if self._fp(p) == fingerprint:
                    return p
            except Exception as e:  # noqa: BLE001 - an unreadable file is not the one we want
                log.warning("cannot fingerprint %s: %s", p, e)
        raise TextEncoderNotFound(
            f"no checkpoint under checkpoints.dirs={self.dirs} "
            f"has text-encoder fingerprint {fingerprint!r} (samples name checkpoint "
            f"{', '.join(repr(r.get('name', '')) for r in records) or repr('')}); "
            "add its folder to checkpoints.dirs, or use text=reference text.checkpoint=PATH"
        )

    def fingerprint_of_name(self, name: str, record: dict | None = None) -> str:
        if self.recorded:
            record = dict(record or {}, name=name)
            if record.get("path") and Path(record["path"]).exists():
                return self._fp(Path(record["path"]))
            for p, e in self.cache_entries().items():
                facts = e.get("facts") or {}
                if facts.get("te_fingerprint") and (e_fp(e) == record.get("fingerprint") or checkpoint_name(Path(p)) == name) \
                        and Path(p).exists():
                    return self._fp(Path(p))
            raise TextEncoderNotFound(f"samples name checkpoint {name!r} without a te_fingerprint, and neither their "
                                      f"metadata nor the inventory cache {self.cache_path()} records where it is; "
                                      "pass checkpoints.dirs=[FOLDER]")
        for p in self.paths():
            if checkpoint_name(p) == name:
                return self._fp(p)
        raise TextEncoderNotFound(f"samples name checkpoint {name!r} without a te_fingerprint, and no checkpoint "
                                  f"of that name is under checkpoints.dirs")


def e_fp(entry: dict) -> str | None:
    """The file fingerprint of an inventory cache entry (what a sample's checkpoint_fingerprint holds)."""
    return (entry.get("facts") or {}).get("fingerprint")


# --- the conditioner ------------------------------------------------------------------------------
class TextConditioner:
    """SDXL conditionings of prompts, exactly as diffusers' `encode_prompt` builds them.

    mode="per_checkpoint": the encoders of the fingerprint each sample names, found under
    `checkpoint_dirs`, or where the factory recorded them when no folder is given
    (`checkpoint_cache`: the inventory facts cache; see CheckpointLocator); mode="reference": the
    encoders of `reference` for every sample.
    `prompts_encoded` counts prompts sent through the encoders; `loads` counts encoder-set loads.
    """

    def __init__(self, mode: str = "per_checkpoint", checkpoint_dirs=(), reference: str | None = None,
                 device: str = "cpu", dtype: str = "float32", batch_size: int = 64, keep_loaded: int = 4,
                 fingerprint_fn=None, clip_l: bool = False, checkpoint_cache=None):
        if mode not in ("per_checkpoint", "reference"):
            raise ValueError(f"text.mode must be per_checkpoint or reference, not {mode!r}")
        if mode == "reference" and not reference:
            raise ValueError("text=reference needs text.checkpoint=PATH (the checkpoint whose text encoders to use)")
        if mode == "reference" and not Path(reference).exists():
            raise TextEncoderNotFound(f"text.checkpoint={reference}: no such checkpoint")
        self.mode, self.reference = mode, reference
        self.clip_l = bool(clip_l)  # also the SD 1.x-style CLIP-L target + pooled (CLIP_L_COLUMNS)
        self.device, self.dtype, self.batch_size, self.keep_loaded = device, dtype, int(batch_size), int(keep_loaded)
        self.locator = CheckpointLocator(checkpoint_dirs, fingerprint_fn, checkpoint_cache)
        self._loaded: OrderedDict[str, object] = OrderedDict()
        self._reference_fp: str | None = None
        self.prompts_encoded = 0
        self.forward_batches = 0
        self.loads: dict[str, int] = {}
        self.sources: dict[str, str] = {}  # fingerprint -> the checkpoint its encoders were loaded from
        self.seconds = 0.0  # loading encoders and encoding
        self.dims: tuple[tuple[int, int], int] | None = None  # ((clip-l width, bigG width), pooled dim)

    def fingerprint(self, sample_fp: str, checkpoint: str = "") -> str:
        """The fingerprint whose encoders encode a sample (the key its prompt is stored under)."""
        if self.mode == "reference":
            if self._reference_fp is None:
                self._reference_fp = self.locator._fp(Path(self.reference))
            return self._reference_fp
        return sample_fp or self.locator.fingerprint_of_name(checkpoint)

    def _encoders(self, fp: str, name_hint):
        if fp in self._loaded:
            self._loaded.move_to_end(fp)
            return self._loaded[fp]
        import torch

        from luna.models.sdxl import load_text_encoders

        path = Path(self.reference) if self.mode == "reference" else self.locator.find(fp, name_hint)
        while len(self._loaded) >= max(1, self.keep_loaded):
            self._loaded.popitem(last=False)
        self.sources[fp] = str(path)
        log.info("loading text encoders %s from %s", fp, path)
        enc = load_text_encoders(path, device=self.device, dtype=getattr(torch, self.dtype))
        self.loads[fp] = self.loads.get(fp, 0) + 1
        self._loaded[fp] = enc
        return enc

    def tokenizers(self, fp: str, name_hint="") -> tuple:
        """(tokenizer, tokenizer_2) of the encoders of `fp`, without loading the encoders (the projector's
        loader tokenizes online targets' prompts in its worker processes)."""
        if fp in self._loaded:
            enc = self._loaded[fp]
            return enc.tokenizer, enc.tokenizer_2
        from luna.models.sdxl import load_tokenizers

        path = Path(self.reference) if self.mode == "reference" else self.locator.find(fp, name_hint)
        return load_tokenizers(path)

    def to(self, device) -> "TextConditioner":
        """Move the loaded encoders (and those loaded later) to `device`."""
        self.device = str(device)
        for enc in self._loaded.values():
            enc.text_encoder.to(device)
            enc.text_encoder_2.to(device)
        return self

    def encode(self, fp: str, prompts: list[str], name_hint="") -> tuple[np.ndarray, np.ndarray]:
        """(cond [N,77,C], pooled [N,P]) float32 arrays of `prompts` with the encoders of `fp`. `name_hint`: the
        checkpoint name the samples give, or their records [{name, fingerprint, path, node}]."""
        cond, pool, extra = self.encode_tensors(fp, prompts, name_hint, to="cpu", clip_l=self.clip_l)
        return Encoded(cond.numpy(), pool.numpy(), {n: v.numpy() for n, v in extra.items()} if self.clip_l else None)

    def encode_tensors(self, fp: str, prompts: list[str], name_hint="", to=None, clip_l: bool = False,
                       token_ids=None) -> tuple:
        """(cond [N,77,C], pooled [N,P], {clip_l column: [N,...]}) float32 tensors of `prompts` with the
        encoders of `fp`, each batch moved to `to` (default: stays on the encoders' device); what
        `encode` stores in pairs and what the projector's online targets train on. `token_ids`: the
        prompts already tokenized by these encoders' tokenizers (`luna.models.sdxl.tokenize`), [N, 77] each."""
        import torch

        from luna.models.sdxl import encode_ids, encode_prompt

        if token_ids is not None and clip_l:
            raise ValueError("encode_tensors: token_ids with clip_l=True (the CLIP-L target tokenizes its prompts)")
        t = time.perf_counter()
        enc = self._encoders(fp, name_hint)
        to = enc.device if to is None else torch.device(to)
        conds, pooled, extra = [], [], {n: [] for n in CLIP_L_COLUMNS}
        with torch.inference_mode():
            for i in range(0, len(prompts), self.batch_size):
                chunk = list(prompts[i : i + self.batch_size])
                if token_ids is None:
                    out = encode_prompt(enc, chunk)
                else:
                    out = encode_ids(enc, token_ids[0][i : i + self.batch_size], token_ids[1][i : i + self.batch_size])
                conds.append(out[0].float().to(to))
                pooled.append(out[1].float().to(to))
                if clip_l:
                    for n, v in zip(CLIP_L_COLUMNS, encode_clip_l(enc, chunk)):
                        extra[n].append(v.to(to))
                self.prompts_encoded += len(chunk)
                self.forward_batches += 1
        # outside inference mode: plain tensors (an inference tensor cannot be a training target)
        cond, pool = torch.cat(conds), torch.cat(pooled)
        extra = {n: torch.cat(v) for n, v in extra.items() if v}
        self.seconds += time.perf_counter() - t
        if self.dims is None:
            self.dims = (text_widths(enc, cond.shape[-1]), pool.shape[-1])
        return cond, pool, extra

    def stats(self) -> dict:
        return {"prompts_encoded": self.prompts_encoded, "forward_batches": self.forward_batches,
                "encoder_loads": dict(self.loads), "encoder_sources": dict(self.sources), "dims": self.dims,
                "seconds": round(self.seconds, 3)}


def text_widths(enc, total: int) -> tuple[int, int]:
    """(CLIP-L width, bigG width) of an encoder set; the two halves of the 2048-wide conditioning."""
    for a, b in (("text_encoder", "text_encoder_2"), ("clip_l", "clip_g")):
        ea, eb = getattr(enc, a, None), getattr(enc, b, None)
        if ea is not None and eb is not None:
            wa = getattr(getattr(ea, "config", None), "hidden_size", None)
            wb = getattr(getattr(eb, "config", None), "hidden_size", None)
            if wa and wb and wa + wb == total:
                return int(wa), int(wb)
    if total == 2048:
        return 768, 1280
    raise ValueError(f"cannot tell the CLIP-L / bigG widths of a {total}-wide conditioning")


def make_conditioner(cfg, device: str) -> TextConditioner:
    """The TextConditioner that `cfg` (conf/extract.yaml: `text.*`, `checkpoints.dirs`/`cache`) describes, on `device`."""
    text_cfg = get(cfg, "text", {})
    tdtype = str(get(text_cfg, "dtype", "auto"))
    if tdtype == "auto":
        tdtype = "float16" if str(device).startswith("cuda") else "float32"
    return TextConditioner(
        mode=str(get(text_cfg, "mode", "per_checkpoint")),
        checkpoint_dirs=list(get(get(cfg, "checkpoints", {}), "dirs", []) or []),
        checkpoint_cache=get(get(cfg, "checkpoints", {}), "cache", None),
        reference=get(text_cfg, "checkpoint"),
        device=device,
        dtype=tdtype,
        batch_size=int(get(text_cfg, "batch_size", 64)),
        keep_loaded=int(get(text_cfg, "keep_loaded", 4)),
        clip_l=bool(get(cfg, "clip_l", False)),
    )
