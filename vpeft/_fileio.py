"""Atomic file writes, shared by adapter files, checkpoints, manifests, result cards and caches."""

from __future__ import annotations

import os
import tempfile
from typing import IO, Callable


def atomic_write(path: str, write: Callable[[IO], None], binary: bool = True) -> None:
    """Write ``path`` so that readers (and a crash) see either the old file or the complete new one.

    ``write`` receives an open file in the target folder; it is flushed, fsynced and renamed over ``path``
    (``os.replace``), then the folder is fsynced so the rename itself survives a power loss. The file gets the mode a
    plain ``open`` would give it. Missing parent folders are created.

    Args:
        path: Destination file.
        write: Callback writing the content to the file object it is given.
        binary: Open the temporary file in binary (default) or text (UTF-8) mode.
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # not every platform can open a directory
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
