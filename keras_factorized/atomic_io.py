"""Atomic file and folder writes: a result appears complete under its name, or not at all.

Every file the package writes (models, plots, tables, TFLite flatbuffers)
goes through `atomic_output`, and every folder it publishes (SavedModel
versions) through `publish_directory`, with these guarantees:

- A reader sees the old content or the new one, never a mix or a partial
  file: the data is written to a hidden temporary name in the same folder,
  flushed to disk (`fsync`), then renamed over the target in one step, and
  the folder's entry is flushed too. A crash or `SIGKILL` at any point leaves
  the old file (plus, at worst, a hidden `.*.part*` file).
- Concurrent writers of the same target never share a temporary file (each
  name is created exclusively with a random part); the last rename wins.
- With `overwrite=False`, an existing target is never replaced, whatever the
  timing: the rename itself fails if the name exists (`renameat2` with
  `RENAME_NOREPLACE` on Linux, else a hard link, which also fails if the name
  exists), and the caller gets `FileExistsError`.
- Permissions are those of a plain write: a new file gets `0o666` less the
  umask (a new folder `0o777` less the umask), a replaced file keeps its mode.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import socket
import stat
from collections.abc import Iterator

# renameat2(2) flags (linux/fs.h).
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_TEMP_ATTEMPTS = 100


def _renameat2_function():
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                         ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _renameat2_function()


def _renameat2(source: str, target: str, flags: int) -> bool:
    """Calls renameat2; False when the system or file system lacks it."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), source, None, target)


def rename_no_replace(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Renames `source` to `target` in one step, failing if `target` exists.

    Raises:
        FileExistsError: `target` exists (file, folder, even an empty one);
            nothing was changed.
    """
    source, target = os.fspath(source), os.fspath(target)
    if _renameat2(source, target, _RENAME_NOREPLACE):
        return
    if os.path.isdir(source):
        # Without renameat2: rename(2) fails onto a non-empty folder (every
        # folder this package publishes holds files) and onto a file.
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, "File exists", target)
        try:
            os.rename(source, target)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise FileExistsError(errno.EEXIST, "File exists", target) from e
            raise
        return
    os.link(source, target)  # Fails with FileExistsError if `target` exists.
    os.unlink(source)


def _exchange(source: str, target: str) -> bool:
    """Swaps two existing paths in one step; False where unsupported."""
    try:
        return _renameat2(source, target, _RENAME_EXCHANGE)
    except FileNotFoundError:
        return False


def _fsync_path(path: str) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:  # Some file systems cannot fsync folders.
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """Flushes every file and folder under `path` (and `path`) to disk."""
    path = os.fspath(path)
    for folder, _, files in os.walk(path, topdown=False):
        for name in files:
            _fsync_path(os.path.join(folder, name))
        _fsync_path(folder)


def temporary_name(folder: str, base: str, suffix: str = "") -> str:
    """A hidden name in `folder`, unique to this process and attempt.

    The name records the host and process id (`.{base}.{host}-{pid}-{random}
    .part{suffix}`), so `remove_stale_parts` can tell leftovers of killed
    processes from work in progress.
    """
    host = socket.gethostname().replace(".", "_").replace("-", "_") or "host"
    return os.path.join(
        folder, f".{base}.{host}-{os.getpid()}-{secrets.token_hex(6)}.part{suffix}"
    )


def _create_exclusive(folder: str, base: str, suffix: str, is_dir: bool) -> str:
    for _ in range(_TEMP_ATTEMPTS):
        tmp = temporary_name(folder, base, suffix)
        try:
            if is_dir:
                os.mkdir(tmp, 0o777)  # The umask applies, as for a plain mkdir.
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "No unique temporary name", folder)


def remove_stale_parts(folder: str | os.PathLike, base: str) -> list[str]:
    """Removes `.{base}.*.part*` leftovers of dead processes on this host.

    Returns:
        The removed paths. Leftovers of live processes, and of other hosts
        (a shared file system), are kept.
    """
    folder = os.fspath(folder)
    host = socket.gethostname().replace(".", "_").replace("-", "_") or "host"
    prefix = f".{base}.{host}-"
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(prefix) or ".part" not in name:
            continue
        pid_text = name[len(prefix):].split("-", 1)[0]
        if not pid_text.isdigit() or _process_alive(int(pid_text)):
            continue
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)
        removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[str]:
    """Yields a temporary path in `path`'s folder, renamed to `path` on success.

    Write the content to the yielded path (by name: Keras's `model.save`,
    matplotlib's `savefig` and `open(tmp, "w")` all work). On success the
    file is flushed to disk and renamed to `path` in one step; on any failure
    it is removed and `path` is left as it was. The temporary name keeps
    `path`'s extension (Keras and matplotlib pick the format from it);
    temporaries that killed writers left beside `path` are removed first.

    Args:
        path: The file to write.
        overwrite: Whether to replace an existing `path`. Defaults to `True`.
            With `False`, `FileExistsError` is raised (before or after the
            write, whichever notices first) and an existing file is never
            replaced, even by a writer that raced this one.

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
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, "File exists (overwrite=False)", path)
    folder = os.path.dirname(os.path.abspath(path))
    base, suffix = os.path.splitext(os.path.basename(path))
    remove_stale_parts(folder, base)  # Left by writers that were killed.
    tmp = _create_exclusive(folder, base, suffix, is_dir=False)
    try:
        with contextlib.suppress(FileNotFoundError):
            # A replaced file keeps its mode; a new one has the umask's.
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        yield tmp
        _fsync_path(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            rename_no_replace(tmp, path)
        _fsync_path(folder)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def publish_directory(
    source: str | os.PathLike, target: str | os.PathLike, *, overwrite: bool = False
) -> None:
    """Moves the complete folder `source` to `target` in one step.

    `source` must be on the same file system (create it with
    `temporary_directory` in `target`'s parent). Its files are flushed to
    disk first.

    Args:
        source: The finished folder.
        target: Its final name.
        overwrite: Whether to replace an existing `target`. With `True`, the
            two folders are swapped in one `renameat2(RENAME_EXCHANGE)` where
            the system has it (else the old folder is moved aside, then the
            new one in), and the old content is deleted. Defaults to `False`:
            `FileExistsError` if `target` exists, whatever the timing.
    """
    source, target = os.fspath(source), os.fspath(target)
    fsync_tree(source)
    parent = os.path.dirname(os.path.abspath(target))
    if not overwrite:
        rename_no_replace(source, target)
        _fsync_path(parent)
        return
    while True:
        try:
            rename_no_replace(source, target)
            break
        except FileExistsError:
            pass
        if _exchange(source, target):
            shutil.rmtree(source, ignore_errors=True)  # Now the old content.
            break
        if os.path.lexists(target):
            aside = _create_exclusive(parent, os.path.basename(target), ".old", is_dir=True)
            os.rename(target, os.path.join(aside, "old"))
            shutil.rmtree(aside, ignore_errors=True)
    _fsync_path(parent)


def temporary_directory(parent: str | os.PathLike, base: str) -> str:
    """Creates a hidden, empty working folder in `parent` (umask permissions)."""
    return _create_exclusive(os.fspath(parent), base, "", is_dir=True)


def write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> None:
    """Writes `text` (UTF-8) to `path` atomically."""
    with atomic_output(path, overwrite=overwrite) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> None:
    """Writes `data` to `path` atomically."""
    with atomic_output(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
