"""The one guard every file the tool writes goes through: merges, reports, charts, permutation caches, state.

An output is never one of the job's inputs (by any path: symlink, hard link, relative, other case), never an
existing file unless overwriting was asked, never a folder or a device, never made from an input that changed
while it was read, and it appears only complete: bytes go to a temporary file beside the target,
`.NAME.<host>~<pid>~<random>.rebasin-tmp` (hidden, and not a checkpoint extension, so the webuis never list it),
which is flushed to disk and then committed.  Without overwrite the commit fails if the name appeared meanwhile:
a hard link cannot replace a file (nor can Windows' rename, nor Linux's renameat2 with RENAME_NOREPLACE where a
file system has no hard links).  With overwrite it is an atomic replace.  Any error, cancel or signal removes
the temporary file; one left by a hard kill or a power loss is removed the next time the tool writes into that
folder, once the process that made it is gone.
"""
from __future__ import annotations

import atexit
import ctypes
import errno
import os
import re
import secrets
import shutil
import socket
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Iterable

from .errors import OutputError, file_error
from .interrupts import deferred

TEMP_SUFFIX = ".rebasin-tmp"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
SPACE_MARGIN = 64 << 20                # free space kept beyond an output's size
FOREIGN_TEMP_AGE = 24 * 3600           # seconds: a temporary file of another machine is stale after this long
_NAME_ROOM = 96                        # characters of the target's name kept in a temporary file's name
_TEMP_NAME = re.compile(r"^\..*\.(?P<host>[A-Za-z0-9-]+)~(?P<pid>\d+)~[0-9a-f]{8}" + re.escape(TEMP_SUFFIX) + "$",
                        re.DOTALL)
FAT_FILE_LIMIT = 2**32 - 1             # bytes: the largest file FAT32 (and FAT16) can hold
_FAT_TYPES = {"vfat", "msdos", "fat", "fat12", "fat16", "fat32", "umsdos"}
_NO_HARD_LINKS = {getattr(errno, name) for name in ("EPERM", "EACCES", "EOPNOTSUPP", "ENOTSUP", "ENOSYS", "EMLINK",
                                                       "EXDEV") if hasattr(errno, name)}


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname())[:40].strip("-") or "host"


# --- the checks before any work -------------------------------------------------------------------------------

def _is_input(path: Path, inputs: Iterable[str | os.PathLike]) -> str | None:
    """The input that `path` is (same file by any path), if any."""
    for source in inputs:
        try:
            if os.path.samefile(path, source):
                return str(source)
        except OSError:
            if os.path.normcase(os.path.realpath(path)) == os.path.normcase(os.path.realpath(source)):
                return str(source)
    return None


def _fingerprint(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def check_output_path(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False,
                      *, suffixes: tuple[str, ...] | None = (".safetensors",)) -> Path:
    """Refuse, before any work, an output that cannot or must not be written; returns it as a Path.

    `suffixes`: the extensions it must have; None allows any but a checkpoint's (a report named .safetensors
    would be listed by the webui as a model)."""
    if not str(path).strip():
        raise OutputError("no output file given")
    path = Path(path)
    try:
        return _check_output_path(path, list(inputs), overwrite, suffixes)
    except OSError as e:  # e.g. a name too long for the file system
        raise file_error(e, path, writing=True) from None


def _check_output_path(path: Path, inputs: list, overwrite: bool, suffixes: tuple[str, ...] | None) -> Path:
    if path.is_dir():
        raise OutputError(f"{path}: is a folder: give a file name (e.g. {path / 'merged.safetensors'})")
    source = _is_input(path, inputs) if os.path.lexists(path) else None
    if source is not None:
        alias = "" if os.path.normcase(os.path.abspath(source)) == os.path.normcase(os.path.abspath(path)) \
            else f" ({source})"
        raise OutputError(f"{path}: is an input of this job{alias}: refusing to write over it; choose another name")
    if os.path.lexists(path):
        if not overwrite:
            raise OutputError(f"{path}: already exists: choose another name, or allow overwriting")
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):  # replace the link, or write where it points? Neither guess is safe (/dev/stdout)
            raise OutputError(f"{path}: is a symbolic link (to {os.readlink(path)}): refusing to replace it; give "
                              f"the file's own name, or remove the link")
        if not stat.S_ISREG(mode):
            raise OutputError(f"{path}: exists and is not a regular file (a device, pipe or socket): "
                              f"refusing to replace it")
    lower = path.name.lower()
    if suffixes is not None and not lower.endswith(suffixes):
        raise OutputError(f"{path}: this file is written as {suffixes[0]}: use that extension")
    if suffixes is None and lower.endswith(CHECKPOINT_SUFFIXES):
        raise OutputError(f"{path}: not a checkpoint, so it must not end in {Path(lower).suffix} "
                          f"(the webui would list it as a model): choose another extension")
    if lower.endswith(TEMP_SUFFIX):
        raise OutputError(f"{path}: names ending in {TEMP_SUFFIX} are the tool's temporary files")
    folder = path.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "folder does not exist"
        raise OutputError(f"{folder}: {what} (the output {path.name} would go there)")
    if os.name != "nt" and not os.access(folder, os.W_OK | os.X_OK):
        error = errno.EROFS if _read_only(folder) else errno.EACCES
        raise file_error(OSError(error, os.strerror(error)), folder, writing=True)
    return path


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def check_free_space(folder: str | os.PathLike, nbytes: int, path: str | os.PathLike | None = None) -> None:
    """Refuse before any work when `folder` lacks room for `nbytes` (plus a margin)."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # cannot tell: the write itself will say
    if free < nbytes + min(SPACE_MARGIN, nbytes):
        raise OutputError(f"{path or folder}: not enough free disk space in {folder}: the output needs "
                          f"{nbytes / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free: free some space or choose "
                          f"another folder")


def file_system_type(folder: str | os.PathLike) -> str | None:
    """The type of the file system holding `folder` ('ext4', 'vfat', 'NTFS', 'FAT32', …), None if unknown."""
    folder = os.path.realpath(folder)
    if sys.platform.startswith("linux"):
        best, kind = "", None
        try:
            with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
                for line in f:
                    fields = line.split()
                    if len(fields) < 3:
                        continue
                    point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[1])
                    inside = folder == point or folder.startswith(point.rstrip("/") + "/")
                    if inside and len(point) >= len(best):
                        best, kind = point, fields[2]
        except OSError:
            return None
        return kind
    if os.name == "nt":
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        root = ctypes.create_unicode_buffer(260)
        name = ctypes.create_unicode_buffer(64)
        if kernel32.GetVolumePathNameW(folder, root, 260) and kernel32.GetVolumeInformationW(
                root, None, 0, None, None, None, name, 64):
            return name.value
    return None


def check_file_size_limit(folder: str | os.PathLike, nbytes: int, path: str | os.PathLike | None = None) -> None:
    """Refuse before any work a file bigger than its file system can hold (FAT32: 4 GiB, e.g. a USB stick)."""
    if nbytes <= FAT_FILE_LIMIT:
        return
    kind = file_system_type(folder)
    if kind is not None and kind.lower() in _FAT_TYPES:
        raise OutputError(f"{path or folder}: the output needs {nbytes / 2**30:.2f} GiB, but {folder} is on a FAT "
                          f"file system ({kind}), which holds at most 4 GiB per file: write to an NTFS, exFAT or "
                          f"ext4 disk")


# --- temporary files: live ones, stale ones -------------------------------------------------------------------

_live: set[str] = set()
_live_lock = threading.Lock()
_committed: list[Path] = []


def committed_count() -> int:
    """How many outputs this process has committed so far (a mark for committed_since)."""
    return len(_committed)


def committed_since(mark: int) -> list[Path]:
    """The outputs committed after `mark` (what an interrupted run did write)."""
    return list(_committed[mark:])


def remove_live_temps() -> None:
    """Remove every temporary file this process has open (an emergency exit; normally each job removes its own)."""
    with _live_lock:
        names = list(_live)
        _live.clear()
    for name in names:
        try:
            os.unlink(name)
        except OSError:
            pass


atexit.register(remove_live_temps)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() == 5  # access denied: it exists
        try:
            code = ctypes.c_ulong()
            kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
            return code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def stale_temps(folder: str | os.PathLike, now: float | None = None) -> list[Path]:
    """The tool's temporary files in `folder` that no live process is writing: made on this machine by a
    process that has ended, or on another machine (a shared folder) and untouched for FOREIGN_TEMP_AGE."""
    now = time.time() if now is None else now
    host = _host()
    stale = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if not match or not entry.is_file(follow_symlinks=False):
            continue
        if match["host"] == host:
            if _process_alive(int(match["pid"])):
                continue
        else:
            try:
                if now - entry.stat(follow_symlinks=False).st_mtime < FOREIGN_TEMP_AGE:
                    continue
            except OSError:
                continue
        stale.append(Path(entry.path))
    return stale


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    removed = []
    for path in stale_temps(folder):
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


# --- committing without replacing -----------------------------------------------------------------------------

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _renameat2():
    """Linux's renameat2(2) from the C library, or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def _rename_no_replace(source: Path, target: Path) -> None:
    """Rename that fails with FileExistsError if `target` exists, for file systems without hard links."""
    renameat2 = _renameat2()
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise FileExistsError(code, os.strerror(code), str(target))
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), str(target))
    # Neither: claim the name with an exclusive create, then atomically replace our own empty claim.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    claim = os.fstat(fd)
    os.close(fd)
    try:
        os.replace(source, target)
    except BaseException:
        try:
            now = os.lstat(target)
            if (now.st_dev, now.st_ino) == (claim.st_dev, claim.st_ino):
                os.unlink(target)
        except OSError:
            pass
        raise


def _commit_new(source: Path, target: Path) -> None:
    if os.name == "nt":
        os.rename(source, target)  # never replaces on Windows
        return
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
        _rename_no_replace(source, target)
        return
    try:
        os.unlink(source)
    except OSError:
        pass  # the output is complete; the stale name goes with the next cleanup


