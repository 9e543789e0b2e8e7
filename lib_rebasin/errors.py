"""The errors a user can cause or fix, and the one wording of every operating-system error.

The CLI prints these messages as one line, the tab and the REST status show the same text: so the wording of a
file problem (what happened to which file, and what to do) lives here, not in a front end.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path


class CheckpointError(Exception):
    """A file cannot be read or written; the message names the file, what is wrong and what to do."""


class OutputError(CheckpointError):
    """An output cannot be written as asked (refused, or the write failed); nothing was written."""


def _table(**messages: str) -> dict[int, str]:
    return {getattr(errno, name): text for name, text in messages.items() if hasattr(errno, name)}


_READ = _table(
    ENOENT="no such file",
    EACCES="permission denied: this user cannot read it (check the file's permissions)",
    EPERM="permission denied: this user cannot read it (check the file's permissions)",
    EISDIR="is a folder, not a checkpoint file",
    ENAMETOOLONG="file name too long",
    EIO="input/output error while reading (a failing disk, or a drive that was disconnected?)",
    ELOOP="too many levels of symbolic links (a symlink loop?)",
    ENOTDIR="a part of this path is a file, not a folder",
    EMFILE="too many files open at once: raise the limit (ulimit -n) or merge fewer models at a time",
)

_WRITE = _table(
    EACCES="permission denied: cannot write here (choose another folder, or fix its permissions)",
    EPERM="permission denied: cannot write here (choose another folder, or fix its permissions)",
    EROFS="read-only file system: choose an output folder on a writable disk",
    ENOSPC="the disk is full: free some space or choose another folder; nothing was written",
    EDQUOT="disk quota exceeded: free some space or choose another folder; nothing was written",
    EFBIG=("file too large for this file system (FAT32 holds at most 4 GiB per file): "
           "write to an NTFS, exFAT or ext4 disk; nothing was written"),
    EISDIR="is a folder: give a file name",
    ENOENT="folder does not exist",
    ENAMETOOLONG="file name too long: choose a shorter name",
    EIO="input/output error while writing (a failing disk, or a drive that was disconnected?); nothing was written",
    ENOTDIR="a part of this path is a file, not a folder",
)
_SHARING_VIOLATION = 32  # Windows: another program (often the webui) has the file open


def file_error(error: OSError, path: str | os.PathLike | None = None, *, writing: bool = False) -> CheckpointError:
    """A one-line CheckpointError (OutputError when writing) for an OSError on `path`: the file, what happened,
    what to do."""
    name = path if path is not None else (error.filename or "?")
    if getattr(error, "winerror", None) == _SHARING_VIOLATION:
        what = "in use by another program (the webui?): close it there or choose another name"
    else:
        table = _WRITE if writing else _READ
        what = table.get(error.errno) or f"cannot {'write' if writing else 'read'} it ({error.strerror or error})"
    return (OutputError if writing else CheckpointError)(f"{Path(name)}: {what}")


WRITE_ERRNOS = {getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EROFS", "EFBIG") if hasattr(errno, name)}


def user_message(error: BaseException) -> str | None:
    """The one line a user reads for a failure they can do something about (bad input or settings, a file
    problem, no memory), the same in the CLI, the tab and the REST status; None for anything else (a bug)."""
    from .anatomy import ArchitectureError
    if isinstance(error, (CheckpointError, ValueError, ArchitectureError)):
        return str(error)
    if isinstance(error, OSError):
        return str(file_error(error, writing=error.errno in WRITE_ERRNOS))
    if isinstance(error, MemoryError):
        return "out of memory: close other programs and try again; nothing was written"
    return None


__all__ = ["CheckpointError", "OutputError", "file_error", "user_message"]
