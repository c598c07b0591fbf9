"""Config plumbing shared by every stage: read a key, turn a config into plain data, pick a device.

A stage receives its settings as an OmegaConf node (from Hydra), a dict (from Python callers and
tests) or a dataclass; these three helpers read all three the same way.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def get(cfg: Any, key: str, default: Any = None) -> Any:
    """`cfg[key]` of a mapping / OmegaConf node, or `cfg.key` of an object; `default` when `cfg` is
    None, the key is missing, or its value is None (a YAML `null` means "not set")."""
    if cfg is None:
        return default
    if isinstance(cfg, Mapping) or (hasattr(cfg, "get") and not isinstance(cfg, type)):
        value = cfg.get(key, default)
    else:
        value = getattr(cfg, key, default)
    return default if value is None else value


def plain(cfg: Any) -> Any:
    """An OmegaConf node as plain dicts/lists (interpolations resolved); anything else unchanged."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def resolve_device(name: str | None) -> str:
    """`auto` (or None / "") -> "cuda" when a GPU is visible, else "cpu"; any other name unchanged."""
    if name in (None, "", "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(name)


def names(value: Any, key: str) -> list[str]:
    """A setting that is one name or a list of names (`families=pony`, `families=[base,pony]`) as a list;
    anything else is a ValueError naming `key` (a plain string is one name, not its letters)."""
    value = plain(value)
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) and v for v in items):
        raise ValueError(f"{key}={value!r}: a name or a list of names, e.g. {key}=[a,b]")
    return list(items)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS tells it, else the machine's)."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def number_or_auto(value: Any, key: str, kind: type = int, what: str = "a number") -> int | float | None:
    """A setting that is a non-negative number or "auto": None for auto (the caller decides), else the
    number; anything else (a bool, a fraction where `kind` is int, a negative, text) is a ValueError
    naming `key`. `what` says what the number counts, for the message."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError
        n = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}={value!r}: give {what} or auto") from None
    if n < 0:
        raise ValueError(f"{key}={n}: must be >= 0 or auto")
    return n
