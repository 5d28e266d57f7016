"""What stages read besides their request (datasets and training checkpoints, local or s3://) and the
local folders they work in."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from gpt2core.errors import ConfigError, DataError, StorageError
from gpt2core.platform.artifacts import fetch_file, is_s3, local_input, shared_local_input
from gpt2core.platform.artifacts.uris import split_s3_uri
from gpt2core.platform.context import process_rank
from gpt2core.checkpoint_names import TORCH, list_checkpoints


@contextlib.contextmanager
def data_input(key: str, uri: str) -> Iterator[Path]:
    """The data folder at uri: an s3:// dataset is downloaded once per node, shared by its ranks."""
    try:
        with shared_local_input(uri) as path:
            yield path
    except StorageError as exc:
        raise DataError(f"{key}: {exc}") from exc


def working_folder(flag: str, path: str | Path) -> Path:
    """The local folder ``path`` (made when missing), resolved; one that cannot be made (a file in
    the way, no permission) fails at once as a ConfigError naming ``flag``."""
    folder = Path(path).resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot make this folder ({exc.strerror})") from None
    return folder


def require_input(flag: str, uri: str | None, *, folder: bool = True) -> None:
    """A stage's check before any work: a local input (a folder, or with ``folder=False`` a file or
    folder) that is not there fails at once, naming ``flag`` (the flag or config key that gave it).
    An s3:// URI is checked for its form here and read when the stage gets to it."""
    if not uri:
        return
    if is_s3(uri):
        try:
            split_s3_uri(uri)
        except StorageError as exc:
            raise DataError(f"{flag}: {exc}") from None
        return
    path = Path(uri)
    if not (path.is_dir() if folder else path.exists()):
        what = "not a folder" if path.exists() else f"no such {'folder' if folder else 'file or folder'}"
        raise DataError(f"{flag} {uri}: {what}")


def local_checkpoint(uri: str, work_dir: Path, *, suffix: str = TORCH) -> Path:
    """A local copy of the checkpoint at ``uri``: a checkpoint file, or a folder of them (the newest
    of format ``suffix``: torch ``.pt`` or, for the cerebras target, cstorch ``.mdl`` files)."""
    if is_s3(uri) and uri.endswith((".pt", ".mdl")):
        return fetch_file(uri, work_dir / f"resume-rank{process_rank()}" / uri.rsplit("/", 1)[-1])
    if is_s3(uri):
        with local_input(uri) as folder:
            newest = _newest(folder, uri, suffix)
            return Path(shutil.copy2(newest, _fresh(work_dir / f"resume-rank{process_rank()}")))
    path = Path(uri)
    if path.is_dir():
        return _newest(path, uri, suffix)
    if not path.is_file():
        raise DataError(f"--checkpoint_path {uri}: no such checkpoint file or folder")
    return path


def _newest(folder: Path, uri: str, suffix: str) -> Path:
    found = list_checkpoints(folder, suffix)
    if not found:
        raise DataError(f"--checkpoint_path {uri}: no checkpoints (checkpoint_<step>.pt or .mdl) in this folder")
    return found[-1]


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder
