"""Atomic writes leave either the whole result or nothing, with the mode a plain write would give."""

import os
import stat

import pytest

from quantnpu.fileio import atomic_directory, atomic_path, atomic_write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_new_file_gets_the_umask_mode_not_mkstemps_private_one(tmp_path, umask_022):
    atomic_write_text(tmp_path / "out.json", "{}")
    assert (tmp_path / "out.json").read_text() == "{}"
    assert _mode(tmp_path / "out.json") == 0o644


def test_replaced_file_keeps_its_mode(tmp_path, umask_022):
    target = tmp_path / "out.md"
    target.write_text("old")
    target.chmod(0o640)
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and _mode(target) == 0o640


def test_interrupted_write_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "model.pte") as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_directory_gets_the_umask_mode_and_replaces_the_old_one(tmp_path, umask_022):
    target = tmp_path / "artifacts"
    target.mkdir()
    (target / "stale").write_text("x")
    with atomic_directory(target) as staging:
        (staging / "fresh").write_text("y")
    assert sorted(p.name for p in target.iterdir()) == ["fresh"]
    assert _mode(target) == 0o755
