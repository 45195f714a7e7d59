"""Atomic file writes: a temporary file in the target's folder, renamed over the target.

A crash or Ctrl-C while writing leaves the previous file (checkpoint, gallery, CSV ...) intact.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FILE_MODE = 0o644  # mkstemp makes files private (0o600); outputs are meant to be shared


def make_parent(path: Path) -> None:
    """Create the folders above ``path``; a clear error when one of them is a file or not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise FileExistsError(f"Cannot write {path}: a part of its folder {path.parent} is a file, not a folder.") from exc
    except OSError as exc:
        raise write_error(path, exc) from exc


def write_error(path: Path, exc: BaseException) -> OSError:
    """A one-line ``OSError`` for a failed write of ``path`` (disk full, read-only, no permission)."""
    text = str(exc)
    code = getattr(exc, "errno", None)
    if code == errno.ENOSPC or "No space left" in text or "inline_container" in text or "file write failed" in text:
        try:
            free = shutil.disk_usage(path.parent).free / 1024**2
            detail = f" ({free:.0f} MB free)"
        except OSError:
            detail = ""
        return OSError(errno.ENOSPC, f"No space left on the device to write {path}{detail}; the previous file, if "
                                     "any, is intact")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return OSError(code, f"Cannot write {path}: {os.strerror(code)} (a read-only folder or no permission)")
    return OSError(code, f"Could not write {path}: {text}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed over ``path``.

    Missing parent folders are created. On an exception the temporary file is removed and
    ``path`` is left untouched; write failures (disk full, read-only folder) are raised as one
    ``OSError`` that names the file.
    """
    path = Path(path).expanduser()
    make_parent(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise write_error(path, exc) from exc
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except OSError as exc:
        raise write_error(path, exc) from exc
    except RuntimeError as exc:  # torch.save reports a full disk as a RuntimeError
        if "inline_container" in str(exc) or "file write failed" in str(exc):
            raise write_error(path, exc) from exc
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file (or would: the same resolved path)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def refuse_overwriting_inputs(output: str | os.PathLike, inputs: list[str | os.PathLike], flag: str = "--output",
                              protected_folders: list[str | os.PathLike] = ()) -> None:
    """Raise ``ValueError`` when ``output`` is one of ``inputs`` or lies inside a protected folder.

    The one output guard of the library: an output never replaces the file it was computed from.
    """
    for item in inputs:
        if os.path.isfile(item) and os.path.exists(output) and same_file(output, item):
            raise ValueError(f"{flag} {os.fspath(output)!r} is also an input; writing it would destroy that input. "
                             "Choose another output file.")
    out = Path(output).expanduser().resolve()
    for folder in protected_folders:
        root = Path(folder).expanduser().resolve()
        if out == root or root in out.parents:
            raise ValueError(f"{flag} {os.fspath(output)!r} lies inside {os.fspath(folder)!r}, which is an input; "
                             "write it somewhere else.")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (a sidecar ``.<name>.lock`` file) for a read-modify-write.

    Writers of one file (two ``gallery add``, the CLI beside a running service) take turns, so no
    update is lost; readers need no lock because every write is atomic.
    """
    import fcntl

    path = Path(path).expanduser()
    lock_path = path.parent / f".{path.name}.lock"
    make_parent(lock_path)
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
