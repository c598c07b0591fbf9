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
    with Pairs(folder) as pairs:
        size = sum(part.stat().st_size for part in pairs.parts)
        images = len(pairs)
        return {
            "folder": str(folder),
            "parts": len(pairs.parts),
            "images": images,
            "unique_prompts": pairs.num_prompts,
            "text_encoders": dict(Counter(pairs.te_fingerprint)),
            "categories": dict(sorted(Counter(pairs.category).items())),
            "checkpoints": dict(sorted(Counter(pairs.checkpoint).items())),
            "vision_model": pairs.vision_model,
            "vision_dim": pairs.vision_dim,
            "text_dims": list(pairs.text_dims),
            "tokens": pairs.has_tokens,
            "bytes": size,
            "bytes_per_sample": size / images if images else 0.0,
        }


def info_text(folder) -> str:
    info = pairs_info(folder)
    lines = [
        f"pairs folder {info['folder']}: {info['parts']} part(s)",
        f"  images           {info['images']}",
        f"  unique prompts   {info['unique_prompts']}  (by prompt text and text-encoder fingerprint)",
        f"  vision model     {info['vision_model']} (dim {info['vision_dim']}), tokens: {str(info['tokens']).lower()}",
        f"  text dims        {info['text_dims']}",
        f"  bytes            {info['bytes']}  ({info['bytes_per_sample']:.0f} per sample)",
        "  text encoders    " + ", ".join(f"{fingerprint}: {count} prompts" for fingerprint, count in info["text_encoders"].items()),
        "  categories:",
    ]
    lines += [f"    {name or '(none)':<24} {count}" for name, count in info["categories"].items()]
    lines += ["  checkpoints:"] + [f"    {name or '(none)':<24} {count}" for name, count in info["checkpoints"].items()]
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
