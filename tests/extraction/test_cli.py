"""`luna extract` as a user runs it: resume, inspect, one-line errors and exit codes."""
from __future__ import annotations

import shutil

from luna.cli import main as luna


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
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    assert luna(["extract", f"shards={tmp_path / 'empty'}", "no_such_key=1"]) == 2  # Hydra refuses the override
