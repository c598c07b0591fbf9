"""luna extract finds each checkpoint where the factory recorded it (no checkpoints.dirs); dirs still override.

The factory records, per sample, the checkpoint's name, file fingerprint, text-encoder fingerprint
and node, and its inventory scan leaves each scanned path's fingerprints in the facts cache; a
sample may also name the file itself (`checkpoint_path`). Shards here are written with those keys.
"""
from __future__ import annotations

import shutil

import pytest

from extraction.text import TextEncoderNotFound
from tests.extraction.conftest import assert_same_parts, compose, extract_cfg, write_text_encoder_checkpoint
from tests.extraction.extraction_shards import shard_metas, write_shard


def _cfg(shards, out, *extra):
    return compose([f"shards={shards}", f"out={out}", "progress=false", "batch_size=3", "dtype=float32", "workers=0",
                    *extra])


def test_checkpoint_path_in_the_samples_is_used_and_equals_the_dirs_result(tiny_checkpoints, tmp_path):
    from extraction.extract import extract

    by_name = {c["name"]: c for c in tiny_checkpoints}
    metas = [dict(m, node="pc1", checkpoint_path=str(by_name[m["checkpoint"]]["path"]))
             for m in shard_metas(tiny_checkpoints, 6, offset=0)]
    shards = tmp_path / "shards"
    write_shard(shards, "faces-pc1-w0-000000", metas)
    recorded = extract(_cfg(shards, tmp_path / "recorded", "checkpoints.cache=false"))
    assert recorded.images == 6
    assert recorded.text["encoder_sources"] == {c["te_fingerprint"]: str(c["path"]) for c in tiny_checkpoints}
    extract(extract_cfg(shards, tmp_path / "dirs", tiny_checkpoints, "dtype=float32", "workers=0"))
    assert_same_parts(tmp_path / "recorded", tmp_path / "dirs")


def test_inventory_cache_of_the_factory_scan_locates_the_checkpoints(tiny_checkpoints, tmp_path):
    """Samples as the factory writes them today (no path): the facts cache its scan wrote says where."""
    from extraction.extract import extract
    from factory.inventory import scan_folders

    models = tmp_path / "models"
    for c in tiny_checkpoints:
        shutil.copytree(c["path"], models / c["name"])
    cache = tmp_path / "inventory.json"
    found = scan_folders([str(models)], "pc1", cache=str(cache))["found"]
    assert sorted(f["name"] for f in found) == sorted(c["name"] for c in tiny_checkpoints)
    fp = {f["name"]: f["fingerprint"] for f in found}
    ckpts = [dict(c, fingerprint=fp[c["name"]]) for c in tiny_checkpoints]
    shards = tmp_path / "shards"
    write_shard(shards, "faces-pc1-w0-000000", [dict(m, node="pc1") for m in shard_metas(ckpts, 6, offset=0)])
    r = extract(_cfg(shards, tmp_path / "pairs", f"checkpoints.cache={cache}"))
    assert r.images == 6
    assert r.text["encoder_sources"] == {c["te_fingerprint"]: str(models / c["name"]) for c in tiny_checkpoints}

    # the file moved since the factory ran: the error names the checkpoint and where it was recorded
    shutil.move(str(models / ckpts[1]["name"]), str(tmp_path / "elsewhere"))
    with pytest.raises(TextEncoderNotFound) as e:
        extract(_cfg(shards, tmp_path / "pairs2", f"checkpoints.cache={cache}"))
    msg = str(e.value)
    assert repr(ckpts[1]["name"]) in msg and str(models / ckpts[1]["name"]) in msg and "checkpoints.dirs" in msg
    # checkpoints.dirs overrides the record
    r = extract(_cfg(shards, tmp_path / "pairs3", f"checkpoints.cache={cache}",
                     f"checkpoints.dirs=[{models},{tmp_path / 'elsewhere'}]"))
    assert r.images == 6


def test_missing_recorded_file_is_an_error_naming_checkpoint_and_path(tiny_checkpoints, tmp_path, capsys):
    from luna.cli import main as luna

    gone = write_text_encoder_checkpoint(tmp_path / "copy" / tiny_checkpoints[0]["name"], "base")
    metas = [dict(m, node="pc2", checkpoint_path=str(gone)) for m in shard_metas(tiny_checkpoints[:1], 3, offset=0)]
    shards = tmp_path / "shards"
    write_shard(shards, "faces-pc2-w0-000000", metas)
    shutil.rmtree(gone)
    args = [f"shards={shards}", f"out={tmp_path / 'o'}", "progress=false", "workers=0", "checkpoints.cache=false"]
    assert luna(["extract", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert repr(tiny_checkpoints[0]["name"]) in err and str(gone) in err and "node pc2" in err
    # the same samples with the folder given: found by fingerprint there
    assert luna(["extract", *args, f"checkpoints.dirs=[{tiny_checkpoints[0]['dir']}]"]) == 0


def test_no_record_at_all_says_so(tiny_checkpoints, tmp_path):
    from extraction.extract import extract

    shards = tmp_path / "shards"
    write_shard(shards, "faces-pc1-w0-000000", shard_metas(tiny_checkpoints[:1], 2, offset=0))
    with pytest.raises(TextEncoderNotFound, match=r"no recorded location for checkpoint.*checkpoints.dirs"):
        extract(_cfg(shards, tmp_path / "o", f"checkpoints.cache={tmp_path / 'no-cache.json'}"))
