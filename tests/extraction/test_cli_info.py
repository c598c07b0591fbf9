"""`luna pairs-info` as a user runs it."""
from __future__ import annotations

from extraction.cli_info import pairs_info
from luna.cli import main as luna


def test_pairs_info_counts(extracted, capsys):
    out, result = extracted
    assert luna(["pairs-info", str(out)]) == 0
    text = capsys.readouterr().out
    info = pairs_info(out)
    assert info["images"] == result.images == 12 and info["parts"] == 3
    assert info["unique_prompts"] == result.unique_prompts
    assert sum(info["categories"].values()) == 12 and set(info["categories"]) == {"eyes", "hands", "clothes"}
    assert info["bytes_per_sample"] == info["bytes"] / 12
    assert f"unique prompts   {result.unique_prompts}" in text and "eyes" in text


def test_pairs_info_error_is_one_line(tmp_path, capsys):
    assert luna(["pairs-info", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "luna pairs-info: error:" in err and "no such pairs folder" in err and "Traceback" not in err


def test_pairs_info_counts_the_token_id_store(extracted, tmp_path, capsys):
    import shutil

    import numpy as np

    from extraction.pairs import Pairs, PromptTokenIds

    out, _ = extracted
    folder = shutil.copytree(out, tmp_path / "pairs")
    assert pairs_info(folder)["token_ids"] == {}
    with Pairs(folder) as pairs:
        texts = sorted(set(pairs.prompt_text))
    fake = lambda chunk: (np.full((len(chunk), 77), 7), np.full((len(chunk), 77), 9))  # noqa: E731
    PromptTokenIds(folder, "ab" * 16).get(texts[:3], fake, block=2)  # two blocks
    store = pairs_info(folder)["token_ids"]["ab" * 16]
    blocks = sorted((folder / "token_ids" / ("ab" * 16)).glob("ids-*.h5"))
    assert store["blocks"] == len(blocks) == 2 and store["prompts"] == 3
    assert store["bytes"] == sum(b.stat().st_size for b in blocks) and store["bytes_per_prompt"] == store["bytes"] / 3
    assert luna(["pairs-info", str(folder)]) == 0
    assert "token ids        abababababab: 3 prompts in 2 block(s)" in capsys.readouterr().out
