"""Atomic file writes: a kill at any moment leaves either the old file or the complete new one.

Pure Python (no torch, no Lightning), so every layer above the quantization core writes through it (the core
writes no files: it returns what to write, e.g. :func:`lit_quant.quant.dump_stats`).
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


#: Name pattern of :func:`atomic_write`'s temporary files (``.<name>.<random>.tmp``).
TEMP_GLOB = ".*.tmp"


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


def remove_stale_temp_files(folder: str | Path) -> None:
    """Delete :func:`atomic_write` temporary files left in ``folder`` by a process that was killed while
    saving (the rename never happened). Call it before this process saves anything there."""
    for path in Path(folder).glob(TEMP_GLOB):
        path.unlink(missing_ok=True)  # missing: another process removed it meanwhile


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(fh)`` on a temporary file beside ``path``, fsync it, then ``os.replace`` it onto ``path``.

    The temporary file lives in the same folder, so the final rename never crosses file systems and is
    atomic; on any error (or a kill) the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write` for text (UTF-8)."""
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))
