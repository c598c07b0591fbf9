"""Test shards in the factory's convention, written with webdataset.TarWriter."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

PROMPTS = ["blue eyes, close-up", "a gold ring on a hand", "silk dress, red", "green eyes", "freckles"]


def png_bytes(rng: np.random.Generator, size: int = 40) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def sample_meta(prompt: str, checkpoint: dict, seed: int, category: str, campaign: str = "faces",
                format_version: int = 1) -> dict:
    return {
        "prompt": prompt,
        "negative": "",
        "campaign": campaign,
        "category": category,
        "checkpoint": checkpoint["name"],
        "checkpoint_fingerprint": checkpoint["fingerprint"],
        "te_fingerprint": checkpoint["te_fingerprint"],
        "seed": seed,
        "steps": 2,
        "format_version": format_version,
    }


def write_shard(folder: Path, stem: str, metas: list[dict], seed: int = 0, stats: bool = True,
                format_version: int = 1) -> Path:
    """One shard `folder/stem.tar` holding one PNG + txt + json per meta, then `stem_stats.json`."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.tar"
    with wds.TarWriter(str(path)) as w:
        for i, meta in enumerate(metas):
            w.write({"__key__": f"{stem.replace('-', '_')}_{i:04d}", "png": png_bytes(rng), "txt": meta["prompt"],
                     "json": json.dumps(meta).encode()})
    if stats:
        (folder / f"{stem}_stats.json").write_text(
            json.dumps({"count": len(metas), "successes": len(metas), "format_version": format_version}))
    return path


def shard_metas(checkpoints: list[dict], n: int, offset: int, prompts=PROMPTS) -> list[dict]:
    """n samples cycling prompts and checkpoints, so prompts repeat within and across shards."""
    cats = ["eyes", "hands", "clothes"]
    return [sample_meta(prompts[(offset + i) % len(prompts)], checkpoints[(offset + i) % len(checkpoints)],
                        seed=offset + i, category=cats[(offset + i) % len(cats)]) for i in range(n)]
