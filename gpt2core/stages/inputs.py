"""What stages read besides their request: datasets and training checkpoints, local or s3://; and
the dataset splits as their MLflow runs record them."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

from gpt2core.checkpoint_names import TORCH, list_checkpoints
from gpt2core.data.preprocess import DATA_PARAMS
from gpt2core.errors import DataError, StorageError
from gpt2core.platform.artifacts import (NotFound, fetch_file, is_s3, local_input, read_text,
                                         shared_local_input)
from gpt2core.platform.context import process_rank
from gpt2core.platform.tracking import DatasetUse

SPLIT_PROFILE_KEYS = ("num_sequences", "num_tokens", "loss_valid_tokens")  # of h5_dataset_stats


@contextlib.contextmanager
def data_input(key: str, uri: str) -> Iterator[Path]:
    """The data folder at uri: an s3:// dataset is downloaded once per node, shared by its ranks."""
    try:
        with shared_local_input(uri) as path:
            yield path
    except StorageError as exc:
        raise DataError(f"{key}: {exc}") from exc


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
        raise DataError(f"--checkpoint_path {uri}: no checkpoints (checkpoint_<step>.pt or .mdl) in this folder")
    return found[-1]


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder
