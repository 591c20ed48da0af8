"""Atomic file writes: every file the project writes over an existing one goes through here.

The new contents go to a fresh temp file in the target's directory, created with
``O_CREAT | O_EXCL | O_NOFOLLOW`` (so nothing planted at the temp name, a symlink included, is ever
followed or reused), are flushed to disk, and only then ``os.replace`` the target. A failure at any point
leaves the old target byte-identical and no temp file behind. Stdlib only.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "write_bytes_atomic", "write_text_atomic"]

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _temp_name(path: Path) -> Path:
    """A hidden, unpredictable sibling of ``path``: ``.NAME.<16 hex>.tmp``."""
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")


@contextmanager
def atomic_write(path: str | os.PathLike, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` when the block ends without an exception.

    ``mode`` is the new file's permission bits (the umask still applies, so it can only tighten them).
    The target's directory must exist. On an exception the temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp = _temp_name(path)
    fd = os.open(tmp, _FLAGS, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    """Atomically replace ``path`` with ``data``."""
    with atomic_write(path, mode) as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str, mode: int = 0o644) -> None:
    """Atomically replace ``path`` with ``text`` encoded as UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"), mode)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (best effort: some filesystems refuse to fsync a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
