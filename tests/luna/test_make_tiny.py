"""`luna make-tiny`: the command writes loadable checkpoints in both formats."""
from __future__ import annotations

from luna.models import sdxl
from luna.models.fingerprint import te_fingerprint
from luna.models.make_tiny import main


def test_make_tiny_command(tmp_path, capsys):
    out = tmp_path / "models"
    assert main([f"out={out}", "n=1", "write_vision=true"]) == 0
    single = out / "single" / "tiny-base-0.safetensors"
    folder = out / "diffusers" / "tiny-base-0"
    assert single.is_file() and (folder / "model_index.json").is_file()
    assert (out / "vision" / "luna-tiny-vit.safetensors").is_file()
    assert sdxl.detect_architecture(single).is_sdxl and sdxl.detect_architecture(folder).is_sdxl
    assert te_fingerprint(single) in capsys.readouterr().out


def test_make_tiny_rejects_bad_n(tmp_path, capsys):
    assert main([f"out={tmp_path}", "n=0"]) == 2
    assert "n must be >= 1" in capsys.readouterr().err


def test_make_tiny_takes_one_family_as_a_name_and_refuses_other_values(tmp_path, capsys):
    assert main([f"out={tmp_path / 'one'}", "n=1", "families=pony", "write_vision=false"]) == 0
    assert "family=pony " in capsys.readouterr().out  # not the letters p, o, n, y
    assert main([f"out={tmp_path / 'bad'}", "n=1", "families=[1]", "write_vision=false"]) == 2
    assert "families=" in capsys.readouterr().err
