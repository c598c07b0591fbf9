"""`luna vault` command line: the JSON contract, the contact sheet, errors."""
from __future__ import annotations

import json

from PIL import Image

from extraction.synthetic import write_synthetic_pairs
from vault.cli import main
from vault.query import Vault


def test_query_json_prints_one_object_and_writes_a_contact_sheet(image_vault, capsys):
    root = image_vault
    rc = main(["query", f"vault={root / 'vault'}", f"image={root / 'q0.png'}", "k=3", "format=json",
               f"sheet={root / 'sheet0.png'}"])
    out = capsys.readouterr().out
    assert rc == 0
    result = json.loads(out)  # the whole stdout is one JSON object
    assert list(result) == ["neighbours"] and len(result["neighbours"]) == 3
    first = result["neighbours"][0]
    assert set(first) == {"key", "prompt", "score", "category", "checkpoint"}
    assert first["key"] == "img0" and first["prompt"] == "real image 0" and first["score"] > 0.99
    sheet = Image.open(root / "sheet0.png")
    assert sheet.width > 3 * sheet.height  # query + 3 tiles in a row


def test_query_text_table_and_sheet_without_shard_image(image_vault, capsys):
    root = image_vault
    assert main(["query", f"vault={root / 'vault'}", f"image={root / 'q3.png'}", "k=2", "category=faces",
                 "filters.checkpoint=ckpt_a"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0].split()[:3] == ["#", "score", "key"] and lines[1].split()[2] == "img3"
    assert (root / "q3_vault.png").is_file() and "images found in the shards" in captured.err


def test_cli_build_and_errors(tmp_path, capsys):
    pairs = write_synthetic_pairs(tmp_path / "p", 100, 10, 8)
    assert main(["build", f"pairs={pairs}", f"out={tmp_path / 'v'}", "index=Flat", "mode=prompts"]) == 0
    assert "100 images" in capsys.readouterr().out and Vault.open(tmp_path / "v").mode == "prompts"
    assert main(["query", f"vault={tmp_path / 'nope'}", f"image={tmp_path / 'x.png'}"]) == 2
    assert main(["build", f"pairs={tmp_path / 'empty'}", f"out={tmp_path / 'v2'}"]) == 2
    assert "error" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
