"""Atomic writes: a reader sees the old file or the new one, never half of either.

Each write goes to a temporary name in the destination's own folder (so the final rename never
crosses a file system), is flushed and fsynced, then renamed over the destination. What a killed
process leaves behind (``.<name>.<random>.tmp``, or ``.<name>.old`` between the two renames that
replace a folder) is put right by ``recover`` when the next run starts, for the names the folder's
owner says it writes. Files and folders get the user's umask, as any other program's would (the
temporary names are created owner-only).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from tuneforge.core.errors import RunStopped, UserError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _umask()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def disk_error(exc: OSError, path: Path) -> UserError:
    """The one line for a failed write: a full disk or a file-size limit stops a run (exit 3)."""
    if exc.errno == errno.ENOSPC:
        return RunStopped("no space left on the device", str(path),
                          "free some disk space or choose another output folder; what was written before is whole")
    if exc.errno == errno.EFBIG:
        return RunStopped("the file grew past the size limit of this process or file system", str(path),
                          "raise the limit (ulimit -f) or choose another output folder; what was written before is "
                          "whole")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError("cannot write here", str(path), "choose a folder you can write to")
    return UserError(f"cannot write: {exc.strerror}", str(path))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def file_on_the_way(path: str | os.PathLike) -> Path | None:
    """The file among ``path``'s parents, if one is there: no folder can be made under it, so ``path``
    cannot be written (the nearest parent that exists decides)."""
    for parent in Path(path).expanduser().parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; on success it replaces ``path``.

    The caller writes the file (and should fsync it); on any exception the temporary is removed.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise disk_error(exc, path) from exc
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise disk_error(exc, path) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it takes the place of ``path``.

    An existing ``path`` is replaced only once the new directory is complete, so a crash leaves
    either the old directory or the new one. Files inside are fsynced before the rename.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise disk_error(exc, path) from exc
    try:
        yield tmp
        for f in tmp.rglob("*"):  # a writer may make its files owner-only (safetensors does): the umask's modes
            if f.is_symlink():
                continue
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            os.chmod(f, (0o666 if f.is_file() else 0o777) & ~UMASK)
        os.chmod(tmp, 0o777 & ~UMASK)
        if path.exists():
            # Two renames: the old directory moves aside, the new one takes its name.
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise disk_error(exc, path) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover(folder: str | os.PathLike, ours: Callable[[str], bool]) -> list[str]:
    """Put right what a killed write left in ``folder``, for the entries ``ours`` says its owner writes
    (a user's own ``.notes.tmp`` is never touched): a ``.<name>.old`` whose replacement never arrived
    becomes ``<name>`` again, any other ``.old`` and every ``.<name>.<random>.tmp`` is removed.
    Returns the names it touched."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    touched = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if not name.startswith(".") or not name.endswith((".old", ".tmp")):
            continue
        original = name[1:-len(".old")] if name.endswith(".old") else name[1:-len(".tmp")].rpartition(".")[0]
        if not ours(original):
            continue
        if name.endswith(".old") and not (folder / original).exists():
            os.replace(entry, folder / original)
        else:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        touched.append(name)
    return touched
