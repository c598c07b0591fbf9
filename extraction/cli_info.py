"""`luna pairs-info DIR`: counts, unique prompts, per-category counts and the storage of a pairs folder,
per image and per prompt, at the folder's dimensions and extrapolated to full SDXL size.

A plain argparse command (one positional folder, no config to compose), with `luna.cli`'s exit codes."""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import h5py

from extraction.pairs import SEQ_LEN, TOKEN_IDS_DIR, Pairs, PairsFormatError

FULL_COND_WIDTH, FULL_POOLED = 2048, 1280  # SDXL: CLIP-L 768 + bigG 1280, pooled bigG projection
FULL_PROMPT_BYTES = (SEQ_LEN * FULL_COND_WIDTH + FULL_POOLED) * 2  # fp16: 317,952 B
VIT_H_TOKEN_BYTES = 257 * 1280 * 2  # tokens=true at ViT-H-14: 256 patches + CLS, width 1280, fp16


def _size(handle: h5py.File, name: str) -> int:
    return handle[name].id.get_storage_size() if name in handle else 0


def storage(pairs: Pairs) -> dict:
    """Bytes per image and per prompt as stored, and what they become at full size (77x2048 fp16)."""
    image = tokens = cond = table = stored = 0
    for part in pairs.parts:
        with h5py.File(part, "r") as handle:
            image += sum(_size(handle, f"images/{name}") for name in handle["images"] if name != "tokens")
            tokens += _size(handle, "images/tokens")
            cond += _size(handle, "prompts/cond") + _size(handle, "prompts/pooled")
            table += sum(_size(handle, f"prompts/{name}") for name in ("text", "te_fingerprint", "cond_row"))
            stored += len(handle["prompts/cond"])
    images, prompts = max(len(pairs), 1), max(pairs.num_prompts, 1)
    per_image = image / images
    per_prompt_text = table / prompts
    full_prompt = FULL_PROMPT_BYTES + per_prompt_text
    return {
        "images_per_prompt": len(pairs) / prompts,
        "stored_conditionings": stored,  # = unique prompts when each is stored once (format 2)
        "image_bytes_per_image": per_image,
        "token_bytes_per_image": tokens / images,
        "cond_bytes_per_prompt": cond / max(stored, 1),
        "cond_bytes_per_unique_prompt": cond / prompts,  # > per stored row when a format 1 folder repeats prompts
        "text_bytes_per_prompt": per_prompt_text,
        "full_size": {
            "bytes_per_prompt_stored": full_prompt,
            "bytes_per_image_stored": per_image + full_prompt * prompts / images,
            "bytes_per_image_prompts_only": per_image + per_prompt_text * prompts / images,
            "token_bytes_per_image_vit_h": VIT_H_TOKEN_BYTES,
        },
    }


def token_id_stores(folder) -> dict:
    """The online-targets token-id stores of a pairs folder (`token_ids/<tokenizers fingerprint>/`):
    per fingerprint, its block files, the prompts they hold and their bytes on disk."""
    root = Path(folder) / TOKEN_IDS_DIR
    out = {}
    for store in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        blocks = sorted(store.glob("ids-*.h5"))
        prompts = 0
        for block in blocks:
            try:
                with h5py.File(block, "r") as handle:
                    prompts += len(handle["text"])
            except (OSError, KeyError) as e:
                raise PairsFormatError(f"{block}: not a readable token-ids block ({e}); remove it to tokenize "
                                       "its prompts again") from e
        size = sum(b.stat().st_size for b in blocks)
        out[store.name] = {"blocks": len(blocks), "prompts": prompts, "bytes": size,
                           "bytes_per_prompt": size / prompts if prompts else 0.0}
    return out


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
            "pooled_dim": int(pairs.attrs["pooled_dim"]),
            "tokens": pairs.has_tokens,
            "bytes": size,
            "bytes_per_sample": size / images if images else 0.0,
            "storage": storage(pairs),
            "token_ids": token_id_stores(folder),
        }


def info_text(folder) -> str:
    info = pairs_info(folder)
    storage_info, full = info["storage"], info["storage"]["full_size"]
    width = sum(info["text_dims"])
    lines = [
        f"pairs folder {info['folder']}: {info['parts']} part(s)",
        f"  images           {info['images']}",
        f"  unique prompts   {info['unique_prompts']}  (by prompt text and text-encoder fingerprint; "
        f"{storage_info['images_per_prompt']:.2f} images per prompt)",
        f"  vision model     {info['vision_model']} (dim {info['vision_dim']}), tokens: {str(info['tokens']).lower()}",
        f"  text dims        {info['text_dims']}",
        f"  bytes            {info['bytes']}  ({info['bytes_per_sample']:.0f} per sample)",
        f"  per image        {storage_info['image_bytes_per_image']:.0f} B (embedding and metadata)"
        + (f" + {storage_info['token_bytes_per_image']:.0f} B tokens" if info["tokens"] else ""),
        f"  per prompt       {storage_info['cond_bytes_per_prompt']:.0f} B conditioning ({SEQ_LEN}x{width} + "
        f"{info['pooled_dim']}, {storage_info['stored_conditionings']} stored) + "
        f"{storage_info['text_bytes_per_prompt']:.0f} B prompt list",
        f"  at full size     {SEQ_LEN}x{FULL_COND_WIDTH} + {FULL_POOLED} fp16 = {FULL_PROMPT_BYTES:,} B per prompt: "
        f"stored mode {full['bytes_per_image_stored']:,.0f} B/image, prompts-only {full['bytes_per_image_prompts_only']:,.0f} "
        f"B/image; tokens=true adds {full['token_bytes_per_image_vit_h']:,} B/image at ViT-H-14",
        *(f"  token ids        {fp[:12]}: {st['prompts']} prompts in {st['blocks']} block(s), {st['bytes']:,} B "
          f"({st['bytes_per_prompt']:.0f} B per prompt; online targets, tokenized once)"
          for fp, st in info["token_ids"].items()),
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
