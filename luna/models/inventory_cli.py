"""`luna inventory dirs=[...]`: one row per model file or folder, used or skipped with the reason."""
from __future__ import annotations

import json
import sys

EXIT_USER_ERROR = 2


def _task(cfg, outcome: dict) -> None:
    from luna.models.inventory import Families, FactsCache, InventoryError, format_table, scan

    if cfg.format not in ("table", "json"):
        outcome["error"] = f"format={cfg.format!r}: use format=table or format=json"
        return
    dirs = list(cfg.dirs or [])
    if not dirs:
        outcome["error"] = "no folder given: luna inventory dirs=[/path/to/models,...]"
        return
    try:
        families = Families.load(cfg.families)
        cache = None if cfg.cache is False else FactsCache(cfg.cache)
        rows = scan(dirs, families=families, cache=cache, progress=bool(cfg.progress))
    except InventoryError as exc:
        outcome["error"] = str(exc)
        return
    if cfg.format == "json":
        print(json.dumps([r.to_dict() for r in rows], indent=1))
    else:
        print(format_table(rows))


def main(argv: list[str] | None = None) -> int:
    from luna.cli import run_hydra

    argv = list(sys.argv[1:] if argv is None else argv)
    outcome: dict = {}
    try:
        run_hydra(lambda cfg: _task(cfg, outcome), "inventory", argv, prog="luna inventory")
    except SystemExit as exc:  # Hydra printed what was wrong with the overrides
        return EXIT_USER_ERROR if exc.code not in (0, None) else 0
    if "error" in outcome:
        print(f"luna inventory: error: {outcome['error']}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
