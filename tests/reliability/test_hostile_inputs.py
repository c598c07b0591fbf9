"""Hostile and broken files across the loop: each is a clear error (a ValueError subclass, or a CLI
exit code with one line naming the file) in bounded time and memory, writes nothing outside the
output folder, and loses nothing already done. What a stage's own tests already prove the same way
is not repeated here (docs/reliability.md lists where each case is tested)."""
from __future__ import annotations

import io
import json
import os
import pickle
import resource
import struct
import subprocess
import sys
import tarfile
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


def _tree(root: Path) -> dict[str, int]:
    """{relative path: size} of every file under root (what a run may have written)."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def _luna(argv: list[str], cwd: Path, address_space: int = 3 << 30, timeout: int = 120) -> subprocess.CompletedProcess:
    """`luna ...` in a child with its address space capped (RLIMIT_AS) and a wall-clock limit."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "luna.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=limit)


def _one_line_error(proc: subprocess.CompletedProcess, needle: str) -> str:
    err = proc.stderr.strip()
    assert "Traceback" not in err, err[-2000:]
    lines = [ln for ln in err.splitlines() if "error" in ln.lower()]
    assert lines and needle in lines[-1], err[-2000:]
    return lines[-1]


class _Bounded:
    """Python-heap peak of a block (tracemalloc), asserted under a bound."""

    def __init__(self, limit: int):
        self.limit = limit

    def __enter__(self):
        tracemalloc.start()
        return self

    def __exit__(self, *exc):
        _, self.peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        if exc[0] is None:
            assert self.peak < self.limit, f"peak {self.peak / MiB:.1f} MiB >= {self.limit / MiB:.0f} MiB"
        return False


# ------------------------------------------------------------------------------------------- shards

def _png(seed: int, size: int = 32) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _meta(key: str, prompt: str, seed: int, te: str) -> dict:
    return {"key": key, "prompt": prompt, "negative": "", "campaign": "evil", "category": "evil/eyes",
            "checkpoint": "tiny", "checkpoint_fingerprint": "fp", "te_fingerprint": te, "seed": seed,
            "format_version": 1}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _bad_samples(tar: tarfile.TarFile, te: str) -> dict[str, str]:
    """Add samples broken in every way a reader must survive; returns {key: what is wrong}."""
    _add(tar, "nojson.png", _png(3))  # an image without its json
    bad = {"nojson": "no json"}
    for key, data in (("seedtext", json.dumps({"prompt": "p", "seed": "not a number"}).encode()),
                      ("seeddict", json.dumps({"prompt": "p", "seed": {"a": 1}}).encode()),
                      ("jsonlist", json.dumps(["prompt", "seed"]).encode()),
                      ("notjson", b"\xff\xfe{{{ not json"),
                      ("deepjson", b"[" * 100_000 + b"]" * 100_000)):
        _add(tar, f"{key}.png", _png(4))
        _add(tar, f"{key}.json", data)
        bad[key] = "json of the wrong type or shape"
    _add(tar, "badimage.png", b"\x89PNG not really")
    _add(tar, "badimage.json", json.dumps(_meta("badimage", "p", 5, te)).encode())
    bad["badimage"] = "undecodable image"
    return bad


