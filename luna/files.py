"""Atomic file writes shared by every stage: a file that exists under its final name is complete."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike, tmp: str | os.PathLike | None = None):
    """Yield a temporary sibling path (or `tmp`); on success fsync it and rename it onto `path`,
    on any error remove it."""
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
