"""`luna pairs-info DIR`: counts, unique prompts, per-category counts and bytes per sample of a pairs folder.

A plain argparse command (one positional folder, no config to compose), with `luna.cli`'s exit codes."""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from extraction.pairs import Pairs, PairsFormatError


def pairs_info(folder) -> dict:
    """Statistics of a pairs folder as plain data."""
    with Pairs(folder) as p:
        size = sum(part.stat().st_size for part in p.parts)
        n = len(p)
        return {
            "folder": str(folder),
            "parts": len(p.parts),
            "images": n,
            "unique_prompts": p.num_prompts,
            "text_encoders": dict(Counter(p.te_fingerprint)),
            "categories": dict(sorted(Counter(p.category).items())),
            "checkpoints": dict(sorted(Counter(p.checkpoint).items())),
            "vision_model": p.vision_model,
            "vision_dim": p.vision_dim,
            "text_dims": list(p.text_dims),
            "tokens": p.has_tokens,
            "bytes": size,
            "bytes_per_sample": size / n if n else 0.0,
        }


def info_text(folder) -> str:
    s = pairs_info(folder)
    lines = [
        f"pairs folder {s['folder']}: {s['parts']} part(s)",
        f"  images           {s['images']}",
        f"  unique prompts   {s['unique_prompts']}  (by prompt text and text-encoder fingerprint)",
        f"  vision model     {s['vision_model']} (dim {s['vision_dim']}), tokens: {str(s['tokens']).lower()}",
        f"  text dims        {s['text_dims']}",
        f"  bytes            {s['bytes']}  ({s['bytes_per_sample']:.0f} per sample)",
        "  text encoders    " + ", ".join(f"{k}: {v} prompts" for k, v in s["text_encoders"].items()),
        "  categories:",
    ]
    lines += [f"    {k or '(none)':<24} {v}" for k, v in s["categories"].items()]
    lines += ["  checkpoints:"] + [f"    {k or '(none)':<24} {v}" for k, v in s["checkpoints"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from luna.cli import EXIT_OK, EXIT_USER_ERROR

    parser = argparse.ArgumentParser(prog="luna pairs-info", description=__doc__)
    parser.add_argument("folder", type=Path, help="a pairs folder (or one part file)")
    args = parser.parse_args(argv)
    try:
        print(info_text(args.folder))
    except PairsFormatError as e:
        print(f"luna pairs-info: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
