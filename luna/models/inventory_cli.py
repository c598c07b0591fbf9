"""`luna inventory dirs=[...]`: one row per model file or folder, used or skipped with the reason."""
from __future__ import annotations

import json
import sys


def inventory(cfg) -> None:
    """Scan `cfg.dirs` (conf/inventory.yaml) and print the table or the JSON rows."""
    from luna.models.inventory import Families, FactsCache, format_table, scan

    if cfg.format not in ("table", "json"):
        raise ValueError(f"format={cfg.format!r}: use format=table or format=json")
    dirs = list(cfg.dirs or [])
    if not dirs:
        raise ValueError("no folder given: luna inventory dirs=[/path/to/models,...]")
    families = Families.load(cfg.families)
    cache = None if cfg.cache is False else FactsCache(cfg.cache)
    rows = scan(dirs, families=families, cache=cache, progress=bool(cfg.progress))
    if cfg.format == "json":
        print(json.dumps([r.to_dict() for r in rows], indent=1))
    else:
        print(format_table(rows))


def main(argv: list[str] | None = None) -> int:
    from luna.cli import run_stage

    argv = list(sys.argv[1:] if argv is None else argv)
    return run_stage("luna inventory", "inventory", inventory, argv)  # InventoryError is a ValueError


if __name__ == "__main__":
    sys.exit(main())
