"""Atomic file writes: every file the project writes over an existing one goes through here.

The new contents go to a fresh temp file in the target's directory, created with
``O_CREAT | O_EXCL | O_NOFOLLOW`` (so nothing planted at the temp name, a symlink included, is ever
followed or reused), are flushed to disk, and only then ``os.replace`` the target. A failure at any point
leaves the old target byte-identical and no temp file behind. Stdlib only.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_writes", "write_bytes_atomic", "write_text_atomic"]

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
    with atomic_writes([path], mode) as (f,):
        yield f


@contextmanager
def atomic_writes(paths: Sequence[str | os.PathLike], mode: int = 0o644) -> Iterator[list[BinaryIO]]:
    """``atomic_write`` for files that belong together (a dataset's ``.bin``, ``.idx`` and metadata).

    Yields one binary file per path. When the block succeeds every file is flushed to disk first, and
    only then are the targets replaced, in the given order, one rename each (so put the file readers
    check last at the end). On an exception nothing is replaced and no temp file is left.
    """
    targets = [Path(p) for p in paths]
    temps: list[Path] = []
    files: list[BinaryIO] = []
    try:
        for target in targets:
            tmp = _temp_name(target)
            files.append(os.fdopen(os.open(tmp, _FLAGS, mode), "wb"))
            temps.append(tmp)
        yield files
        for f in files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for tmp, target in zip(temps, targets, strict=True):
            os.replace(tmp, target)
    except BaseException:
        for f in files:
            with suppress(OSError):
                f.close()
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    for directory in dict.fromkeys(t.parent for t in targets):
        _fsync_dir(directory)


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
        with suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
