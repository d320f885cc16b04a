"""Atomic file writes: a kill at any moment leaves either the old file or the complete new one.

Pure Python (no torch, no Lightning), so every layer above the quantization core writes through it (the core
writes no files: it returns what to write, e.g. :func:`lit_quant.quant.dump_stats`).
"""

from __future__ import annotations

import errno
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO


try:
    import fcntl
except ImportError:  # Windows: no advisory locks; stale temporary files are told by their age alone
    fcntl = None  # type: ignore[assignment]

#: Suffix of :func:`atomic_write`'s temporary files (``.<name>.<random>.lit-quant.tmp``): what no other
#: program names its files, so a clean-up never touches a user's own ``.tmp`` files.
TEMP_SUFFIX = ".lit-quant.tmp"
#: A temporary file younger than this (seconds) is never removed: its writer may be about to lock it. Where
#: there are no locks (Windows), only files older than :data:`UNLOCKED_STALE_S` are.
TEMP_GRACE_S = 30.0
UNLOCKED_STALE_S = 24 * 3600.0
#: Suffix of :func:`publish`'s new names before their rename; one left by a kill is removed after a day.
LINK_SUFFIX = ".lit-quant.link"


def describe_os_error(exc: OSError, path: str | Path | None = None) -> str:
    """``<path>: <reason>`` for a failed file operation, naming a full disk, a read-only file system, a
    missing permission or a file standing where a folder should be."""
    where = path if path is not None else (exc.filename or "")
    reason = {
        errno.ENOSPC: "no space left on the device (the disk is full)",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.ENOTDIR: "a file stands where a folder is needed",
        errno.EEXIST: "a file stands where a folder is needed",
        errno.ENOENT: "no such file or folder (or it cannot be created there)",
        errno.EISDIR: "it is a folder, not a file",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    return f"{where}: {reason}" if where else reason


def check_writable(folder: str | Path) -> Path:
    """Create ``folder`` if needed and write, fsync and remove a small probe file in it, so that a folder
    that cannot take the run's outputs (a file in its place, a read-only or full file system) fails before
    any work. Raises ``OSError``; :func:`describe_os_error` words it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    # 64 KiB and an fsync: on a full disk a one-byte write can still land in the page cache and succeed.
    probe = folder / f".write-probe-{os.getpid()}"  # one per process: DDP ranks probe the same folder
    atomic_write(probe, lambda fh: fh.write(b"\0" * 65536))
    probe.unlink()
    return folder


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete :func:`atomic_write` temporary files in ``folder`` that a killed save left behind, and return them.

    Only files this tool names (:data:`TEMP_SUFFIX`) that no live process is writing: a writer holds an
    exclusive ``flock`` on its temporary file until it is renamed into place, so a file whose lock can be
    taken, and that is older than :data:`TEMP_GRACE_S`, belongs to a process that is gone. Another run's save
    in progress, and any file of the user's, are left alone.
    """
    removed = []
    for path in Path(folder).glob(f".*{LINK_SUFFIX}"):  # a hard link shares its file's (old) time: by name
        try:
            if time.time() - path.lstat().st_ctime > UNLOCKED_STALE_S:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:
            continue
    for path in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # removed or renamed meanwhile, or not ours to read
            continue
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # a live writer holds it
            st = os.fstat(fd)
            age = time.time() - st.st_mtime
            if age < (TEMP_GRACE_S if fcntl is not None else UNLOCKED_STALE_S):
                continue
            try:
                if os.stat(path).st_ino != st.st_ino:  # the name now belongs to another file
                    continue
                path.unlink()
                removed.append(path)
            except FileNotFoundError:
                continue
        finally:
            os.close(fd)
    return removed


def _as_os_error(exc: RuntimeError, path: Path) -> OSError:
    """The ``OSError`` behind a ``RuntimeError`` a writer raised (torch's zip writer: "unexpected pos",
    "failed writing file"): ``ENOSPC`` when the folder's file system has no room left, else ``EIO``."""
    try:
        full = os.statvfs(path.parent).f_bavail == 0
    except OSError:
        full = False
    code = errno.ENOSPC if full or "unexpected pos" in str(exc) else errno.EIO
    return OSError(code, os.strerror(code), str(path))


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(fh)`` on a temporary file beside ``path``, fsync it, then ``os.replace`` it onto ``path``.

    The temporary file lives in the same folder, so the final rename never crosses file systems and is
    atomic; on any error (or a kill) the temporary file is removed and ``path`` is untouched. While it is
    written, the temporary file is locked (``flock``), so that :func:`remove_stale_temp_files` in another
    process never removes a save in progress.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as fh:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                write(fh)
                fh.flush()
            except RuntimeError as exc:  # torch.save's own writer reports a failed write as RuntimeError
                raise _as_os_error(exc, path) from exc
            os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary readable files
            if fcntl is not None:  # renamed while still locked; closing the file releases the lock
                os.replace(tmp, path)
        if fcntl is None:  # Windows renames only closed files
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def publish(source: str | Path, target: str | Path) -> None:
    """Make ``target`` name the file ``source`` (a hard link; a copy where the file system has none), in one
    atomic rename: ``target`` is the "newest" pointer of files each run keeps in its own folder, so two runs
    publishing at once both keep their files and ``target`` is one of them, whole."""
    source, target = Path(source), Path(target)
    tmp = target.parent / f".{target.name}.{os.getpid()}-{time.monotonic_ns()}{LINK_SUFFIX}"
    try:
        try:
            os.link(source, tmp)
        except OSError:  # no hard links here (or another file system): a copy, written atomically
            data = source.read_bytes()
            atomic_write(tmp, lambda fh: fh.write(data))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write` for text (UTF-8)."""
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))
