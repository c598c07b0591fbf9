"""WebDataset shards in img2dataset's conventions (DESIGN.md §2): the one reader and writer of shard tars.

A shard is `{campaign}-{node}-{worker}-{seq:06d}.tar` in `out/shards/`, holding per sample
`key.<png|jpg|webp>`, `key.txt` (the prompt) and `key.json` (metadata), members of one sample
contiguous. The tar is written to a hidden temporary name, fsynced and renamed (luna.files); then
`{stem}_stats.json` is written (also temporary + rename): the stats file is the completion marker.
One shard holds one work unit, so a unit is done iff a stats file lists its id; a tar without
its stats file is an interrupted write, ignored and removed on the next run.

Writing: `write_shard` (tar + stats, atomically), `encode_image`, `shard_name`. Finding: `scan`,
`complete_shards`, `clean_incomplete`, `stats_path`, `read_stats`. Reading: `iter_samples` (strict:
CorruptShard on a truncated tar), `read_shard` (webdataset-style dicts of safe keys),
`find_samples` (samples by key across folders). Member names are parsed, never used as paths.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from luna.files import atomic_path, fsync_dir

FORMAT_VERSION = 1  # written into every sample's json and every stats file
READABLE_FORMAT_VERSIONS = (1,)  # shard format versions the readers understand
IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}  # written
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")  # read
STATS_SUFFIX = "_stats.json"
_TAR_END = b"\0" * (2 * tarfile.BLOCKSIZE)
_TMP_PREFIX = ".tmp-"
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_NAME_RE = re.compile(r"[^A-Za-z0-9_]+")


class ShardWriteError(OSError):
    """A shard could not be written (disk full, permission); nothing of it was kept."""


class CorruptShard(Exception):
    """A shard whose tar cannot be read to its end (truncated, bad header, short member)."""


@dataclass
class ShardSample:
    """One generated sample as a shard stores it, ready to write."""

    key: str
    image: bytes
    ext: str  # png | jpg | webp
    prompt: str
    meta: dict


@dataclass
class ShardIndex:
    """What a shards folder already holds for one campaign."""

    done_units: set[str] = field(default_factory=set)
    complete: list[Path] = field(default_factory=list)  # tars with a stats file
    incomplete: list[Path] = field(default_factory=list)  # tars without stats, temp files
    next_seq: int = 0
    keys: int = 0  # samples in complete shards
    done_keys: set[str] = field(default_factory=set)  # their keys (from the stats files)


def safe_name(text: str) -> str:
    """A name fit for a shard file name part: letters, digits, underscore."""
    return _NAME_RE.sub("_", str(text)).strip("_") or "x"


def check_key(key: str) -> str:
    if not _KEY_RE.match(key or ""):
        raise ValueError(f"sample key {key!r} must be letters, digits, '_' or '-' (no dots, no slashes)")
    return key


def shard_name(campaign: str, node: str, worker: str, seq: int) -> str:
    # '-' separates the fields, so the fields themselves use '_' only
    return f"{safe_name(campaign)}-{safe_name(node)}-{safe_name(worker)}-{seq:06d}"


def stats_path(tar_path: Path) -> Path:
    """`{stem}_stats.json` beside `{stem}.tar`: the shard's completion marker."""
    tar_path = Path(tar_path)
    stem = tar_path.name[: -len(".tar")] if tar_path.name.endswith(".tar") else tar_path.stem
    return tar_path.with_name(stem + STATS_SUFFIX)


def to_uint8(image) -> np.ndarray:
    """uint8 HxWx3 as is; float (0..1, NaN as 0, clipped) -> round(x * 255) as uint8. One float32 copy,
    converted in place (the same float32 operations, in the same order, as the expression
    `(clip(nan_to_num(x), 0, 1) * 255 + 0.5).astype(uint8)`: the same pixels)."""
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        return arr
    x = arr.astype(np.float32)  # a copy: the caller's array is left alone
    np.nan_to_num(x, copy=False)
    np.clip(x, 0.0, 1.0, out=x)
    np.multiply(x, np.float32(255.0), out=x)
    np.add(x, np.float32(0.5), out=x)
    return x.astype(np.uint8)


