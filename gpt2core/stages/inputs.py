"""What stages read besides their request: datasets and training checkpoints, local or s3://,
artifacts whose files get unpickled, which are read only as a stage of gpt2ops published them, and
the local folders stages work in; and the dataset splits as their MLflow runs record them.

The trust model (docs/storage-tracking.md): an artifact's storage (the S3 prefix, a local folder)
may be writable by more people than its MLflow tracking store. Files that loading unpickles (the
compile stage's ``torch.compiler`` caches, Cerebras SDK checkpoints) are therefore loaded only when
the artifact's manifest digest is the one the producing stage recorded on its MLflow run
(``tracking.published_record``), and every file matches that manifest's sha256; anything else is
refused with one ``UntrustedArtifactError`` line. Files with a safe loader (torch checkpoints:
``torch.load(weights_only=True)``, safetensors, JSON, YAML) need no record.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

from gpt2core.checkpoint_names import TORCH, checkpoint_step, list_checkpoints
from gpt2core.data import DATA_PARAMS
from gpt2core.errors import ConfigError, DataError, StorageError, UntrustedArtifactError
from gpt2core.platform import tracking
from gpt2core.platform.artifacts import (NotFound, fetch_file, is_s3, local_input, manifest_digest,
                                         read_manifest, read_text, shared_local_input)
from gpt2core.platform.artifacts.store import find_artifact
from gpt2core.platform.artifacts.uris import join, local_path, split_s3_uri
from gpt2core.platform.context import process_rank
from gpt2core.platform.tracking import DatasetUse

SPLIT_PROFILE_KEYS = ("num_sequences", "num_tokens", "loss_valid_tokens")  # of h5_dataset_stats


@contextlib.contextmanager
def data_input(key: str, uri: str) -> Iterator[Path]:
    """The data folder at uri: an s3:// dataset is downloaded once per node, shared by its ranks. A
    failure to get it is a DataError naming ``key``; errors of the block pass unchanged."""
    with contextlib.ExitStack() as stack:
        try:
            path = stack.enter_context(shared_local_input(uri))
        except StorageError as exc:
            raise DataError(f"{key}: {exc}") from exc
        yield path


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


def split_use(uri: str, context: str) -> DatasetUse:
    """A dataset split (a ``train/`` or ``val/`` folder of HDF5 files, local or s3://) as a stage's
    MLflow run records it (``StageRun.log_datasets``): the profile holds its sequence and token
    counts and sequence length from its ``data_params.json`` (``h5_dataset_stats``, as the
    reference's preprocessing writes them); empty when the split has no such file."""
    try:
        data_params = json.loads(read_text(f"{uri.rstrip('/')}/{DATA_PARAMS}"))
    except (NotFound, ValueError):
        return DatasetUse(uri, context)
    stats = data_params.get("h5_dataset_stats", {})
    profile = {key: stats[key] for key in SPLIT_PROFILE_KEYS if key in stats}
    if "max_seq_length" in data_params.get("processing", {}):
        profile["max_seq_length"] = data_params["processing"]["max_seq_length"]
    return DatasetUse(uri, context, profile)


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
        raise DataError(f"--checkpoint_path {uri}: no checkpoints (checkpoint_<step>.pt or .mdl) in this "
                        f"folder")
    return found[-1]


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _require_published(name: str, uri: str, manifest: dict) -> None:
    """UntrustedArtifactError unless a stage recorded publishing artifact ``name`` at uri with this
    manifest."""
    digest = manifest_digest(manifest)
    if tracking.published_record(name, uri, digest) is None:
        raise UntrustedArtifactError(
            f"{uri}: refused to load: no stage run in MLflow at {tracking.tracking_uri()} recorded "
            f"publishing this {name} artifact (manifest digest {digest[:16]}...), and loading it would "
            f"unpickle its files; use an artifact a gpt2ops stage published, unchanged")


@contextlib.contextmanager
def vouched_input(uri: str, name: str) -> Iterator[Path]:
    """The artifact ``name`` at uri as a local folder, exactly as the stage that published it recorded
    it (manifest digest on its MLflow run; every file's sha256 checked against that manifest), for a
    reader that unpickles its files; UntrustedArtifactError otherwise."""
    try:
        manifest = read_manifest(uri)
    except NotFound as exc:
        raise UntrustedArtifactError(f"{uri}: refused to load: {exc}") from None
    _require_published(name, uri, manifest)
    with local_input(uri, manifest=manifest) as folder:
        yield folder


def vouched_checkpoint(uri: str, work_dir: Path, *, suffix: str,
                       name: str = "checkpoints") -> tuple[Path, str]:
    """(a local copy, its sha256) of the checkpoint at uri (a file, or a folder: its newest of format
    ``suffix``) inside an artifact ``name`` a stage recorded publishing; UntrustedArtifactError
    otherwise. The loader checks the file against the sha256 right before it unpickles it."""
    try:
        artifact, manifest, inside = find_artifact(uri)
    except NotFound:
        raise UntrustedArtifactError(f"{uri}: refused to load this checkpoint: it is in no artifact a "
                                     f"gpt2ops stage published (no MANIFEST.json beside it or above), and "
                                     f"loading it would unpickle it") from None
    _require_published(name, artifact, manifest)
    folder = f"{inside}/" if inside else ""
    found = []
    for entry in manifest["files"]:
        path = entry["path"]
        directly_in = path.startswith(folder) and "/" not in path[len(folder):]
        step = checkpoint_step(path, suffix)
        if step is not None and (path == inside or directly_in):
            found.append((step, entry))
    if not found:
        raise DataError(f"--checkpoint_path {uri}: no checkpoints (checkpoint_<step>{suffix}) there")
    entry = max(found, key=lambda pair: pair[0])[1]
    source = join(artifact, entry["path"])
    if is_s3(source):
        local = fetch_file(source, work_dir / f"resume-rank{process_rank()}" / source.rsplit("/", 1)[-1])
    else:
        local = local_path(source)
    return local, entry["sha256"]
