"""Crash-safe file writes: a reader (or a restarted run) sees the old file or the new one, never half of one.

`write_atomic` writes a file beside its target, flushes and fsyncs it, renames it over the target and
fsyncs the folder so the rename itself survives a power cut. `replace_dir` does the same for a whole
folder written beside its target (an exported policy or reward model).
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path


def fsync_dir(directory: str | Path) -> None:
    """fsync a folder, so a rename or a new entry in it is on disk (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: str | bytes, mode: int | None = None) -> Path:
    """Write `data` to `path` through a temp file in the same folder: flush, fsync, os.replace, fsync the folder.

    mode: the file's permission bits (e.g. 0o600), set on the temp file before any data is written; by
    default the umask's, as a plain open() would give.
    """
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # created with `mode` (0600: never readable by others, not even empty), or 0666 less the umask
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
    try:
        f = os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise
    try:
        with f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)  # exactly `mode`, whatever the umask
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def staging_dir(directory: str | Path) -> Path:
    """An empty folder beside `directory` to write a whole export into before `replace_dir` moves it in."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(tmp: str | Path, directory: str | Path) -> Path:
    """Move the finished folder `tmp` to `directory`, replacing what was there (kept aside until the move)."""
    tmp, directory = Path(tmp), Path(directory)
    for file in (p for p in tmp.rglob("*") if p.is_file()):
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    if directory.exists():
        old = directory.with_name(directory.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)
    fsync_dir(directory.parent)
    return directory
