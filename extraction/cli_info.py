"""`luna pairs-info DIR`: counts, unique prompts, per-category counts and the storage of a pairs folder,
per image and per prompt, at the folder's dimensions and extrapolated to full SDXL size.

A plain argparse command (one positional folder, no config to compose), with `luna.cli`'s exit codes."""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import h5py

from extraction.pairs import SEQ_LEN, Pairs, PairsFormatError

FULL_COND_WIDTH, FULL_POOLED = 2048, 1280  # SDXL: CLIP-L 768 + bigG 1280, pooled bigG projection
FULL_PROMPT_BYTES = (SEQ_LEN * FULL_COND_WIDTH + FULL_POOLED) * 2  # fp16: 317,952 B
VIT_H_TOKEN_BYTES = 257 * 1280 * 2  # tokens=true at ViT-H-14: 256 patches + CLS, width 1280, fp16


def _size(f: h5py.File, name: str) -> int:
    return f[name].id.get_storage_size() if name in f else 0


def storage(p: Pairs) -> dict:
    """Bytes per image and per prompt as stored, and what they become at full size (77x2048 fp16)."""
    image = tokens = cond = table = stored = 0
    for part in p.parts:
        with h5py.File(part, "r") as f:
            image += sum(_size(f, f"images/{k}") for k in f["images"] if k != "tokens")
            tokens += _size(f, "images/tokens")
            cond += _size(f, "prompts/cond") + _size(f, "prompts/pooled")
            table += sum(_size(f, f"prompts/{k}") for k in ("text", "te_fingerprint", "cond_row"))
            stored += len(f["prompts/cond"])
    n, prompts = len(p), max(p.num_prompts, 1)
    per_image = image / max(n, 1)
    per_prompt_text = table / prompts
    full_prompt = FULL_PROMPT_BYTES + per_prompt_text
    return {
        "images_per_prompt": n / prompts,
        "stored_conditionings": stored,  # = unique prompts when each is stored once (format 2)
        "image_bytes_per_image": per_image,
        "token_bytes_per_image": tokens / max(n, 1),
        "cond_bytes_per_prompt": cond / max(stored, 1),
        "cond_bytes_per_unique_prompt": cond / prompts,  # > per stored row when a format 1 folder repeats prompts
        "text_bytes_per_prompt": per_prompt_text,
        "full_size": {
            "bytes_per_prompt_stored": full_prompt,
            "bytes_per_image_stored": per_image + full_prompt * prompts / max(n, 1),
            "bytes_per_image_prompts_only": per_image + per_prompt_text * prompts / max(n, 1),
            "token_bytes_per_image_vit_h": VIT_H_TOKEN_BYTES,
        },
    }


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
            "pooled_dim": int(p.attrs["pooled_dim"]),
            "tokens": p.has_tokens,
            "bytes": size,
            "bytes_per_sample": size / n if n else 0.0,
            "storage": storage(p),
        }


def info_text(folder) -> str:
    s = pairs_info(folder)
    st, full = s["storage"], s["storage"]["full_size"]
    width = sum(s["text_dims"])
    lines = [
        f"pairs folder {s['folder']}: {s['parts']} part(s)",
        f"  images           {s['images']}",
        f"  unique prompts   {s['unique_prompts']}  (by prompt text and text-encoder fingerprint; "
        f"{st['images_per_prompt']:.2f} images per prompt)",
        f"  vision model     {s['vision_model']} (dim {s['vision_dim']}), tokens: {str(s['tokens']).lower()}",
        f"  text dims        {s['text_dims']}",
        f"  bytes            {s['bytes']}  ({s['bytes_per_sample']:.0f} per sample)",
        f"  per image        {st['image_bytes_per_image']:.0f} B (embedding and metadata)"
        + (f" + {st['token_bytes_per_image']:.0f} B tokens" if s["tokens"] else ""),
        f"  per prompt       {st['cond_bytes_per_prompt']:.0f} B conditioning ({SEQ_LEN}x{width} + {s['pooled_dim']}, "
        f"{st['stored_conditionings']} stored) + {st['text_bytes_per_prompt']:.0f} B prompt list",
        f"  at full size     {SEQ_LEN}x{FULL_COND_WIDTH} + {FULL_POOLED} fp16 = {FULL_PROMPT_BYTES:,} B per prompt: "
        f"stored mode {full['bytes_per_image_stored']:,.0f} B/image, prompts-only {full['bytes_per_image_prompts_only']:,.0f} "
        f"B/image; tokens=true adds {full['token_bytes_per_image_vit_h']:,} B/image at ViT-H-14",
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
