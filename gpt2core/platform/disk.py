"""Full disks: a write that fails for want of space (ENOSPC, or a quota's EDQUOT) becomes one
``DiskFullError`` line naming the folder, the space the write needed and the space free, after the
writer's temporary files are removed (they would keep the disk full).

    with disk_space(folder, needed=total_bytes, doing=f"writing {name}", remove=[tmp]):
        write()

Whatever raised it (an ``OSError`` from ``write``, h5py's ``OSError``, torch's ``RuntimeError``
raised while handling one, safetensors' ``SafetensorError`` that keeps only the error's text), the
cause is found in the exception's chain.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from gpt2core.errors import DiskFullError

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# What libraries that wrap the OSError in their own exception keep of it: its message (safetensors'
# Rust writer raises "SafetensorError(... No space left on device (os error 28))").
_NO_SPACE_TEXT = tuple(os.strerror(code) for code in _NO_SPACE)


def _no_space_cause(exc: BaseException | None) -> BaseException | None:
    """The exception in exc's chain (itself, its causes and contexts) that says the disk is full: an
    ENOSPC/EDQUOT ``OSError``, or an exception whose message carries that error's text; else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            return exc
        if any(text in str(exc) for text in _NO_SPACE_TEXT):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the filesystem holding path (or its nearest existing folder); None if unknown."""
    path = Path(path).absolute()
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def human_bytes(n: int | None) -> str:
    """``1.5 GB``-style (decimal units), ``unknown`` for None."""
    if n is None:
        return "unknown"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _disk_full_error(folder: str | Path, *, doing: str, needed: int | None) -> DiskFullError:
    """The one-line error for a write into folder that found no space."""
    free = human_bytes(free_bytes(folder))
    space = f"needs about {human_bytes(needed)}, {free} free" if needed is not None else \
        f"needs more than the {free} free"
    return DiskFullError(f"{folder}: no space left on device {doing} ({space}); free space there or write "
                         f"elsewhere")


@contextlib.contextmanager
def disk_space(folder: str | Path, *, doing: str, needed: int | None = None,
               remove: Iterable[str | Path] = ()) -> Iterator[None]:
    """Turn a no-space failure inside the block into a DiskFullError naming folder (or the folder of
    the file the system names), what was being done, ``needed`` bytes (the block's estimate) and the
    free space; the paths in ``remove`` (the block's temporary files or folders) are deleted first.
    Other errors, and a DiskFullError a writer inside raised, pass unchanged."""
    try:
        yield
    except BaseException as exc:
        full = None if isinstance(exc, DiskFullError) else _no_space_cause(exc)
        if full is None:
            raise  # not a full disk, or worded already by a writer inside
        for path in remove:
            path = Path(path)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        filename = getattr(full, "filename", None)  # the system's word on where, when it gives one
        where = Path(filename).parent if filename else folder
        raise _disk_full_error(where, doing=doing, needed=needed) from exc
