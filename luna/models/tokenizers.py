"""SDXL's two CLIP tokenizers, built offline from the BPE vocabulary that open_clip ships.

The vocabulary and merges are exactly those of `openai/clip-vit-large-patch14` (ids 0..49407,
`<|startoftext|>` = 49406, `<|endoftext|>` = 49407). SDXL's `tokenizer` pads with EOS, its
`tokenizer_2` (the OpenCLIP-bigG one) pads with "!" (id 0), as the real checkpoints do.
"""
from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

from luna.models.configs import CONFIG_DIR

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bpe_vocab_path() -> Path:
    import open_clip

    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte <-> printable unicode table (same as open_clip.tokenizer.bytes_to_unicode).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@lru_cache(maxsize=1)
def clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of the CLIP BPE, derived the way open_clip's SimpleTokenizer derives them."""
    lines = gzip.open(bpe_vocab_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def _tokenizer_settings(subfolder: str) -> dict:
    return json.loads((CONFIG_DIR / "sdxl-base" / subfolder / "tokenizer_config.json").read_text())


def make_tokenizer(subfolder: str = "tokenizer"):
    """A transformers CLIPTokenizer for SDXL's `tokenizer` (pads with EOS) or `tokenizer_2` (pads with "!")."""
    from transformers import CLIPTokenizer

    settings = _tokenizer_settings(subfolder)
    vocab, merges = clip_bpe()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        bos_token=settings["bos_token"],
        eos_token=settings["eos_token"],
        unk_token=settings["unk_token"],
        pad_token=settings["pad_token"],
        model_max_length=settings["model_max_length"],
    )


def sdxl_tokenizers():
    """(tokenizer, tokenizer_2) as SDXL uses them."""
    return make_tokenizer("tokenizer"), make_tokenizer("tokenizer_2")