def encode_image(image: np.ndarray, ext: str = "png", quality: int = 95, png_level: int | None = None) -> bytes:
    """uint8 HxWx3 (or float in [0, 1]) -> encoded bytes. `png_level` 0-9 is zlib's effort
    (None: PIL's default, 6: ~27 ms for a 336 px image on one core; 1: ~15 ms, ~10% more bytes)."""
    from PIL import Image

    if ext not in IMAGE_FORMATS:
        raise ValueError(f"image format {ext!r} is not one of {sorted(IMAGE_FORMATS)}")
    if png_level is not None and not (isinstance(png_level, int) and 0 <= png_level <= 9):
        raise ValueError(f"image.png_level={png_level!r}: expected an integer 0-9 (or null for the default)")
    arr = to_uint8(image)
    buf = io.BytesIO()
    if ext == "png":
        kw = {} if png_level is None else {"compress_level": int(png_level)}
    else:
        kw = {"quality": int(quality)}
    Image.fromarray(arr).save(buf, format=IMAGE_FORMATS[ext], **kw)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _write_json_atomic(path: Path, obj: dict) -> None:
    with atomic_path(path, tmp=path.with_name(f"{_TMP_PREFIX}{path.name}")) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True), encoding="utf-8")


def write_tar(path: Path, samples: Iterable[ShardSample]) -> int:
    """Write `samples` to `path` through a temporary file; on any error nothing is left behind."""
    n = 0
    now = time.time()
    with atomic_path(path, tmp=path.with_name(f"{_TMP_PREFIX}{path.name}")) as tmp:
        with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for s in samples:
                check_key(s.key)
                _add(tar, f"{s.key}.{s.ext}", s.image, now)
                _add(tar, f"{s.key}.txt", s.prompt.encode("utf-8"), now)
                _add(tar, f"{s.key}.json", json.dumps(s.meta, sort_keys=True).encode("utf-8"), now)
                n += 1
    return n


def write_shard(path: Path, samples: list[ShardSample], stats: dict) -> Path:
    """Write the tar, then its stats file (the completion marker). Returns the stats path.

    Raises ShardWriteError (after removing whatever was written) when the disk is full or the
    folder unwritable; the unit then counts as not done.
    """
    path = Path(path)
    try:
        write_tar(path, samples)
        fsync_dir(path.parent)
        stats = dict(stats, format_version=FORMAT_VERSION, shard=path.name)
        sp = stats_path(path)
        _write_json_atomic(sp, stats)
        fsync_dir(path.parent)
    except OSError as e:
        path.unlink(missing_ok=True)
        raise ShardWriteError(e.errno, f"could not write shard {path}: {e.strerror or e}") from e
    return sp


def scan(shards_dir: Path, campaign: str | None = None) -> ShardIndex:
    """Index a shards folder: finished unit ids, interrupted writes, next free sequence number."""
    shards_dir = Path(shards_dir)
    index = ShardIndex()
    if not shards_dir.is_dir():
        return index
    prefix = f"{safe_name(campaign)}-" if campaign is not None else ""
    seqs = [-1]
    for p in sorted(shards_dir.iterdir()):
        name = p.name
        tmp = name.startswith(_TMP_PREFIX)
        base = name[len(_TMP_PREFIX):] if tmp else name
        if not base.startswith(prefix):
            continue
        if base.endswith(".tar"):
            try:
                seqs.append(int(base[: -len(".tar")].rsplit("-", 1)[1]))
            except (IndexError, ValueError):
                pass
        if tmp:
            index.incomplete.append(p)
            continue
        if not name.endswith(".tar"):
            continue
        try:
            stats = read_stats(p)
        except ValueError:  # a stats file cut short: the shard is an interrupted write
            stats = None
        if stats is None:
            index.incomplete.append(p)
            continue
        index.complete.append(p)
        index.done_units.update(stats.get("unit_ids", []))
        index.keys += int(stats.get("successes", 0))
        index.done_keys.update(stats.get("keys", []))
    index.next_seq = max(seqs) + 1
    return index


