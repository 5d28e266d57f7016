"""The node-shared input cache: an artifact downloaded once per machine for all its processes (the
N torchrun processes of a node), ``shared_local_input``."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from gpt2core.errors import StorageError
from gpt2core.platform.artifacts.manifest import manifest_digest
from gpt2core.platform.artifacts.store import (download_dir, find_artifact, folder_manifest, local_input,
                                               scratch_root, store_for)

log = logging.getLogger(__name__)


def _shared_slot(uri: str) -> tuple[Path, dict]:
    """(the node-wide folder for the s3:// uri, the manifest of its files): the folder is named by
    content (the artifact's manifest digest and uri's folder inside it), so a changed artifact
    never reuses an older copy."""
    found = find_artifact(uri)
    _artifact, manifest, sub = found
    key = hashlib.sha256(f"{manifest_digest(manifest)}\0{sub}".encode()).hexdigest()[:32]
    root = Path(scratch_root() or tempfile.gettempdir()) / f"gpt2ops-shared-{os.getuid()}"
    root.mkdir(parents=True, exist_ok=True)
    return root / key, folder_manifest(uri, found)[1]


@contextlib.contextmanager
def shared_local_input(uri: str) -> Iterator[Path]:
    """Like ``local_input``, but an artifact of a remote store (or a folder inside one) is downloaded
    once per machine and shared by every process on it that asks for the same content (the N
    torchrun processes of a node), in ``<scratch>/gpt2ops-shared-<uid>/<key>/``, ``<key>`` from the
    artifact's manifest digest and the folder inside it. Local paths are used in place.

    Locking (``fcntl.flock``, on the local disk only, nothing shared across nodes), two lock files:

    - enter: LOCK_EX on ``<key>.lock`` (one entrant at a time), then LOCK_SH on ``<key>.users``,
      held for the whole block. If ``<key>/`` exists it is complete (renamed into place last) and
      is used; else any ``<key>.partial`` (a crashed downloader's) is removed, the files downloaded
      and verified into it, and it is renamed to ``<key>``. Then ``<key>.lock`` is released: the
      others wait on it only while a download runs;
    - exit: try LOCK_EX on ``<key>.users`` without blocking; only the last user gets it (everyone
      else still in a block, or downloading, holds LOCK_SH), and it removes ``<key>/``. An entrant
      meanwhile waits for its LOCK_SH until that removal is done, then finds no folder and
      downloads again. The two empty lock files stay (removing them would race with their users).
      A process killed in its block leaves the folder behind (its lock goes with it): the next
      user of the same content reuses it and cleans up.

    Within one process a second block on the same folder (eval data = train data) shares the first
    one's hold: a second flock would wait on the process's own LOCK_SH.
    """
    if not store_for(uri).remote:
        with local_input(uri) as path:
            yield path
        return
    folder, expected = _shared_slot(uri)
    with _held_lock:
        if folder in _held:  # this process holds it already (eval data = train data): flock on a
            _held[folder][1] += 1  # second descriptor would wait on our own LOCK_SH forever
            reused = True
        else:
            _held[folder] = [_acquire_shared(uri, folder, expected), 1]
            reused = False
    if reused:
        log.info("using %s, held already by this process, from %s", uri, folder)
    try:
        yield folder
    finally:
        with _held_lock:
            _held[folder][1] -= 1
            if _held[folder][1] == 0:
                _release_shared(_held.pop(folder)[0], folder)


_held: dict[Path, list] = {}  # shared folder -> [lock fd, users in this process]
_held_lock = threading.Lock()


def _acquire_shared(uri: str, folder: Path, expected: dict) -> int:
    """Make folder hold uri's files (downloading them unless they are there) and return the
    ``<key>.users`` descriptor, holding LOCK_SH; see ``shared_local_input``."""
    import fcntl

    entry = os.open(folder.with_name(folder.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(entry, fcntl.LOCK_EX)
        users = os.open(folder.with_name(folder.name + ".users"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(users, fcntl.LOCK_SH)  # waits while the last user out removes the folder
            if folder.is_dir():
                log.info("using %s, downloaded already on this node, from %s", uri, folder)
                return users
            partial = folder.with_name(folder.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)  # a crashed downloader's
            nprocs = os.environ.get("LOCAL_WORLD_SIZE")  # torchrun's
            log.info("downloading %s once for the %sprocesses of this node into %s", uri,
                     f"{nprocs} " if nprocs else "", folder)
            got = download_dir(uri, partial)
            if got["files"] != expected["files"]:
                shutil.rmtree(partial, ignore_errors=True)
                raise StorageError(f"{uri}: the artifact changed during the download; retry")
            os.replace(partial, folder)
            return users
        except BaseException:
            os.close(users)
            raise
    finally:
        os.close(entry)


def _release_shared(users: int, folder: Path) -> None:
    """Drop this process's LOCK_SH; the last user (the one that gets LOCK_EX) removes the folder."""
    import fcntl

    try:
        fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pass  # others still use it; the last one out removes it
    else:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(folder.with_name(folder.name + ".partial"), ignore_errors=True)
    finally:
        os.close(users)
