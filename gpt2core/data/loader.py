"""The training loader over Cerebras-layout HDF5 files (ours or the reference's).

Order: one global permutation per epoch from `seed + epoch` (as torch's DistributedSampler). Global
step s covers samples perm[s*G:(s+1)*G] with G = batch_size * world_size; rank r takes every
world_size-th of them. So the samples of each step do not depend on the world size (for a fixed
global batch) nor on the number of DataLoader workers, and a run resumes at the exact next batch
from `state_dict()`, even on a different world size with the same global batch.

Masks: ``attention_mask`` is the loss mask, 1 on real tokens. A folder whose data_params.json says
``inverted_mask: true`` (the reference scripts' option: 0 on real tokens, 1 on padding) is read with
the mask flipped back; rows that look inverted without saying so (0 at the first position of every
row, which always holds a real token) are refused, as are rows that say so but do not look it.

Reads: a batch's rows are read sorted, per file, in one call. Uncompressed contiguous files (what
preprocessing writes by default) are memory-mapped; compressed or chunked ones go through h5py.
Files are opened lazily in each process (workers never share an HDF5 handle). With workers, one
torch DataLoader serves all epochs of an iteration (workers live across epoch boundaries), and with
``persistent_workers`` also the next iteration (an evaluation pass after another).

``input_dataloader(section, ...)`` builds the loader of a config section (``train_input`` /
``eval_input``); it is how training, evaluation and the Cerebras flow read data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gpt2core.data import DATA_PARAMS, FEATURES as FIELDS
from gpt2core.errors import ConfigError, DataError

if TYPE_CHECKING:  # the loader itself needs no config (and no pydantic) to import
    from gpt2core.config import InputParams


def h5_files(data_dir: Path) -> list[Path]:
    """The ``*.h5`` files of one split folder, in name order. DataError when the folder is missing,
    is a split `gpt2ops preprocess` left empty (its data_params.json counts), is a whole dataset's
    root (naming its split folders), or holds no .h5 file."""
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such dataset directory (expected a folder of .h5 files)")
    files = sorted(data_dir.glob("*.h5"))
    if not files:
        from gpt2core.data.preprocess import DATA_PARAMS  # only here: the loader imports no pydantic

        if (data_dir / DATA_PARAMS).is_file():  # a split `gpt2ops preprocess` made, with 0 sequences
            stats = json.loads((data_dir / DATA_PARAMS).read_text()).get("h5_dataset_stats", {})
            raise DataError(f"{data_dir}: the split is empty ({DATA_PARAMS}: {stats.get('num_sequences', 0)} "
                            f"sequences from {stats.get('num_documents', '?')} documents); preprocess again with "
                            f"a lower --min_sequence_len or another --val_fraction")
        splits = [split for split in ("train", "val") if any((data_dir / split).glob("*.h5"))]
        if splits:  # a whole `gpt2ops preprocess` output: the loader reads one of its splits
            raise DataError(f"{data_dir}: a dataset's root, not a split of it; name its split folder, "
                            f"{' or '.join(str(data_dir / split) for split in splits)}")
        raise DataError(f"{data_dir}: no .h5 files (expected a split folder of `gpt2ops preprocess`'s output, "
                        f"such as DATASET/train)")
    return files


def describe_h5(path: Path) -> tuple[int, int, int | None]:
    """(n_examples, max_seq_length, byte offset for memory-mapping or None) of one file; raises on a bad layout."""
    try:
        with h5py.File(path, "r") as f:
            if "data" not in f or not isinstance(f["data"], h5py.Dataset):
                raise DataError(f"{path}: no dataset 'data' (expected int32 [n, 3, max_seq_length])")
            data = f["data"]
            if data.ndim != 3 or data.shape[1] != 3 or data.dtype.kind not in "iu":
                raise DataError(f"{path}: dataset 'data' is {data.dtype} {list(data.shape)}, "
                                f"expected int32 [n, 3, max_seq_length]")
            n = data.shape[0]
            if "n_examples" in f.attrs and int(f.attrs["n_examples"]) != n:
                raise DataError(f"{path}: attribute n_examples={int(f.attrs['n_examples'])} but 'data' holds {n} rows")
            mappable = data.chunks is None and data.compression is None and data.dtype == np.dtype("<i4")
            offset = data.id.get_offset() if mappable and n else None
            return n, data.shape[2], offset
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file ({exc})") from exc


_MASK_ROWS_CHECKED = 8  # rows per file whose first mask value tells the convention (a gzip file: 8 chunk reads)


def declared_inverted_mask(data_dir: Path) -> bool:
    """Whether ``data_dir/data_params.json`` declares ``inverted_mask: true`` (in ``dataset``, where
    Model Zoo 1.9-2.3 write it, or ``processing``, 2.4+); False without the file or the key."""
    params_file = Path(data_dir) / DATA_PARAMS
    if not params_file.is_file():
        return False
    try:
        recorded = json.loads(params_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{params_file}: not valid JSON ({exc})") from exc
    sections = [recorded.get(name) for name in ("dataset", "processing")] if isinstance(recorded, dict) else []
    return any(isinstance(s, dict) and s.get("inverted_mask") is True for s in sections)


def check_mask_convention(path: Path, first_mask_values: np.ndarray, inverted: bool) -> None:
    """Raise DataError when the first mask value of rows of ``path`` (real tokens always start a
    row) contradicts the convention: all 0 where the mask should be 1 on real tokens, or all 1
    where data_params.json declared ``inverted_mask: true``."""
    if not len(first_mask_values):
        return
    if not inverted and not first_mask_values.any():
        raise DataError(f"{path}: attention_mask is 0 at the first position of every row checked, where a real "
                        f"token always is: the rows look written with inverted_mask: true (0 = real token). "
                        f"Declare it in {path.parent / DATA_PARAMS} (\"dataset\": {{\"inverted_mask\": true}}) "
                        f"or rewrite the files with a plain mask")
    if inverted and first_mask_values.all():
        raise DataError(f"{path.parent / DATA_PARAMS} declares inverted_mask: true, but {path} has attention_mask "
                        f"1 at the first position of every row checked (a plain mask); remove the key or fix "
                        f"the files")


class HDF5Dataset(Dataset):
    """All rows of the `*.h5` files in `data_dir` (name order) as one map-style dataset.

    `ds[i]` is a dict of int32 tensors `[max_seq_length]`; `read_rows(indices)` returns int32
    `[k, 3, max_seq_length]` (input_ids, attention_mask, labels) and is what the loader uses; the
    mask is 1 on real tokens also for files written with ``inverted_mask: true`` (see the module
    docstring). Raises DataError naming the file for a layout or mask convention it cannot read.
    """

    def __init__(self, data_dir: str | Path):
        self.data_dir = Path(data_dir)
        self.files = h5_files(self.data_dir)
        described = [describe_h5(p) for p in self.files]
        lengths = {msl for _, msl, _ in described}
        if len(lengths) > 1:
            raise DataError(f"{self.data_dir}: files disagree on max_seq_length ({sorted(lengths)})")
        self.max_seq_length = lengths.pop()
        self.inverted_mask = declared_inverted_mask(self.data_dir)
        for path, (n, _, _) in zip(self.files, described, strict=True):
            with h5py.File(path, "r") as f:
                check_mask_convention(path, f["data"][:min(n, _MASK_ROWS_CHECKED), 1, 0], self.inverted_mask)
        self._counts = np.array([n for n, _, _ in described], dtype=np.int64)
        self._offsets = [off for _, _, off in described]
        self._ends = np.cumsum(self._counts)
        self._readers: dict[int, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} sequences in {self.data_dir}")
        row = self.read_rows(np.array([index % len(self)]))[0]
        return {name: torch.from_numpy(row[i]) for i, name in enumerate(FIELDS)}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_readers": {}}

    def _reader(self, file_index: int):  # noqa: ANN202 - np.memmap or h5py.Dataset
        if self._pid != os.getpid():  # a forked worker: never reuse the parent's handles
            self._readers, self._pid = {}, os.getpid()
        reader = self._readers.get(file_index)
        if reader is None:
            path, offset = self.files[file_index], self._offsets[file_index]
            shape = (int(self._counts[file_index]), 3, self.max_seq_length)
            if offset is not None:
                reader = np.memmap(path, dtype="<i4", mode="r", offset=offset, shape=shape)
            else:
                reader = h5py.File(path, "r")["data"]
            self._readers[file_index] = reader
        return reader

    def read_rows(self, indices: np.ndarray) -> np.ndarray:
        """Rows at global `indices` (any order, repeats allowed), as int32 `[k, 3, max_seq_length]`."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), 3, self.max_seq_length), dtype=np.int32)
        file_of = np.searchsorted(self._ends, indices, side="right")
        for f in np.unique(file_of):
            sel = np.flatnonzero(file_of == f)
            local = indices[sel] - (self._ends[f] - self._counts[f])
            reader = self._reader(int(f))
            if isinstance(reader, np.memmap):
                out[sel] = reader[local]
            else:  # h5py: one slice per run of consecutive rows (its list selections are ~10x slower)
                rows, inverse = np.unique(local, return_inverse=True)
                runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1)
                out[sel] = np.concatenate([reader[run[0]:run[-1] + 1] for run in runs])[inverse]
        if self.inverted_mask:
            out[:, 1] = 1 - out[:, 1]
        return out


class _Batches(Dataset):
    """Batch ``(epoch, k)`` of one rank's order: what each DataLoader worker reads (whole batches).
    A process computes an epoch's order itself, once, from the seed."""

    def __init__(self, loader: HDF5DataLoader):
        self.loader, self._epoch, self._order = loader, -1, np.empty(0, dtype=np.int64)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, k = key
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self.loader.rank_order(epoch)
        size = self.loader.batch_size
        rows = self.loader.dataset.read_rows(self._order[k * size:(k + 1) * size])
        return {name: torch.from_numpy(np.ascontiguousarray(rows[:, i])) for i, name in enumerate(FIELDS)}


class _Positions:
    """The endless ``(epoch, k)`` keys from the loader's position on: the sampler of its DataLoader."""

    def __init__(self, loader: HDF5DataLoader):
        self.loader = loader

    def __iter__(self) -> Iterator[tuple[int, int]]:
        per_epoch = len(self.loader)
        epoch, k = divmod(self.loader.epoch * per_epoch + self.loader.next_batch, per_epoch)
        while True:
            yield epoch, k
            epoch, k = (epoch + 1, 0) if k + 1 == per_epoch else (epoch, k + 1)


class HDF5DataLoader:
    """Endless iterable of batches `{input_ids, attention_mask, labels}` (int32 `[B, S]`) for one rank.

    `len()` is the number of batches per epoch; iterating past it starts the next epoch, reshuffled
    with `seed + epoch`, so a trainer loops for max_steps (and takes `len()` batches for one eval pass).
    `num_workers` processes read ahead `prefetch_factor` batches each (torch's default 2 when None);
    `persistent_workers` keeps them for the next iteration (torch.utils.data.DataLoader's options).
    With `vocab_size`, a batch holding a token id outside [0, vocab_size) raises a DataError naming
    `vocab_key` (the config key that set it) before the batch reaches the model.
    """

    def __init__(self, dataset: HDF5Dataset, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 prefetch_factor: int | None = None, persistent_workers: bool = False,
                 vocab_size: int | None = None, vocab_key: str = "vocab_size"):
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size}: expected an integer >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank={rank}, world_size={world_size}: expected 0 <= rank < world_size")
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.drop_last, self.rank, self.world_size, self.num_workers = drop_last, rank, world_size, num_workers
        self.prefetch_factor, self.persistent_workers = prefetch_factor, persistent_workers
        self.vocab_size, self.vocab_key = vocab_size, vocab_key
        self.epoch, self.next_batch = 0, 0
        self._workers: DataLoader | None = None  # kept between iterations with persistent_workers
        if len(self) == 0:
            raise DataError(f"{dataset.data_dir}: {len(dataset)} sequences make no full batch of batch_size "
                            f"{batch_size} x world_size {world_size} (use drop_last=False or a smaller batch)")

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        n = len(self.dataset)
        if self.drop_last:
            return n // self.global_batch_size
        per_rank = -(-n // self.world_size)
        return -(-per_rank // self.batch_size)

    def rank_order(self, epoch: int) -> np.ndarray:
        """The global sample indices this rank reads in `epoch`, in order."""
        n = len(self.dataset)
        order = np.random.default_rng(self.seed + epoch).permutation(n) if self.shuffle else np.arange(n)
        if self.drop_last:
            order = order[:len(self) * self.global_batch_size]
        else:  # as DistributedSampler: wrap around so every rank gets the same number of samples
            total = -(-n // self.world_size) * self.world_size
            order = np.resize(order, total)
        return order[self.rank::self.world_size]

    def __getstate__(self) -> dict:  # what a worker gets: never the DataLoader that started it
        return {**self.__dict__, "_workers": None}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if not self.num_workers:  # in this process: no DataLoader machinery per batch
            batches: Iterator = map(_Batches(self).__getitem__, _Positions(self))
        else:
            if self._workers is None or not self.persistent_workers:
                self._workers = DataLoader(_Batches(self), batch_size=None, sampler=_Positions(self),
                                           num_workers=self.num_workers, prefetch_factor=self.prefetch_factor,
                                           persistent_workers=self.persistent_workers)
            batches = iter(self._workers)
        for batch in batches:
            if self.vocab_size is not None:
                self._check_token_ids(batch)
            self.seek(self.epoch * len(self) + self.next_batch + 1)
            yield batch

    def _check_token_ids(self, batch: dict[str, torch.Tensor]) -> None:
        """An id past the embedding would crash the model (a device assert on CUDA): refuse it here."""
        ids = torch.stack([batch["input_ids"], batch["labels"]])
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.vocab_size:
            raise DataError(f"{self.dataset.data_dir}: token ids from {low} to {high}, but {self.vocab_key} is "
                            f"{self.vocab_size} (ids 0..{self.vocab_size - 1}); the data was made with another "
                            f"tokenizer than the config's")

    def seek(self, batch: int) -> None:
        """Continue at batch number ``batch`` counted from the start of epoch 0 (a resumed step)."""
        self.epoch, self.next_batch = divmod(batch, len(self))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "next_batch": self.next_batch, "seed": self.seed, "shuffle": self.shuffle,
                "global_batch_size": self.global_batch_size, "drop_last": self.drop_last,
                "num_samples": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        """Resume at the batch after the last one yielded when `state` was taken."""
        mine = self.state_dict()
        for key in ("seed", "shuffle", "global_batch_size", "drop_last", "num_samples"):
            if state.get(key) != mine[key]:
                raise DataError(f"loader state: {key}={state.get(key)!r} but this loader has {mine[key]!r}; "
                                f"resuming needs the same data, seed and global batch size")
        self.epoch, self.next_batch = int(state["epoch"]), int(state["next_batch"])


def build_dataloader(data_dir: str | Path, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                     drop_last: bool = True, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                     prefetch_factor: int | None = None, persistent_workers: bool = False) -> HDF5DataLoader:
    """The loader of one rank over the HDF5 files in `data_dir` (see HDF5DataLoader)."""
    return HDF5DataLoader(HDF5Dataset(data_dir), batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last,
                          rank=rank, world_size=world_size, num_workers=num_workers,
                          prefetch_factor=prefetch_factor, persistent_workers=persistent_workers)


def input_dataloader(section: InputParams, data_dir: str | Path, *, name: str, batch_size: int, training: bool,
                     rank: int = 0, world_size: int = 1) -> HDF5DataLoader:
    """The loader of one rank for config section ``section`` (named ``name``: ``train_input`` or
    ``eval_input``) over the HDF5 files in ``data_dir``, reading ``batch_size`` sequences per batch
    (the rank's share of the section's global batch). Order: ``shuffle`` with ``shuffle_seed``.
    Training drops the last incomplete batch unless ``drop_last`` is false; evaluation never does:
    the eval metrics cover every sequence once. Workers: ``num_workers``, and with them
    ``prefetch_factor`` and ``persistent_workers`` (ignored without workers, as the Model Zoo's data
    processors do).

    The data must fit the section: rows of ``max_sequence_length`` tokens (else a ConfigError naming
    ``<name>.max_sequence_length`` and the length the files hold), token ids below ``vocab_size``
    (checked per batch, a DataError naming ``<name>.vocab_size``). A folder that is no split of a
    dataset is a DataError naming ``<name>.data_dir``."""
    try:
        dataset = HDF5Dataset(data_dir)
    except DataError as exc:
        raise DataError(f"{name}.data_dir {exc}") from None
    if dataset.max_seq_length != section.max_sequence_length:
        raise ConfigError(f"{name}.max_sequence_length: {section.max_sequence_length}, but {data_dir} holds "
                          f"sequences of {dataset.max_seq_length} tokens")
    workers = section.num_workers
    return HDF5DataLoader(dataset, batch_size, seed=section.shuffle_seed, shuffle=section.shuffle,
                          drop_last=section.drop_last and training, rank=rank, world_size=world_size,
                          num_workers=workers, prefetch_factor=section.prefetch_factor if workers else None,
                          persistent_workers=section.persistent_workers and workers > 0,
                          vocab_size=section.vocab_size, vocab_key=f"{name}.vocab_size")
