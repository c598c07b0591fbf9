"""Prompt token ids stored beside a pairs folder (`PromptTokenIds`): tokenized once, identical to
what `luna.models.sdxl.tokenize` gives, kept per tokenizers' fingerprint, resumable block by block."""
import numpy as np
import pytest

from extraction.pairs import TOKEN_IDS_DIR, Pairs, PairsFormatError, PromptTokenIds, write_part
from tests.extraction.test_pairs import _part

LONG = ", ".join(f"word{i} blue eyes" for i in range(60))  # far more than 77 tokens: truncated
PROMPTS = ["blue eyes, close-up", "", LONG, "Gold RING   on a hand!", "émail, 東京, 🙂", "red hair"]


@pytest.fixture(scope="module")
def tokenizers():
    from luna.models.tokenizers import sdxl_tokenizers

    return sdxl_tokenizers()


class Counting:
    """`tokenize` as the projector calls it, counting the prompts it is given; fails after `fail_after` calls."""

    def __init__(self, tokenizers, fail_after: int | None = None):
        self.tokenizers, self.fail_after, self.prompts, self.calls = tokenizers, fail_after, [], 0

    def __call__(self, texts):
        from luna.models.sdxl import tokenize

        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("interrupted")
        self.calls += 1
        self.prompts += list(texts)
        return [t.numpy() for t in tokenize(self.tokenizers, texts)]


def test_stored_ids_equal_tokenize_and_are_tokenized_once(tmp_path, tokenizers):
    from luna.models.sdxl import tokenize, tokenizers_fingerprint

    digest = tokenizers_fingerprint(tokenizers)
    want = [t.numpy() for t in tokenize(tokenizers, PROMPTS)]
    assert want[0][PROMPTS.index(LONG)][-1] == tokenizers[0].eos_token_id  # the long prompt is cut at 77, EOS last
    assert (want[1][PROMPTS.index("")][2:] == tokenizers[1].pad_token_id).all()  # empty: BOS, EOS, padding
    first = Counting(tokenizers)
    ids, ids_2 = PromptTokenIds(tmp_path, digest).get(PROMPTS + PROMPTS[:2], first)
    assert sorted(first.prompts) == sorted(PROMPTS)  # each distinct prompt once
    assert ids.dtype == np.uint16 and ids.shape == (len(PROMPTS) + 2, 77)  # CLIP's 49,408 ids fit in 16 bits
    np.testing.assert_array_equal(ids.astype(np.int64), np.concatenate([want[0], want[0][:2]]))
    np.testing.assert_array_equal(ids_2.astype(np.int64), np.concatenate([want[1], want[1][:2]]))
    # a later run (a new object, as a new training run) reads them: no tokenizer call, same ids
    again = Counting(tokenizers, fail_after=0)
    got = PromptTokenIds(tmp_path, digest).get(PROMPTS[::-1], again)
    assert again.prompts == []
    np.testing.assert_array_equal(got[0].astype(np.int64), want[0][::-1])
    np.testing.assert_array_equal(got[1].astype(np.int64), want[1][::-1])
    # new prompts (a part added, a shard re-extracted): only they are tokenized, in a new block
    more = Counting(tokenizers)
    store = PromptTokenIds(tmp_path, digest)
    got = store.get(["green eyes", PROMPTS[0]], more)
    assert more.prompts == ["green eyes"] and store.tokenized == 1 and len(store.blocks()) == 2
    np.testing.assert_array_equal(got[0][0].astype(np.int64), tokenize(tokenizers, ["green eyes"])[0][0].numpy())
    assert not [p for p in store.dir.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_ids_are_kept_per_tokenizers_fingerprint(tmp_path, tokenizers):
    """Tokenizers that give other ids (here: the pair swapped, so the padding differs) have another
    fingerprint and never read the first one's ids; identical tokenizers share them."""
    from luna.models.sdxl import tokenize, tokenizers_fingerprint
    from luna.models.tokenizers import sdxl_tokenizers

    tok, tok2 = tokenizers
    digest, swapped = tokenizers_fingerprint((tok, tok2)), tokenizers_fingerprint((tok2, tok))
    assert digest != swapped and tokenizers_fingerprint(sdxl_tokenizers()) == digest
    tokenize(tokenizers, [LONG])  # a call leaves truncation/padding state behind: not part of the fingerprint
    assert tokenizers_fingerprint(tokenizers) == digest
    PromptTokenIds(tmp_path, digest).get(PROMPTS, Counting(tokenizers))
    other = Counting((tok2, tok))
    ids, ids_2 = PromptTokenIds(tmp_path, swapped).get(PROMPTS, other)
    assert sorted(other.prompts) == sorted(PROMPTS)
    np.testing.assert_array_equal(ids.astype(np.int64), tokenize((tok2, tok), PROMPTS)[0].numpy())
    assert sorted(p.name for p in (tmp_path / TOKEN_IDS_DIR).iterdir()) == sorted([digest, swapped])
    with pytest.raises(PairsFormatError, match="not a tokenizers fingerprint"):
        PromptTokenIds(tmp_path, "../elsewhere")


def test_an_interrupted_run_keeps_its_finished_blocks(tmp_path, tokenizers):
    from luna.models.sdxl import tokenize

    texts = [f"{i} blue eyes" for i in range(10)]
    with pytest.raises(KeyboardInterrupt):  # the second block's tokenizing is interrupted
        PromptTokenIds(tmp_path, "fp").get(texts, Counting(tokenizers, fail_after=2), block=4, batch=2)
    store = PromptTokenIds(tmp_path, "fp")
    assert len(store.blocks()) == 1 and store.read()[0] == texts[:4]
    resumed = Counting(tokenizers)
    ids, _ = store.get(texts, resumed, block=4, batch=2)
    assert resumed.prompts == texts[4:]
    np.testing.assert_array_equal(ids.astype(np.int64), tokenize(tokenizers, texts)[0].numpy())


def test_the_store_is_no_part_and_a_bad_block_is_a_clear_error(tmp_path, tokenizers):
    write_part(tmp_path / "a.h5", _part(["blue eyes", "red hair"], ["blue eyes", "red hair"]))
    store = PromptTokenIds(tmp_path / "a.h5", "fp")  # a part file: the store of its folder
    store.get(["blue eyes"], Counting(tokenizers))
    assert store.dir == tmp_path / TOKEN_IDS_DIR / "fp"
    with Pairs(tmp_path) as pairs:  # the parts are read as before
        assert len(pairs.parts) == 1 and pairs.num_prompts == 2
    (store.dir / "ids-broken.h5").write_bytes(b"not hdf5")
    with pytest.raises(PairsFormatError, match="ids-broken.h5: not a readable token-ids block"):
        PromptTokenIds(tmp_path, "fp").get(["blue eyes"], Counting(tokenizers))