def _sync_folder(folder: Path) -> None:
    """Make a rename durable across a power loss (POSIX; Windows has no folder handles for this)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- the guard ------------------------------------------------------------------------------------------------

class OutputFile:
    """A file being written: checked on creation, a temporary file once opened, the target once committed.

        with OutputFile(path, inputs=[a, b], overwrite=False, size=n) as out:
            out.write(data)           # committed when the block ends without error, removed otherwise

    Creating it runs every check that needs no work (see check_output_path, check_free_space); opening it
    proves the folder writable by creating the temporary file, so a job can open it before its expensive part.
    """

    def __init__(self, path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False,
                 size: int = 0, suffixes: tuple[str, ...] | None = (".safetensors",), record: bool = True):
        self.inputs = [str(p) for p in inputs]
        self.record = record  # listed by committed_since (a result the user asked for, not a cache)
        self.path = check_output_path(path, self.inputs, overwrite, suffixes=suffixes)
        self._fingerprints = {p: _fingerprint(p) for p in self.inputs}
        self.overwrite = overwrite
        if size:
            check_file_size_limit(self.path.parent, size, self.path)
            check_free_space(self.path.parent, size, self.path)
        self.tmp: Path | None = None
        self.committed = False
        self._file = None
        self.written = 0

    # -- lifecycle --
    def open(self) -> "OutputFile":
        if self._file is not None:
            return self
        folder = self.path.parent
        remove_stale_temps(folder)
        name = f".{self.path.name[:_NAME_ROOM]}.{_host()}~{os.getpid()}~{secrets.token_hex(4)}{TEMP_SUFFIX}"
        tmp = folder / name
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(tmp, flags, 0o666)  # the umask applies, as for any file the user makes
        except OSError as e:
            raise file_error(e, folder if e.errno != errno.ENAMETOOLONG else self.path, writing=True) from None
        with _live_lock:
            _live.add(str(tmp))
        self.tmp = tmp
        self._file = os.fdopen(fd, "wb", buffering=0)
        return self

    def __enter__(self) -> "OutputFile":
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()

    def write(self, data) -> None:
        """Write all of `data` (bytes-like) at the current position."""
        view = memoryview(data).cast("B")
        total = view.nbytes
        try:
            while view:  # one write() call moves at most ~2 GiB on Linux
                view = view[self._file.write(view):]
        except OSError as e:
            raise file_error(e, self.path, writing=True) from None
        self.written += total

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> None:
        self._file.seek(offset, whence)

    def commit(self) -> Path:
        """Flush to disk and put the file in place; refuse (and discard it) if the name appeared meanwhile."""
        if self.committed:
            return self.path
        try:
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
            except OSError as e:
                raise file_error(e, self.path, writing=True) from None
            source = _is_input(self.path, self.inputs) if os.path.lexists(self.path) else None
            if source is not None:
                raise OutputError(f"{self.path}: is now an input of this job ({source}): not replaced")
            changed = [p for p, before in self._fingerprints.items() if _fingerprint(p) != before]
            if changed:
                raise OutputError(f"{changed[0]}: changed while this job read it (another program wrote it?): the "
                                  f"result would mix two versions, so {self.path.name} was not written; run it again")
            try:
                with deferred():  # a signal must not fall between the rename and knowing it happened
                    if self.overwrite:
                        os.replace(self.tmp, self.path)
                    else:
                        _commit_new(self.tmp, self.path)
                    self.committed = True
                    if self.record:
                        _committed.append(self.path)
                    with _live_lock:
                        _live.discard(str(self.tmp))
            except FileExistsError:
                raise OutputError(f"{self.path}: appeared while this job ran (another job wrote it?): not replaced, "
                                  f"this result was discarded; choose another name, or allow overwriting") from None
            except OSError as e:
                if e.errno == errno.ENOENT and not self.tmp.exists():
                    raise OutputError(f"{self.path}: its temporary file {self.tmp.name} was removed by another "
                                      f"program while this job ran; nothing was written") from None
                raise file_error(e, self.path, writing=True) from None
        finally:
            if not self.committed:
                self.discard()
        _sync_folder(self.path.parent)
        return self.path

    def discard(self) -> None:
        """Close and remove the temporary file (nothing appears)."""
        if self._file is not None and not self._file.closed:
            try:
                self._file.close()
            except OSError:
                pass
        if self.tmp is not None and not self.committed:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass
            except OSError:
                return  # stays registered: removed at exit
            with _live_lock:
                _live.discard(str(self.tmp))


def write_file(path: str | os.PathLike, data: bytes, *, inputs: Iterable[str | os.PathLike] = (),
               overwrite: bool = False, suffixes: tuple[str, ...] | None = None, record: bool = True) -> Path:
    """Write a small file (a report, a chart, a state file) through the guard."""
    with OutputFile(path, inputs=inputs, overwrite=overwrite, size=len(data), suffixes=suffixes,
                    record=record) as out:
        out.write(data)
    return out.path


__all__ = ["OutputFile", "write_file", "committed_count", "committed_since", "check_output_path", "check_free_space", "remove_stale_temps",
           "stale_temps", "remove_live_temps", "TEMP_SUFFIX", "OutputError"]
