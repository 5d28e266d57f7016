"""Full disks: a write that fails for want of space (ENOSPC, or a quota's EDQUOT) becomes one
``DiskFullError`` line naming the folder, the space the write needed and the space free, after the
writer's temporary files are removed (they would keep the disk full).

    with disk_space(folder, needed=total_bytes, doing=f"writing {name}", remove=[tmp]):
        write()

Whatever raised it (an ``OSError`` from ``write``, h5py's ``OSError``, or torch's ``RuntimeError``
raised while handling one), the cause is found in the exception's chain.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from gpt2core.errors import DiskFullError

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def no_space_cause(exc: BaseException | None) -> OSError | None:
    """The ENOSPC/EDQUOT ``OSError`` in exc's chain (its causes and contexts), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
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


def disk_full_error(folder: str | Path, *, doing: str, needed: int | None) -> DiskFullError:
    """The one-line error for a write into folder that found no space."""
    wanted = f"needs about {human_bytes(needed)}" if needed is not None else "needs more space"
    return DiskFullError(f"{folder}: no space left on device {doing} ({wanted}, "
                         f"{human_bytes(free_bytes(folder))} free); free space there or write elsewhere")


@contextlib.contextmanager
def disk_space(folder: str | Path, *, doing: str, needed: int | None = None,
               remove: Iterable[str | Path] = ()) -> Iterator[None]:
    """Turn a no-space failure inside the block into a DiskFullError naming folder, what was being
    done, ``needed`` bytes (the block's estimate) and the free space; the paths in ``remove`` (the
    block's temporary files or folders) are deleted first. Other errors pass unchanged."""
    try:
        yield
    except BaseException as exc:
        if no_space_cause(exc) is None:
            raise
        for path in remove:
            path = Path(path)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        raise disk_full_error(folder, doing=doing, needed=needed) from exc
