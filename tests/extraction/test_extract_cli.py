"""`luna extract` and `luna pairs-info` as a user runs them."""
from __future__ import annotations

import shutil

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


def test_extract_cli_resumes_and_inspects(extracted, shards_dir, tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "pairs"
    shutil.copytree(extracted[0], out)
    args = [f"shards={shards_dir}", f"out={out}", f"checkpoints.dirs=[{tiny_checkpoints[0]['dir']}]",
            "progress=false", "dtype=float32", "inspect=true"]
    assert luna(["extract", *args]) == 0
    text = capsys.readouterr().out
    assert "extracted 0 images into 0 new part(s)" in text and "shards already done: 3" in text
    assert "images           12" in text  # the inspect=true listing


def test_extract_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert luna(["extract", f"shards={tmp_path / 'empty'}", f"out={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert "luna extract: error:" in err and "no shard tars" in err and "Traceback" not in err
    assert luna(["pairs-info", str(tmp_path / "nothing")]) == 2
    assert "no such pairs folder" in capsys.readouterr().err