def _hostile_shard(folder: Path, te: str, names_only: bool = False) -> tuple[Path, dict[str, str]]:
    """A complete shard (with its stats marker): good samples, samples whose member names would escape
    the folder if extracted, link members and (unless `names_only`) broken samples.
    Returns (path, {bad key: what is wrong})."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "evil-pc1-w0-000000.tar"
    bad: dict[str, str] = {}
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(2):
            k = f"good_{i}"
            _add(tar, f"{k}.png", _png(i))
            _add(tar, f"{k}.json", json.dumps(_meta(k, f"blue eyes {i}", i, te)).encode())
        for name in ("../escape", "../../escape2", "/tmp/luna_abs_escape", "sub/../../escape3"):
            _add(tar, f"{name}.png", _png(7))
            _add(tar, f"{name}.json", json.dumps(_meta("x", "escape", 7, te)).encode())
        link = tarfile.TarInfo("linked.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        hard = tarfile.TarInfo("hard.json")
        hard.type, hard.linkname = tarfile.LNKTYPE, "../../etc/passwd"
        tar.addfile(hard)
        if not names_only:
            bad = _bad_samples(tar, te)
    (folder / "evil-pc1-w0-000000_stats.json").write_text(
        json.dumps({"count": 6 + len(bad), "successes": 6 + len(bad), "format_version": 1}))
    return path, bad


def _extract_cfg(shards: Path, out: Path, ckpt: Path):
    from tests.extraction.conftest import compose

    return compose([f"shards={shards}", f"out={out}", "text=reference", f"text.checkpoint={ckpt}",
                    "progress=false", "batch_size=4", "workers=0", "dtype=float32"])


def test_hostile_shard_extracts_the_good_samples_reports_the_bad_and_writes_nothing_outside(
        te_checkpoint, tmp_path, monkeypatch):
    from extraction.extract import extract
    from extraction.pairs import Pairs

    ckpt, te = te_checkpoint
    work = tmp_path / "work" / "deeper"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)  # a reader that extracted members would write next to the cwd
    shards = tmp_path / "shards"
    _, bad = _hostile_shard(shards, te)
    before = _tree(tmp_path)
    out = tmp_path / "out"
    result = extract(_extract_cfg(shards, out, ckpt))
    written = {k for k in set(_tree(tmp_path)) - set(before)}
    assert written and all(p.startswith("out/") for p in written), sorted(written)
    assert not Path("/tmp/luna_abs_escape.png").exists() and not (tmp_path / "escape.png").exists()
    assert not list(tmp_path.parent.glob("escape*"))
    reported = {b["key"]: b["reason"] for b in result.bad_samples["evil-pc1-w0-000000.tar"]}
    assert set(bad) <= set(reported), reported
    assert "json" in reported["nojson"]
    with Pairs(out) as pairs:
        assert {"good_0", "good_1"} <= set(pairs.key)
        assert not set(bad) & set(pairs.key)  # a bad sample is never paired with a guessed prompt
    report = json.loads((out / "extract_report.json").read_text())
    assert report["bad_samples"] and not report["corrupt"]


def test_samples_with_path_like_member_names_are_skipped_and_reported(te_checkpoint, tmp_path):
    from extraction.extract import extract
    from extraction.pairs import Pairs

    ckpt, te = te_checkpoint
    _hostile_shard(tmp_path / "shards", te)
    result = extract(_extract_cfg(tmp_path / "shards", tmp_path / "out", ckpt))
    with Pairs(tmp_path / "out") as pairs:
        assert all("/" not in k and ".." not in k for k in pairs.key)
    reported = {b["key"] for b in result.bad_samples["evil-pc1-w0-000000.tar"]}
    assert {"../escape", "/tmp/luna_abs_escape"} <= reported


def test_demo_sample_sheet_and_factory_reader_write_nothing_outside(te_checkpoint, tmp_path, monkeypatch):
    """The other readers of shard tars: factory.shards.read_shard (reads into memory) and the demo's
    report samples (writes files, named from sanitised keys only)."""
    import shutil

    from demo.run import read_shards
    from factory.shards import read_shard

    monkeypatch.chdir(tmp_path)
    shards = tmp_path / "shards"
    path, _ = _hostile_shard(shards, te_checkpoint[1])
    keys = [s["__key__"] for s in read_shard(path)]
    assert "good_0" in keys and not [k for k in keys if "/" in k or ".." in k]
    shutil.rmtree(shards)  # the demo reads the shards it just generated: path-like names only
    _hostile_shard(shards, te_checkpoint[1], names_only=True)
    before = _tree(tmp_path)
    read_shards(shards, per_cell=50, samples_dir=tmp_path / "report" / "samples")
    written = set(_tree(tmp_path)) - set(before)
    assert all(p.startswith("report/samples/") and "/" not in p[len("report/samples/"):] for p in written), written
    assert not Path("/tmp/luna_abs_escape.png").exists()


def test_truncated_tar_at_every_kind_of_cut_is_reported_not_half_read(te_checkpoint, tmp_path):
    """Cuts inside a header, inside a member and at member boundaries: extraction reports the shard
    as corrupt and writes no part for it; the good shard beside it is extracted."""
    import shutil

    from extraction.extract import extract
    from factory.shards import CorruptShard, iter_samples

    ckpt, te = te_checkpoint
    src = tmp_path / "src"
    src.mkdir()
    with tarfile.open(src / "s.tar", "w") as tar:
        for i in range(3):
            _add(tar, f"k{i}.png", _png(i))
            _add(tar, f"k{i}.json", json.dumps(_meta(f"k{i}", f"p{i}", i, te)).encode())
    data = (src / "s.tar").read_bytes()
    with tarfile.open(src / "s.tar") as tf:
        members = tf.getmembers()
    offsets = [m.offset for m in members]
    end = members[-1].offset_data + -(-members[-1].size // 512) * 512  # where the end-of-archive blocks start
    cuts = sorted({0, 100, 512 + 10, offsets[2], offsets[3] + 700, offsets[-1], end, end + 512})
    for cut in cuts:
        with pytest.raises(CorruptShard):
            list(iter_samples(data[:cut]))
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, cut in enumerate((offsets[2], offsets[3] + 700, end + 512, len(data))):
        (shards / f"t-pc1-w0-{i:06d}.tar").write_bytes(data[:cut])
        (shards / f"t-pc1-w0-{i:06d}_stats.json").write_text(json.dumps({"successes": 3, "format_version": 1}))
    out = tmp_path / "out"
    result = extract(_extract_cfg(shards, out, ckpt))
    assert sorted(Path(c["shard"]).name for c in result.corrupt) == [f"t-pc1-w0-{i:06d}.tar" for i in range(3)]
    assert [p.name for p in result.written] == ["pairs-t-pc1-w0-000003.h5"]
    # the next run retries only the corrupt ones; once repaired they complete, nothing is lost or redone
    for i in range(3):
        shutil.copy(src / "s.tar", shards / f"t-pc1-w0-{i:06d}.tar")
    again = extract(_extract_cfg(shards, out, ckpt))
    assert again.skipped_done == ["t-pc1-w0-000003.tar"] and len(again.written) == 3 and not again.corrupt


# -------------------------------------------------------------------------------------- pairs files

def _pairs_with_missing(folder: Path, drop: str) -> Path:
    from extraction.synthetic import write_synthetic_pairs

    write_synthetic_pairs(folder, n_images=20, n_prompts=5, dim=8)
    part = folder / "part-00000.h5"
    with h5py.File(part, "a") as f:
        del f[drop]
    return part


@pytest.mark.parametrize("drop", ["images/embed", "prompts/cond", "images/prompt_id", "prompts"])
def test_pairs_file_with_missing_datasets_is_refused_by_every_reader(tmp_path, drop):
    from extraction.pairs import PairsFormatError
    from projector.data import PairsDataModule
    from vault.build import build_vault
    from vault.manifest import VaultError

    part = _pairs_with_missing(tmp_path / "pairs", drop)
    with pytest.raises((PairsFormatError, VaultError), match="part-00000.h5"):
        build_vault(tmp_path / "pairs", tmp_path / "vault")
    assert not (tmp_path / "vault").exists() and not list(tmp_path.glob(".vault*"))
    dm = PairsDataModule(str(tmp_path / "pairs"))
    with pytest.raises(PairsFormatError, match="part-00000.h5"):
        dm.setup("fit")
    assert part.is_file()  # nothing of the user's was removed


def test_cli_on_a_broken_pairs_folder_exits_with_one_line(tmp_path, capsys):
    from vault.cli import main

    _pairs_with_missing(tmp_path / "pairs", "images/embed")
    assert main(["build", f"pairs={tmp_path / 'pairs'}", f"out={tmp_path / 'vault'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("luna vault build: error:") and "part-00000.h5" in err[-1]
    assert not (tmp_path / "vault").exists()
    from projector.cli import main as train_main

    assert train_main([f"pairs={tmp_path / 'pairs'}", f"out={tmp_path / 'run'}", "logger=none",
                       "trainer.accelerator=cpu", "data.num_workers=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("luna train:") and "part-00000.h5" in err[-1] and "Traceback" not in "".join(err)


# ------------------------------------------------------------------------------------ vault manifest

@pytest.mark.parametrize("version", [0, -1, "1", True, None, 2, 10**6])
def test_vault_manifest_of_unknown_version_is_refused(tmp_path, version):
    from extraction.synthetic import write_synthetic_pairs
    from vault.build import build_vault
    from vault.manifest import VaultError
    from vault.query import Vault

    write_synthetic_pairs(tmp_path / "p", 60, 6, 8)
    build_vault(tmp_path / "p", tmp_path / "v", categories=False)
    m = tmp_path / "v" / "manifest.json"
    data = json.loads(m.read_text())
    data["format_version"] = version
    m.write_text(json.dumps(data))
    before = _tree(tmp_path / "v")
    with pytest.raises(VaultError, match="manifest.json"):
        Vault.open(tmp_path / "v")
    # adding to it must not touch it either
    write_synthetic_pairs(tmp_path / "p2", 30, 3, 8, seed=1)
    with pytest.raises(VaultError, match="manifest.json"):
        build_vault(tmp_path / "p2", tmp_path / "v")
    assert _tree(tmp_path / "v") == before


def test_vault_manifest_not_an_object_is_refused(tmp_path):
    from vault.manifest import Manifest, VaultError

    (tmp_path / "manifest.json").write_text("[1, 2, 3]")
    with pytest.raises(VaultError, match="manifest.json"):
        Manifest.read(tmp_path)


# ------------------------------------------------------------------------------------ model files

def _safetensors(path: Path, header: bytes, length: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + b"\0" * 64)
    return path


CORRUPT_HEADERS = {
    "list": b"[1, 2]",
    "int_entries": json.dumps({"a": 5}).encode(),
    "no_shape": json.dumps({"a": {"dtype": "F32", "data_offsets": [0, 4]}}).encode(),
    "shape_string": json.dumps({"model.diffusion_model.input_blocks.0.0.weight":
                                {"dtype": "F32", "shape": "abc", "data_offsets": [0, 4]}}).encode(),
    "deep": b"[" * 200_000 + b"]" * 200_000,
    "not_utf8": b"\xff\xfe\xfd{",
    "truncated_json": b'{"a": {"dtype": "F32", "sha',
}


@pytest.mark.parametrize("name", [*CORRUPT_HEADERS, "huge_length", "short_file"])
def test_safetensors_with_a_corrupted_header_is_a_clear_error(tmp_path, name):
    from luna.models import sdxl
    from luna.models.fingerprint import te_fingerprint

    path = tmp_path / f"{name}.safetensors"
    if name == "huge_length":
        _safetensors(path, b"{}", length=2**63)
    elif name == "short_file":
        path.write_bytes(b"\x01\x02")
    else:
        _safetensors(path, CORRUPT_HEADERS[name])
    import diffusers  # noqa: F401 - imported before the memory bound, which measures the file's handling only

    with _Bounded(64 * MiB):
        info = sdxl.detect_architecture(path)
        assert not info.is_sdxl and info.reason
        with pytest.raises(sdxl.NotSDXLError, match=name):
            sdxl.load_sdxl(path)
        with pytest.raises(sdxl.NotSDXLError, match=name):
            sdxl.load_text_encoders(path)
    with pytest.raises(Exception):  # noqa: PT011 - whatever safetensors raises, it is not a fingerprint
        te_fingerprint(path)


def test_inventory_lists_corrupted_and_pickle_files_with_a_reason(tmp_path):
    from factory.inventory import scan_folders

    for name, header in CORRUPT_HEADERS.items():
        _safetensors(tmp_path / f"{name}.safetensors", header)
    (tmp_path / "evil.ckpt").write_bytes(b"whatever")
    with _Bounded(128 * MiB):
        res = scan_folders([str(tmp_path)], "pc1")
    assert res["found"] == []
    reasons = {Path(r["path"]).name: r["reason"] for r in res["rejected"]}
    assert set(reasons) == {f"{n}.safetensors" for n in CORRUPT_HEADERS} | {"evil.ckpt"}
    assert all(reasons.values()) and "pickle" in reasons["evil.ckpt"]


class _Marker:
    """Unpickling this would create the marker file (os.system): the proof a pickle ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _evil_checkpoints(tmp_path: Path, marker: Path) -> list[Path]:
    import torch

    legacy = tmp_path / "evil_legacy.ckpt"
    with open(legacy, "wb") as f:
        pickle.dump({"state_dict": _Marker(marker)}, f)
    zipped = tmp_path / "evil_zip.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": _Marker(marker)}, zipped)
    bin_ = tmp_path / "evil.bin"
    torch.save(_Marker(marker), bin_)
    assert not marker.exists()
    return [legacy, zipped, bin_]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_checkpoint_is_refused_and_never_executed(tmp_path):
    from luna.models import sdxl
    from luna.models.fingerprint import te_fingerprint
    from luna.models.vision import load_vision

    marker = tmp_path / "PICKLE_RAN"
    for path in _evil_checkpoints(tmp_path, marker):
        info = sdxl.detect_architecture(path)
        assert info.format == "pickle" and not info.is_sdxl
        with pytest.raises(sdxl.PickleCheckpointError, match=path.name):
            sdxl.load_sdxl(path)
        with pytest.raises(sdxl.PickleCheckpointError, match=path.name):
            te_fingerprint(path)
        # opted in: read with weights_only=True, which refuses the code: a clear error, still nothing run
        for fn in (sdxl.load_sdxl, sdxl.load_text_encoders, te_fingerprint):
            with pytest.raises(ValueError, match=path.name):
                fn(path, allow_pickle=True)
        with pytest.raises(Exception):  # noqa: PT011 - the vision loader's own error
            load_vision("tiny", weights=str(path))
        assert not marker.exists(), f"{path.name} was unpickled with code execution"


