"""The toy preset's figures for the report: crops and samples with the oracle's verdict under each."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ARM_TITLES = {"clean": "clean render", "degraded": "degraded", "text": "text only",
              "vault": "vault", "projector": "projector"}


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _open_rgb(path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _verdict_line(image, scene) -> tuple[str, bool]:
    from demo import toy_quality
    from luna.models.toy import world

    v = toy_quality.verdict(image, scene, world.SCENE_ATTRIBUTES)
    if not v["wrong"]:
        return "oracle: all right", True
    return "wrong: " + ", ".join(f"{a} {v['reading'][a]}" for a in v["wrong"]), False


def verdict_grid(images: dict[str, list[np.ndarray]], scenes, shown: int, tile: int = 112) -> Image.Image:
    """Rows = crops, columns = clean / degraded / each arm; the oracle's verdict under each tile."""
    from luna.models.toy import world

    cols = [c for c in ("clean", "degraded", "text", "vault", "projector") if c in images]
    label_h, head_h, prompt_h = 30, 22, 16
    w = len(cols) * (tile + 8) + 8
    h = head_h + shown * (prompt_h + tile + label_h + 6)
    sheet = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(sheet)
    font, small = _font(13), _font(10)
    for c, name in enumerate(cols):
        draw.text((8 + c * (tile + 8), 4), ARM_TITLES[name], fill=(29, 43, 90), font=font)
    y = head_h
    for r in range(min(shown, len(scenes))):
        draw.text((8, y), world.prompt(scenes[r]), fill=(60, 60, 60), font=small)
        y += prompt_h
        for c, name in enumerate(cols):
            x = 8 + c * (tile + 8)
            im = Image.fromarray(np.asarray(images[name][r])).resize((tile, tile), Image.NEAREST)
            sheet.paste(im, (x, y))
            text, ok = _verdict_line(images[name][r], scenes[r])
            words, lines = text.split(" "), [""]
            for word in words:  # wrap to the tile's width
                if draw.textlength((lines[-1] + " " + word).strip(), font=small) > tile and lines[-1]:
                    lines.append(word)
                else:
                    lines[-1] = (lines[-1] + " " + word).strip()
            draw.multiline_text((x, y + tile + 2), "\n".join(lines[:2]), fill=(30, 130, 60) if ok else (190, 40, 40),
                                font=small, spacing=1)
        y += tile + label_h + 6
    return sheet


def sample_sheet(samples: list[dict], per_row: int = 6, tile: int = 112) -> Image.Image:
    """The factory's samples, each with its prompt's attributes and the oracle's reading of it."""
    from luna.models.toy import world

    items = []
    for s in samples:
        try:
            items.append((s, world.parse_prompt(str(s.get("prompt", "")))))
        except ValueError:
            continue
    rows = max(1, -(-len(items) // per_row))
    text_h = 44
    sheet = Image.new("RGB", (8 + per_row * (tile + 8), 8 + rows * (tile + text_h + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    small = _font(10)
    for i, (s, scene) in enumerate(items):
        x, y = 8 + (i % per_row) * (tile + 8), 8 + (i // per_row) * (tile + text_h + 8)
        image = _open_rgb(s["image"])
        sheet.paste(image.resize((tile, tile), Image.NEAREST), (x, y))
        prompt = f"{scene.size} {scene.color} {scene.shape}, {scene.position}, {scene.background} bg ({s['checkpoint']})"
        verdict, ok = _verdict_line(np.asarray(image), scene)
        lines = [prompt[i: i + 22] for i in range(0, len(prompt), 22)][:2] + [verdict[:24]]
        for j, line in enumerate(lines):
            draw.text((x, y + tile + 2 + 12 * j), line, font=small,
                      fill=(60, 60, 60) if j < len(lines) - 1 else ((30, 130, 60) if ok else (190, 40, 40)))
    return sheet
