"""Where commands write: output locations checked before compute, files and folders written
atomically.

Every command that writes (``merge``, ``evaluate --json``, ``experiment -o``, ``family build``,
``inspect --plots``, ``--export-lm-eval``) checks its outputs with :func:`check_output_file` or
:func:`check_output_folder` before it computes anything, so a read-only disk or a file where a
folder belongs is one ``error:`` line at once rather than a traceback after an hour. The writes
themselves go to a temporary sibling (:func:`atomic_file`, :class:`StagedFolder`) that is
renamed into place only when complete: a full disk, a crash or a kill never leaves a truncated
file or a half-written folder where the user expects a whole one.

Only the standard library and :mod:`dammerge.errors` are imported, so every part of the package
(and the command line, which must not import torch) can use this module.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dammerge.errors import OutputError

TMP_MARKER = ".dammerge-tmp-"
# Failures that are about the place written to, whatever file the operating system names.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})
DENIED_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
WRITABLE_HINT = "choose a writable location"


# --------------------------------------------------------------------------- errors


def output_error(exc: OSError, out: Path) -> OutputError:
    """A failed write to ``out`` as a one-line :class:`OutputError` (disk full, denied, other)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(
            f"disk full while writing {out}", "free space on that disk or choose another output"
        )
    if exc.errno in DENIED_ERRNOS:
        return OutputError(f"cannot write {out}: {exc.strerror}", WRITABLE_HINT)
    return OutputError(f"cannot write {out}: {exc.strerror or exc}")


def _concerns(exc: OSError, *places: Path) -> bool:
    """Whether ``exc`` is a failure to write one of ``places`` (or anything inside them)."""
    if exc.errno in DISK_ERRNOS:
        return True
    names = [name for name in (exc.filename, exc.filename2) if name]
    for name in names:
        path = Path(os.path.abspath(os.fsdecode(name)))
        if any(path == place or path.is_relative_to(place) for place in places):
            return True
    return False


# --------------------------------------------------------------------------- checks


