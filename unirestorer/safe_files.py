"""Writing outputs that cannot be clobbered: temp file + fsync + rename, never through a symlink.

Every file the project writes for a user (restored images, eval tables, bundles, trees, checkpoint
markers) goes through `atomic_write` / `atomic_path`: the data lands in a fresh temporary file in the
destination folder (created with O_EXCL | O_NOFOLLOW), is fsynced, and is renamed over the destination,
then the folder is fsynced. A reader sees the old file or the new one, never half of one. A destination
that is a symbolic link is refused (`UnsafePathError`), so a link planted in an output folder cannot
redirect a write elsewhere; `child` keeps user-given names inside their output folder. Files get the
mode any new file gets (0666 less the umask), whatever library wrote the temporary file.

A symbolic link in a *parent* of an output (a home folder that links to a data disk) is resolved once,
by `output_folder` when a command starts; from then on the command writes below that resolved path, and
the output folder itself, anything inside it and every temporary name must not be links.
`check_writable` refuses, before any work is done, an output whose place is a file or not writable.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


class UnsafePathError(OSError):
    """A write that would follow a symlink, leave its folder, or replace a file it must not replace."""


def refuse_symlink(path: str | os.PathLike) -> Path:
    """`path` as a Path, or UnsafePathError when it is a symbolic link (dangling ones included)."""
    p = Path(path)
    if p.is_symlink():
        raise UnsafePathError(f"{p} is a symbolic link (to {os.readlink(p)}); refusing to write through it")
    return p


def child(folder: str | os.PathLike, name: str, what: str = "name") -> Path:
    """folder / name, where `name` must be one plain path component (no '/', no '..', not hidden)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or name.startswith("."):
        raise UnsafePathError(f"{what} {name!r} must be a plain file or folder name (no '/', '..' or leading '.')")
    return Path(folder) / name


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or new file in `folder` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def output_folder(folder: str | os.PathLike, what: str = "--output") -> Path:
    """The output folder with the links in its parents resolved once; a link at the folder itself, or a
    file in its place, is refused. Nothing is created."""
    p = Path(folder)
    if p.is_symlink():
        raise UnsafePathError(f"{what} {p} is a symbolic link (to {os.readlink(p)}); refusing to write through it")
    if p.exists() and not p.is_dir():
        raise UnsafePathError(f"{what} {p} exists and is not a folder")
    return p.absolute().parent.resolve() / p.name if p.name else p.resolve()


def check_writable(path: str | os.PathLike, what: str, folder: bool = True) -> None:
    """Refuse (UnsafePathError) an output that could not be written: a `folder` whose place is a file, a
    file whose place is a folder or link, or a nearest existing ancestor that is a file or not writable."""
    p = Path(path)
    if p.is_symlink():
        raise UnsafePathError(f"{what} {p} is a symbolic link; refusing to write through it")
    if p.exists() and (not p.is_dir() if folder else not p.is_file()):
        raise UnsafePathError(f"{what} {p} exists and is not a {'folder' if folder else 'regular file'}")
    probe = p if folder and p.exists() else p.absolute().parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UnsafePathError(f"{what} {p}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UnsafePathError(f"{what} {p}: {probe} is not writable")


def ensure_dir(folder: str | os.PathLike) -> Path:
    """Create `folder` (and parents) unless it exists; a symlink or a file in its place is refused."""
    p = refuse_symlink(folder)
    p.mkdir(parents=True, exist_ok=True)
    return p


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary path beside `dest`; on success it is fsynced and renamed onto `dest`.

    On an exception the temporary file is removed and `dest` is untouched. `overwrite=False` refuses an
    existing `dest` (checked before and, against a racing writer, at the rename via a hard link).
    """
    dest = refuse_symlink(dest)
    if not overwrite and dest.exists():
        raise UnsafePathError(f"{dest} already exists; refusing to replace it")
    folder = dest.parent
    for n in range(100):
        tmp = folder / f".{dest.name}.tmp{os.getpid()}.{n}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666))
            mode = tmp.stat().st_mode & 0o777  # 0666 less the umask: what a new file gets
            break
        except FileExistsError:
            continue
    else:
        raise UnsafePathError(f"cannot create a temporary file beside {dest}")
    try:
        yield tmp
        refuse_symlink(tmp)  # the writer must have written the file itself, not replaced it by a link
        os.chmod(tmp, mode)  # a writer that replaced it (safetensors: a 0600 temp + rename) gets the same mode
        fsync_file(tmp)
        refuse_symlink(dest)
        if overwrite:
            os.replace(tmp, dest)
        else:
            try:
                os.link(tmp, dest)  # fails if dest appeared meanwhile
            except FileExistsError:
                raise UnsafePathError(f"{dest} already exists; refusing to replace it") from None
            os.unlink(tmp)
        fsync_dir(folder)
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()


def atomic_write(dest: str | os.PathLike, data: bytes | str, overwrite: bool = True) -> None:
    """Write bytes (or UTF-8 text) to `dest` atomically, never through a symlink."""
    payload = data.encode() if isinstance(data, str) else data
    with atomic_path(dest, overwrite) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
