"""Atomic writes shared by every stage: a file or folder that exists under its final name is complete."""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike, tmp: str | os.PathLike | None = None):
    """Yield a temporary sibling path (or `tmp`); on success fsync it, rename it onto `path` and fsync
    the folder (so the rename itself survives a power cut), on any error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tmp) if tmp is not None else path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder's entry list, so renames into it survive a power cut (a no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(root)


@contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield an empty temporary sibling folder to build `path` in; on success fsync its files and swap it
    in (an existing `path` is moved aside only once the new folder is complete, then deleted), on any
    error remove it and leave `path` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run of this pid number
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # put the previous folder back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj, **dumps_kw) -> Path:
    """`json.dumps(obj, indent=1, **dumps_kw)` written atomically to `path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, **dumps_kw), encoding="utf-8")
    return Path(path)


def save_png_atomic(img, path: str | os.PathLike) -> Path:
    """A PIL image saved as PNG atomically to `path`."""
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)