def _nearest_existing(path: Path) -> Path:
    """``path`` itself if it exists, else its closest ancestor that does."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor)


def _check_can_create_in(folder: Path, out: Path, what: str) -> None:
    """Refuse ``out`` unless ``folder`` exists as a writable folder or can be created.

    ``folder`` is the folder whose entries change (the output's parent for an output renamed
    into place, the output itself for one filled file by file). When it is missing, its nearest
    existing ancestor must be a folder we may create folders in.
    """
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise OutputError(
            f"cannot write {what} {out}: {existing} is a file, not a folder",
            "choose an output path whose folders are folders",
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {what} {out}: {existing} is not writable", WRITABLE_HINT)


def check_output_file(path: str | Path, what: str = "output file") -> Path:
    """Check before compute that a file can be written (atomically) at ``path``; return it
    absolute.

    Refused: a folder at ``path``, a file where one of its folders belongs, and a folder that
    is missing and cannot be created or exists and is not writable. An existing file is
    replaced when the write is complete.
    """
    path = Path(os.path.abspath(Path(path).expanduser()))
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder", "give a file name for the output")
    _check_can_create_in(path.parent, path, what)
    return path


def check_output_folder(
    out: str | Path, what: str = "output folder", *, fill: bool = False
) -> Path:
    """Check before compute that a folder can be written at ``out``; return it absolute.

    ``fill=False``: the folder is built in a temporary sibling and renamed into place
    (:class:`StagedFolder`), so its parent must be writable. ``fill=True``: files are written
    into the folder itself (each atomically), so the folder must be writable, or creatable when
    missing. A file at ``out`` is refused either way.
    """
    out = Path(os.path.abspath(Path(out).expanduser()))
    if out.exists() and not out.is_dir():
        raise OutputError(
            f"{what} {out} exists and is not a folder", "choose another output folder"
        )
    _check_can_create_in(out if fill else out.parent, out, what)
    if not fill and out.is_dir():
        _check_replaceable(out, what)
    return out


def _check_replaceable(out: Path, what: str) -> None:
    """An existing folder is swapped for the new one by a rename, which needs the folder
    itself writable (its ``..`` entry changes) and not a mount point."""
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {what} {out}: it is not writable", WRITABLE_HINT)
    if os.path.ismount(out):
        raise OutputError(
            f"cannot write {what} {out}: it is a mount point, which cannot be replaced",
            "write into a new folder inside it",
        )


# --------------------------------------------------------------------------- atomic files


def make_parents(path: Path) -> None:
    """Create the folders above ``path``; a failure is an :class:`OutputError`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(exc, path) from None


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the block ends without error it replaces
    ``path`` (one rename). On any error the temporary file is removed and a failed write
    (disk full, permission denied) becomes an :class:`OutputError`.

    The temporary name keeps ``path``'s suffix, so writers that choose a format by the file
    name (matplotlib's ``savefig``) write the same format.
    """
    path = Path(path)
    make_parents(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    except OSError as exc:
        raise output_error(exc, path) from None
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from others
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if _concerns(exc, tmp, path):
            raise output_error(exc, path) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's file-creation mask (reading it means setting it, so it is set back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, data: Any, **dump_options: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (``indent=2`` unless told otherwise)."""
    dump_options.setdefault("indent", 2)
    write_text_atomic(path, json.dumps(data, **dump_options) + "\n")


# --------------------------------------------------------------------------- atomic folders


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(out: Path) -> None:
    """Remove temporary folders that killed runs (dead processes) left beside ``out``."""
    if not out.parent.is_dir():
        return
    prefix = f".{out.name}{TMP_MARKER}"
    for candidate in out.parent.glob(f"{prefix}*"):
        pid_text = candidate.name[len(prefix) :].split("-")[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            shutil.rmtree(candidate, ignore_errors=True)


class StagedFolder:
    """A folder built in a temporary sibling (``.NAME.dammerge-tmp-PID``) and renamed to
    ``out`` by :meth:`commit`.

    Use as a context manager and write into :attr:`tmp`. Entering cleans the temporaries of
    dead runs and creates the missing parents; leaving without :meth:`commit` (an error, a
    Ctrl-C) deletes the temporary folder and the parents it created, so nothing is left. A
    failed write inside the block (disk full, permission denied) becomes an
    :class:`OutputError` naming ``out``. With ``replace``, an existing ``out`` is swapped out
    and deleted only after the new folder is in place.
    """

    def __init__(self, out: str | Path, *, replace: bool = False) -> None:
        self.out = Path(os.path.abspath(Path(out).expanduser()))
        self.replace = replace
        self.tmp = self.out.parent / f".{self.out.name}{TMP_MARKER}{os.getpid()}"
        self._committed = False
        missing = [p for p in (self.out.parent, *self.out.parent.parents) if not p.exists()]
        self._created_parent: Path | None = missing[-1] if missing else None

    def __enter__(self) -> StagedFolder:
        clean_stale_temporaries(self.out)
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir()
        except OSError as exc:
            self._remove_created_parents()
            raise output_error(exc, self.out) from None
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self._committed:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self._remove_created_parents()
        if isinstance(exc, OSError) and _concerns(exc, self.tmp, self.out):
            raise output_error(exc, self.out) from None

    def _remove_created_parents(self) -> None:
        """Undo ``mkdir -p`` of the output's parents, so a failed run leaves no trace."""
        if self._created_parent is None:
            return
        folder = self.out.parent
        while True:
            try:
                folder.rmdir()  # only succeeds on empty folders: never removes anything else
            except OSError:
                return
            if folder == self._created_parent:
                return
            folder = folder.parent

    def commit(self) -> Path:
        """Move the finished folder to ``out`` (replacing an old one when allowed)."""
        trash = None
        try:
            if self.out.exists():
                if not self.replace:
                    raise OutputError(f"output folder {self.out} appeared while writing")
                trash = self.out.parent / f".{self.out.name}{TMP_MARKER}{os.getpid()}-old"
                os.replace(self.out, trash)
            os.replace(self.tmp, self.out)
        except OSError as exc:
            if trash is not None and not self.out.exists():
                os.replace(trash, self.out)  # put the old folder back
            raise output_error(exc, self.out) from None
        self._committed = True
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return self.out
