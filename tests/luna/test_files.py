"""luna.files: a file or folder under its final name is complete; a failed write leaves the old one."""
from __future__ import annotations

import pytest

from luna.files import atomic_dir, atomic_path, write_json_atomic


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "a.json"
    write_json_atomic(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == '{\n "v": 1\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_dir_creates_a_new_folder(tmp_path):
    with atomic_dir(tmp_path / "out" / "vault") as tmp:
        assert tmp.is_dir() and not any(tmp.iterdir()) and not (tmp_path / "out" / "vault").exists()
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.bin").write_bytes(b"123")
    assert (tmp_path / "out" / "vault" / "sub" / "x.bin").read_bytes() == b"123"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["vault"]


def test_atomic_dir_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    final = tmp_path / "vault"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_dir(final) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (final / "old.txt").read_text() == "old"  # still the complete old folder while building
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["vault"]  # no temporary or old folder left


def test_atomic_dir_error_leaves_the_old_folder_and_no_temporary(tmp_path):
    final = tmp_path / "vault"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final) as tmp:
            (tmp / "new.txt").write_text("half")
            raise KeyboardInterrupt
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["vault"]


def test_atomic_dir_error_on_a_new_folder_creates_nothing(tmp_path):
    with pytest.raises(ValueError):
        with atomic_dir(tmp_path / "vault") as tmp:
            (tmp / "x").write_text("x")
            raise ValueError("bad input")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_fsyncs_the_file_then_its_folder(tmp_path, monkeypatch):
    """The rename is durable only once the folder's entry list is on disk: the folder is fsynced after it."""
    import os

    target = tmp_path / "sub" / "out.json"
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append((os.path.realpath(f"/proc/self/fd/{fd}"), target.exists()))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    with atomic_path(target) as tmp:
        tmp.write_text("{}")
    assert [os.path.basename(p) for p, _ in synced][-1] == "sub"  # the folder, last
    assert synced[-1][1] is True  # after the rename
    assert any(".out.json.tmp" in p for p, existed in synced if not existed)  # the file first, before it
