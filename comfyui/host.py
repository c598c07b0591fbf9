"""The model host: one process-wide cache of what the Luna nodes load (seed 000's `LunaSAM3Daemon`).

Detectors, vision towers, vaults (or their Ray service clients) and projectors are loaded once
and kept across prompts, keyed by (kind, resolved path, fingerprint of the files, options): a
vault rebuilt at the same path has a new fingerprint, so the next prompt opens the new one and
the stale entry is dropped. The cache is bounded (least recently used goes first) and emptied
when ComfyUI unloads its models (the "Free model and node cache" action, or memory pressure:
`host.install_unload_hook()` chains comfy.model_management.unload_all_models).

The Ray vault service (`ray:NAME`, started with `luna vault serve`) is shared by every process
that names it; the host keeps one client per address. Nothing here imports ComfyUI at import time.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable

MAX_ENTRIES = 8


def fingerprint(path) -> str:
    """A short hash of (name, size, mtime) of a file or of every file in a folder tree (a vault,
    a projector, a detector folder); `ray:` addresses fingerprint as themselves."""
    s = str(path)
    if s.startswith("ray:"):
        return s
    p = Path(s).expanduser()
    h = hashlib.blake2b(digest_size=10)
    if p.is_file():
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    elif p.is_dir():
        for root, dirs, files in os.walk(p):
            dirs.sort()
            for f in sorted(files):
                fp = Path(root) / f
                try:
                    st = fp.stat()
                except OSError:
                    continue
                h.update(f"{fp.relative_to(p)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    else:
        return "missing"
    return h.hexdigest()


class ModelHost:
    """A bounded LRU of loaded objects keyed by (kind, path, fingerprint, options)."""

    def __init__(self, max_entries: int = MAX_ENTRIES):
        self.max_entries = int(max_entries)
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.RLock()
        self.loads = 0  # how many times a loader ran (tests: cache hits do not load)

    def get(self, kind: str, path, loader: Callable[[], object], options: tuple = ()) -> object:
        p = Path(str(path)).expanduser()
        resolved = str(p.resolve()) if p.exists() else str(path)  # names (ray:X, a tower id) stay as given
        key = (kind, resolved, fingerprint(resolved), tuple(options))
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            # a changed fingerprint at the same path: drop the stale object now
            for old in [k for k in self._items if k[0] == kind and k[1] == resolved]:
                self._release(self._items.pop(old))
            value = loader()
            self.loads += 1
            self._items[key] = value
            while len(self._items) > self.max_entries:
                self._release(self._items.popitem(last=False)[1])
            return value

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list:
        return list(self._items)

    def clear(self) -> None:
        with self._lock:
            while self._items:
                self._release(self._items.popitem()[1])

    @staticmethod
    def _release(value) -> None:
        close = getattr(value, "close", None)
        if callable(close):
            try:
                close()
            except Exception:  # a failing close must not break the prompt that evicted it
                pass


HOST = ModelHost()


def install_unload_hook() -> bool:
    """Empty HOST whenever ComfyUI unloads all its models; False when ComfyUI is not importable."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return False
    original = mm.unload_all_models
    if getattr(original, "_luna_hooked", False):
        return True

    def unload_all_models(*args, **kwargs):
        HOST.clear()
        return original(*args, **kwargs)

    unload_all_models._luna_hooked = True
    mm.unload_all_models = unload_all_models
    return True
