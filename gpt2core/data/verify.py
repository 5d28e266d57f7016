"""Check every HDF5 file of a dataset: layout, dtype, token ids, the label shift, and the recorded counts.

Works on one split folder (`*.h5` + `data_params.json`) or on a dataset root holding split folders
(`train/`, `val/`). Files from the Cerebras reference scripts pass as well as our own.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import numpy as np

from gpt2core.data import DATA_PARAMS
from gpt2core.data.loader import check_mask_convention, declared_inverted_mask, describe_h5, h5_files
from gpt2core.errors import DataError
from gpt2core.tokenizer import VOCAB_SIZE

log = logging.getLogger(__name__)

_ROWS_PER_READ = 1024  # 12 MB at max_seq_length 1024
_MAX_PROBLEMS_PER_FILE = 5


def _check_file(path: Path, max_seq_length: int | None, vocab_size: int, inverted_mask: bool,
                problems: list[str]) -> dict:
    """Problems of one file into ``problems``; its stats. With ``inverted_mask`` (declared in
    data_params.json) the mask is read flipped, as the loader reads it."""
    try:
        n, msl, _ = describe_h5(path)
        with h5py.File(path, "r") as f:
            check_mask_convention(path, f["data"][:min(n, _ROWS_PER_READ), 1, 0], inverted_mask)
    except DataError as exc:
        problems.append(str(exc))
        return {"num_sequences": 0, "loss_valid_tokens": 0, "max_seq_length": None}
    found: list[str] = []
    if max_seq_length is not None and msl != max_seq_length:
        found.append(f"max_seq_length is {msl}, expected {max_seq_length}")
    real = empty_rows = 0
    with h5py.File(path, "r") as f:
        data = f["data"]
        if data.dtype != np.int32:
            found.append(f"dtype is {data.dtype}, expected int32")
        for lo in range(0, n, _ROWS_PER_READ):
            rows = data[lo:lo + _ROWS_PER_READ]
            ids, mask, labels = rows[:, 0], (1 - rows[:, 1]) if inverted_mask else rows[:, 1], rows[:, 2]
            where = f"rows {lo}-{lo + len(rows) - 1}"
            for name, values in (("input_ids", ids), ("labels", labels)):
                if values.min() < 0 or values.max() >= vocab_size:
                    found.append(f"{where}: {name} outside [0, {vocab_size}) "
                                 f"(min {values.min()}, max {values.max()})")
            if mask.min() < 0 or mask.max() > 1:
                found.append(f"{where}: attention_mask holds values other than 0 and 1")
            both_real = (mask[:, 1:] == 1) & (mask[:, :-1] == 1)
            shifted = ids[:, 1:] == labels[:, :-1]
            if not shifted[both_real].all():
                bad_row = lo + int(np.flatnonzero(~(shifted | ~both_real).all(axis=1))[0])
                found.append(f"row {bad_row}: labels are not input_ids shifted by one")
            real += int(mask.sum())
            empty_rows += int((mask.sum(axis=1) == 0).sum())
            if len(found) >= _MAX_PROBLEMS_PER_FILE:
                break
    if empty_rows:
        found.append(f"{empty_rows} rows without any real token")
    problems.extend(f"{path}: {p}" for p in found[:_MAX_PROBLEMS_PER_FILE])
    return {"num_sequences": n, "loss_valid_tokens": real, "max_seq_length": msl}


def _verify_split(folder: Path, max_seq_length: int | None, vocab_size: int, problems: list[str]) -> dict:
    files = sorted(folder.glob("*.h5"))
    try:
        inverted = declared_inverted_mask(folder)
    except DataError as exc:
        problems.append(str(exc))
        inverted = False
    per_file = [_check_file(p, max_seq_length, vocab_size, inverted, problems) for p in files]
    lengths = {s["max_seq_length"] for s in per_file if s["max_seq_length"] is not None}
    if len(lengths) > 1:
        problems.append(f"{folder}: files disagree on max_seq_length ({sorted(lengths)})")
    stats = {"files": len(files),
             "num_sequences": sum(s["num_sequences"] for s in per_file),
             "loss_valid_tokens": sum(s["loss_valid_tokens"] for s in per_file),
             "max_seq_length": lengths.pop() if len(lengths) == 1 else max_seq_length, "inverted_mask": inverted}
    stats["num_tokens"] = stats["num_sequences"] * (stats["max_seq_length"] or 0)
    params_file = folder / DATA_PARAMS
    if params_file.exists():
        try:
            recorded = json.loads(params_file.read_text()).get("h5_dataset_stats", {})
        except json.JSONDecodeError as exc:
            problems.append(f"{params_file}: not valid JSON ({exc.msg})")
            recorded = {}
        # the reference counts loss_valid_tokens as the sum of the mask as written: the padding, if inverted
        expected = {"num_sequences": stats["num_sequences"],
                    "loss_valid_tokens": (stats["num_tokens"] - stats["loss_valid_tokens"]) if inverted
                    else stats["loss_valid_tokens"]}
        for key, value in expected.items():
            if key in recorded and recorded[key] != value:
                problems.append(f"{params_file}: h5_dataset_stats.{key}={recorded[key]} "
                                f"but the files hold {value}")
    else:
        log.warning("%s: no %s beside the files (counts not cross-checked)", folder, DATA_PARAMS)
    return stats


def verify_dataset(data_dir: str | Path, *, max_seq_length: int | None = None,
                   vocab_size: int = VOCAB_SIZE) -> dict:
    """Stats of the dataset at `data_dir`; raises DataError listing every problem found.

    For a dataset root the stats are totals with a per-split breakdown under `splits`.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such dataset directory")
    problems: list[str] = []
    if any(data_dir.glob("*.h5")):
        stats = _verify_split(data_dir, max_seq_length, vocab_size, problems)
    else:
        splits = sorted(p for p in data_dir.iterdir() if p.is_dir() and any(p.glob("*.h5")))
        if not splits:
            for split in sorted(p for p in data_dir.iterdir() if p.is_dir()):
                h5_files(split)  # a split preprocess left empty: the loader's message, with its counts
            raise DataError(f"{data_dir}: no .h5 files here or in its split folders (expected train/, val/)")
        per_split = {p.name: _verify_split(p, max_seq_length, vocab_size, problems) for p in splits}
        stats = {key: sum(s[key] for s in per_split.values())
                 for key in ("files", "num_sequences", "loss_valid_tokens", "num_tokens")}
        stats["max_seq_length"] = per_split[splits[0].name]["max_seq_length"]
        stats["splits"] = per_split
    if problems:
        raise DataError(f"{data_dir}: {len(problems)} problem(s): " + " | ".join(problems))
    return stats
