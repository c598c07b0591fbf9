"""Contact sheet: the query crop beside its matched images, read from the factory's shard tars.

Images are looked up by key in the shard folders the manifest records, through factory.shards
(the one reader of shard tars: member names are parsed, never used as paths). A neighbour whose image cannot be found gets a labelled tile
with its prompt instead, so the sheet always shows every neighbour.
"""
from __future__ import annotations

import io
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from factory.shards import IMAGE_EXTS, find_samples
from luna.files import atomic_path


def find_images(keys: list[str], shard_folders: list[str]) -> dict[str, Image.Image]:
    """PIL images of `keys` found in the *.tar files of `shard_folders` (missing keys are absent)."""
    found = {}
    for key, files in find_samples(keys, shard_folders).items():
        ext = next((e for e in IMAGE_EXTS if e in files), None)
        if ext is None:
            continue
        try:
            found[key] = Image.open(io.BytesIO(files[ext])).convert("RGB")
        except (OSError, ValueError):
            pass  # an unreadable image: its neighbour falls back to a labelled tile
    return found


def _label_tile(size: int, lines: list[str]) -> Image.Image:
    tile = Image.new("RGB", (size, size), (40, 40, 48))
    draw = ImageDraw.Draw(tile)
    font = ImageFont.load_default()
    y = 6
    for line in lines:
        for part in textwrap.wrap(line, width=max(8, size // 7)) or [""]:
            draw.text((6, y), part, fill=(230, 230, 230), font=font)
            y += 12
    return tile


def _caption(tile: Image.Image, text: str) -> Image.Image:
    out = tile.copy()
    draw = ImageDraw.Draw(out)
    draw.rectangle([0, out.height - 14, out.width, out.height], fill=(0, 0, 0))
    draw.text((3, out.height - 13), text[: out.width // 6], fill=(255, 255, 255), font=ImageFont.load_default())
    return out


def contact_sheet(query: Image.Image, neighbours: list[dict], shard_folders: list[str], path,
                  tile: int = 192) -> tuple[Path, int]:
    """Write a one-row PNG sheet (query, then neighbours); returns (path, number of real images found)."""
    images = find_images([n["key"] for n in neighbours], shard_folders)
    tiles = [_caption(query.convert("RGB").resize((tile, tile), Image.LANCZOS), "query")]
    for i, n in enumerate(neighbours):
        img = images.get(n["key"])
        caption = f"#{i + 1} {n['score']:.3f} {n.get('checkpoint', '')}"
        if img is None:
            t = _label_tile(tile, [f"#{i + 1} key {n['key']}", f"score {n['score']:.3f}",
                                   f"{n.get('category', '')} / {n.get('checkpoint', '')}", "", n.get("prompt", "")])
        else:
            t = _caption(img.resize((tile, tile), Image.LANCZOS), caption)
        tiles.append(t)
    sheet = Image.new("RGB", (tile * len(tiles) + 4 * (len(tiles) - 1), tile), (255, 255, 255))
    for i, t in enumerate(tiles):
        sheet.paste(t, (i * (tile + 4), 0))
    path = Path(path)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path, len(images)
