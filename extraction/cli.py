"""`luna extract shards=DIR out=DIR [vision=...] [text=per_checkpoint|reference] [cluster=local|lan] [inspect=true]`."""
from __future__ import annotations

import logging
import sys

from luna.cli import run_hydra


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    code = {"rc": 0}

    def task(cfg) -> None:
        from extraction.extract import extract
        from extraction.reader import CorruptShard

        logging.getLogger("extraction").setLevel(logging.INFO)
        try:
            result = extract(cfg)
        except (ValueError, CorruptShard) as e:
            print(f"luna extract: error: {e}", file=sys.stderr)
            code["rc"] = 2  # a user error: one line, exit 2 like every luna subcommand
            return
        print(summary(result))
        if result.corrupt:
            code["rc"] = 3
        if cfg.get("inspect"):
            from extraction.cli_info import info_text

            print(info_text(result.out))

    run_hydra(task, "extract", argv, prog="luna extract")
    return code["rc"]


def summary(result) -> str:
    t = result.text or {}
    lines = [
        f"extracted {result.images} images into {len(result.written)} new part(s) in {result.out}",
        f"  shards already done: {len(result.skipped_done)}, incomplete (no _stats.json): {len(result.incomplete)}, "
        f"corrupt: {len(result.corrupt)}, empty: {len(result.empty)}",
        f"  text encoder: {t.get('prompts_encoded', 0)} prompts encoded, {result.unique_prompts} unique "
        f"(prompt, encoder) pairs in the folder, encoder loads {t.get('encoder_loads', {})}",
        f"  report: {result.report}",
    ]
    if result.corrupt:
        lines += [f"  CORRUPT {c['shard']}: {c['error']}" for c in result.corrupt]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
