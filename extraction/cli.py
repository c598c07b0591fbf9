"""`luna extract shards=DIR out=DIR [vision=...] [text=per_checkpoint|reference] [cluster=local|lan] [inspect=true]`.

Exit codes (`luna.cli.run_stage`): 0 done, 2 a user error (one line), 3 some shards were corrupt (listed in
the summary and the report; the others were extracted), 130 interrupted (written parts are kept).
"""
from __future__ import annotations

import logging
import sys

from factory.shards import STATS_SUFFIX, CorruptShard

PROG = "luna extract"
EXIT_CORRUPT_SHARDS = 3


def _task(cfg) -> None:
    from extraction.extract import extract
    from luna.cli import StageFailed

    logging.getLogger("extraction").setLevel(logging.INFO)
    result = extract(cfg)
    print(summary(result))
    if cfg.get("inspect"):
        from extraction.cli_info import info_text

        print(info_text(result.out))
    if result.corrupt:
        raise StageFailed(f"{len(result.corrupt)} corrupt shard(s) not extracted (listed above and in {result.report})",
                          code=EXIT_CORRUPT_SHARDS)


def main(argv: list[str] | None = None) -> int:
    from luna.cli import run_stage

    argv = list(sys.argv[1:] if argv is None else argv)
    return run_stage(PROG, "extract", _task, argv, user_errors=(CorruptShard,),
                     interrupted="written parts are kept, rerun the same command to resume")


def summary(result) -> str:
    text_stats = result.text or {}
    lines = [
        f"extracted {result.images} images into {len(result.written)} new part(s) in {result.out}",
        f"  shards already done: {len(result.skipped_done)}, incomplete (no {STATS_SUFFIX}): {len(result.incomplete)}, "
        f"corrupt: {len(result.corrupt)}, empty: {len(result.empty)}",
        f"  text encoder: {text_stats.get('prompts_encoded', 0)} prompts encoded, {result.unique_prompts} unique "
        f"(prompt, encoder) pairs in the folder, encoder loads {text_stats.get('encoder_loads', {})}",
        f"  report: {result.report}",
    ]
    if result.corrupt:
        lines += [f"  CORRUPT {bad['shard']}: {bad['error']}" for bad in result.corrupt]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
