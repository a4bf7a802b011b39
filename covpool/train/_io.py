"""Atomic file writes, the one way every output of the application is written (checkpoints, metrics.csv,
plots, the benchmark's CSV and PNG).

The bytes go to a temporary file ``.<name>.<random>.tmp`` in the destination's folder (same file system, so
the rename is atomic), are flushed and fsynced, and the file is moved into place with :func:`os.replace`. A
crash mid-write leaves the previous file whole and no partial file under the real name;
:func:`covpool.train.checkpoint.remove_stale_temp_files` clears what a killed process left behind.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "os_error_in"]


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object],
                 advice: str = "Free space there (or choose another folder) and try again") -> Path:
    """Call ``write(f)`` on a binary file that becomes ``path`` only once it is complete.

    On any error the temporary file is removed and the old ``path``, if any, is untouched; the folder is
    created when missing.

    Raises:
        OSError: the write failed (full disk, quota, I/O error); the message names ``path``, the cause
            (which torch.save otherwise reports as a bare "unexpected pos" RuntimeError), whether the old
            file survived, and ``advice``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        cause = os_error_in(err)
        if cause is None:
            raise
        kept = "the previous file is untouched" if path.exists() else "nothing was written"
        message = f"could not write {path}: {cause.strerror or cause}; {kept}. {advice}"
        raise (OSError(cause.errno, message) if cause.errno is not None else OSError(message)) from err
    return path


def os_error_in(err: BaseException | None) -> OSError | None:
    """The OSError behind ``err`` (torch.save reports ENOSPC as a RuntimeError raised while cleaning up)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
