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
