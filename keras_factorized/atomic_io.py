"""Atomic file writes: a file appears complete under its name, or not at all.

Every file the package writes (models, plots, tables, TFLite flatbuffers)
goes through `atomic_output`, so a failure or an interrupt never leaves a
half-written file where a user's good one was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path in `path`'s folder, renamed to `path` on success.

    The temporary name keeps `path`'s extension (Keras and matplotlib pick
    the format from it). On any failure the temporary file is removed and
    `path` is left as it was.

    Example:

    >>> import os, tempfile
    >>> target = os.path.join(tempfile.mkdtemp(), "table.csv")
    >>> with atomic_output(target) as tmp:
    ...     with open(tmp, "w") as f:
    ...         _ = f.write("a,b\\n")
    >>> open(target).read()
    'a,b\\n'
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    base, suffix = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{base}.", suffix=f".part{suffix}")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `path` atomically."""
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically."""
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