def test_cli_offered_a_pickle_checkpoint_refuses_it(te_checkpoint, tmp_path, capsys):
    """`luna extract text=reference text.checkpoint=evil.ckpt`: one line naming the file, nothing run or written."""
    from extraction.cli import main

    marker = tmp_path / "PICKLE_RAN"
    _, zipped, _ = _evil_checkpoints(tmp_path, marker)
    shards = tmp_path / "shards"
    _hostile_shard(shards, te_checkpoint[1], names_only=True)
    code = main([f"shards={shards}", f"out={tmp_path / 'out'}", "text=reference", f"text.checkpoint={zipped}",
                 "progress=false", "workers=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and not marker.exists()
    assert err[-1].startswith("luna extract: error:") and zipped.name in err[-1]
    assert not list(tmp_path.glob("out/*.h5"))


# --------------------------------------------------------------------------------------- campaigns

def test_campaign_nested_ten_thousand_deep_exits_2_in_bounded_memory(tmp_path):
    camp = tmp_path / "deep.yaml"
    camp.write_text("campaign: t\njobs: " + "[" * 10000 + "]" * 10000 + "\n")
    out = tmp_path / "out"
    before = _tree(tmp_path)
    proc = _luna(["factory", f"campaign_file={camp}", f"out={out}", "checkpoints.dirs=[/nonexistent]"], tmp_path,
                 address_space=2 << 30, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = _one_line_error(proc, "deep.yaml")
    assert "nested deeper" in line
    written = set(_tree(tmp_path)) - set(before)
    assert all(p.startswith("out/") for p in written), written
    assert not (out / "shards").exists() or not list((out / "shards").iterdir())


def test_billion_combination_template_plans_in_bounded_time_and_memory(tmp_path):
    from factory.campaign_file import load_campaign
    from factory.planner import plan

    words = [f"w{i}" for i in range(40)]
    camp = tmp_path / "huge.yaml"
    camp.write_text(
        "campaign: huge\nwildcards:\n  a: " + json.dumps(words) + "\n"
        "jobs:\n  j:\n    quota: 24\n    templates: ['" + ", ".join(["__a__"] * 8) + " {x|y|z}']\n"
        "sampler: {steps: 2, width: 64, height: 64, batch_size: 4}\n")

    class Ckpt:
        def __init__(self, i):
            self.name, self.fingerprint, self.te_fingerprint, self.family = f"c{i}", f"fp{i}", "te", "base"
            self.tags, self.nodes, self.paths = [f"c{i}"], ["pc1"], {"pc1": f"/m/c{i}"}

    with _Bounded(64 * MiB):
        c = load_campaign(str(camp))
        assert c.combinations("j") >= 10**9
        p = plan(c, [Ckpt(0), Ckpt(1)], workers=2)
    assert len(p) == 24 and len({s.key for u in p.units for s in u.samples}) == 24
    again = plan(load_campaign(str(camp)), [Ckpt(0), Ckpt(1)], workers=2)
    assert [u.id for u in again.units] == [u.id for u in p.units]  # deterministic: a rerun skips the same units