def read_stats(tar_path: str | os.PathLike) -> dict | None:
    """The parsed stats file of a shard; None when it has none (not finished). ValueError naming the
    file when it exists but cannot be read."""
    sp = stats_path(Path(tar_path))
    if not sp.is_file():
        return None
    try:
        stats = json.loads(sp.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{sp}: unreadable stats marker ({e})") from None
    if not isinstance(stats, dict):
        raise ValueError(f"{sp}: unreadable stats marker (not a JSON object)")
    return stats


def clean_incomplete(index: ShardIndex) -> list[Path]:
    """Remove interrupted writes (tars without stats, temporary files). Returns what was removed."""
    removed = []
    for p in index.incomplete:
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    index.incomplete = []
    return removed


def split_member(name: str) -> tuple[str, str]:
    """(key, extension) the webdataset way: the extension starts at the first dot of the basename."""
    folder, sep, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return f"{folder}{sep}{stem}", ext.lower()


def iter_samples(src: str | os.PathLike | bytes) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for each sample of one tar (a path or its bytes), in order, read into memory.
    Raises CorruptShard when the tar does not reach its end-of-archive marker or a member is short.
    Non-file members are ignored; keys are returned as written (check them before any other use)."""
    fh = io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else open(src, "rb")
    try:
        try:
            tf = tarfile.open(fileobj=fh, mode="r:")
        except tarfile.TarError as e:
            raise CorruptShard(f"not a tar archive ({e})") from e
        key, files = None, {}
        try:
            while True:
                m = tf.next()
                if m is None:
                    break
                if not m.isfile():
                    continue
                data = tf.extractfile(m).read()
                if len(data) != m.size:
                    raise CorruptShard(f"member {m.name!r} is truncated ({len(data)} of {m.size} bytes)")
                k, ext = split_member(m.name)
                if k != key:
                    if key is not None:
                        yield key, files
                    key, files = k, {}
                files[ext] = data
        except tarfile.TarError as e:
            raise CorruptShard(f"unreadable tar ({e})") from e
        # tarfile stops silently on a missing or short header: require the end-of-archive blocks
        fh.seek(tf.offset)
        if fh.read(len(_TAR_END)) != _TAR_END:
            raise CorruptShard(f"truncated: no end-of-archive marker at byte {tf.offset}")
        if key is not None:
            yield key, files
    finally:
        fh.close()


def read_shard(path: str | os.PathLike) -> Iterator[dict]:
    """The samples of a shard as webdataset dicts {"__key__": key, ext: bytes, ...}, read into memory.

    Samples whose key is not a shard key (a directory part, a dot, `..`) are skipped: member names
    are parsed, never used as paths. CorruptShard when the tar is cut short."""
    for key, files in iter_samples(path):
        if _KEY_RE.match(key):
            yield {"__key__": key, **files}


def find_samples(keys: Iterable[str], folders: Iterable[str | os.PathLike]) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of the wanted `keys` found in the shard tars of `folders` (finished or not;
    missing keys are absent; a folder that is gone or a tar that cannot be read is passed over)."""
    wanted, found = set(keys), {}
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for tar_path in sorted(folder.glob("*.tar")):
            if tar_path.name.startswith(".") or not wanted - set(found):
                continue
            try:
                for sample in read_shard(tar_path):
                    key = sample.pop("__key__")
                    if key in wanted and key not in found:
                        found[key] = sample
            except (OSError, CorruptShard):
                continue
    return found


def complete_shards(shards_dir: str | os.PathLike, campaign: str | None = None) -> list[Path]:
    """The finished shards of a folder (those with a stats file), in name order."""
    return scan(Path(shards_dir), campaign).complete
