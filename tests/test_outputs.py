"""Output locations are checked before compute and written atomically (dammerge.outputs)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from dammerge.errors import OutputError
from dammerge.outputs import (
    TMP_MARKER,
    StagedFolder,
    atomic_file,
    check_output_file,
    check_output_folder,
    write_json_atomic,
    write_text_atomic,
)


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- checks


def test_writable_places_pass_and_come_back_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_output_file(Path("new/deeper/scores.json")) == tmp_path / "new/deeper/scores.json"
    assert check_output_folder(Path("out")) == tmp_path / "out"
    (tmp_path / "existing").mkdir()
    assert check_output_folder("existing", fill=True) == tmp_path / "existing"
    assert entries(tmp_path) == ["existing"]  # checking creates nothing


def test_unwritable_places_are_refused(unwritable_folder):
    for check in (
        lambda: check_output_file(unwritable_folder / "scores.json"),
        lambda: check_output_folder(unwritable_folder / "out"),
        lambda: check_output_folder(unwritable_folder / "a" / "b", fill=True),
    ):
        with pytest.raises(OutputError, match="cannot write") as info:
            check()
        assert info.value.hint


def test_files_and_folders_in_each_others_place_are_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        check_output_file(tmp_path / "folder")
    for fill in (False, True):
        with pytest.raises(OutputError, match="not a folder"):
            check_output_folder(tmp_path / "file", fill=fill)
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_file(tmp_path / "file" / "inside.json")


# --------------------------------------------------------------------------- atomic files


def test_atomic_file_replaces_only_when_complete(tmp_path):
    target = tmp_path / "deep" / "scores.json"
    write_json_atomic(target, {"a": 1})
    assert target.read_text() == '{\n  "a": 1\n}\n'
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text('{"half')
        raise RuntimeError("killed mid-write")
    assert target.read_text() == '{\n  "a": 1\n}\n'  # the old file, whole
    assert entries(target.parent) == ["scores.json"]  # no temporary left


def test_a_full_disk_is_one_output_error_and_leaves_nothing(tmp_path):
    target = tmp_path / "report.md"
    with pytest.raises(OutputError, match="disk full") as info, atomic_file(target) as tmp:
        tmp.write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert "free space" in info.value.hint
    assert entries(tmp_path) == []


def test_an_unrelated_os_error_is_not_disguised(tmp_path):
    missing = tmp_path / "input.txt"
    with pytest.raises(FileNotFoundError), atomic_file(tmp_path / "out.txt"):
        missing.read_text()
    assert entries(tmp_path) == []


def test_the_temporary_keeps_the_suffix(tmp_path):
    with atomic_file(tmp_path / "plot.png") as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path
        tmp.write_bytes(b"png")
    write_text_atomic(tmp_path / "note.txt", "é")
    assert (tmp_path / "note.txt").read_text(encoding="utf-8") == "é"


# --------------------------------------------------------------------------- staged folders


def test_a_staged_folder_appears_whole_and_replaces_the_old_one(tmp_path):
    out = tmp_path / "made" / "out"
    with StagedFolder(out) as staged:
        (staged.tmp / "a.txt").write_text("1")
        assert not out.exists()
        staged.commit()
    assert entries(out) == ["a.txt"]
    with StagedFolder(out, replace=True) as staged:
        (staged.tmp / "b.txt").write_text("2")
        staged.commit()
    assert entries(out) == ["b.txt"]
    assert entries(out.parent) == ["out"]  # no temporary or old copy left


def test_a_failed_staged_folder_leaves_no_trace(tmp_path):
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(OutputError, match="disk full"), StagedFolder(out) as staged:
        (staged.tmp / "a.txt").write_text("1")
        raise OSError(errno.ENOSPC, "No space left on device", str(staged.tmp / "b.txt"))
    assert entries(tmp_path) == []  # not even the parents it created


def test_a_staged_folder_keeps_an_existing_one_without_replace(tmp_path):
    out = tmp_path / "out"
    with StagedFolder(out) as staged:
        out.mkdir()  # another run finished first
        (out / "theirs.txt").write_text("keep")
        with pytest.raises(OutputError, match="appeared"):
            staged.commit()
    assert entries(out) == ["theirs.txt"]
    assert not list(tmp_path.glob(f".out{TMP_MARKER}*"))


def test_staging_under_a_file_is_an_output_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot write"), StagedFolder(tmp_path / "file" / "o"):
        pass


def test_a_folder_that_cannot_be_renamed_away_is_refused_as_a_replaced_output(
    unwritable_folder, tmp_path
):
    """An existing output replaced whole is renamed away: a read-only folder or a mount point
    cannot be, though its parent is writable. Filled file by file, it must be writable."""
    if not unwritable_folder.is_dir():
        pytest.skip("needs an existing unwritable folder")
    with pytest.raises(OutputError, match=r"cannot write .*(not writable|mount point)"):
        check_output_folder(unwritable_folder)
    with pytest.raises(OutputError, match="not writable"):
        check_output_folder(unwritable_folder, fill=True)


def test_an_atomic_write_gets_the_permissions_a_plain_write_would(tmp_path):
    plain, atomic = tmp_path / "plain.txt", tmp_path / "atomic.txt"
    plain.write_text("x")
    write_text_atomic(atomic, "x")
    assert atomic.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
