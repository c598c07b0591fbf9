"""luna.models.tokenizers: SDXL's two CLIP tokenizers, built offline, pad as the real checkpoints do."""
from __future__ import annotations


def test_tokenizers_pad_like_sdxl():
    import open_clip

    from luna.models.tokenizers import sdxl_tokenizers

    tok, tok2 = sdxl_tokenizers()
    text = "closeup of hazel eyes, macro photo of an eye"
    ids = tok(text, padding="max_length", max_length=77).input_ids
    ids2 = tok2(text, padding="max_length", max_length=77).input_ids
    reference = open_clip.tokenizer.SimpleTokenizer()(text)[0].tolist()  # pads with 0
    n = reference.index(49407) + 1
    assert ids[:n] == ids2[:n] == reference[:n]
    assert ids[n:] == [49407] * (77 - n)  # CLIP-L pads with EOS
    assert ids2[n:] == [0] * (77 - n)  # bigG pads with "!" (id 0)
    assert tok2.pad_token == "!" and tok.pad_token == "<|endoftext|>"
