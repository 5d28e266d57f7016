"""The HDF5 loader: batches, global shuffle independent of world size and workers, exact resume,
reference-written files, verify_dataset, and bad files."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from gpt2core.config import load_params
from gpt2core.data.loader import HDF5Dataset, build_dataloader, input_dataloader
from gpt2core.data.verify import verify_dataset
from gpt2core.errors import ConfigError, DataError
from gpt2core.tokenizer import EOS_ID, VOCAB_SIZE


def _ids(batch: dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
    return [tuple(row) for row in batch["input_ids"].tolist()]


@pytest.fixture(scope="module")
def small_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """103 distinct rows in 3 files (40, 40, 23): row i's input_ids start with i."""
    folder = tmp_path_factory.mktemp("small_split")
    rows = np.zeros((103, 3, 8), dtype=np.int32)
    rows[:, 0] = np.arange(103)[:, None] + np.arange(8)[None] * 1000
    rows[:, 1] = 1
    rows[:, 2, :-1], rows[:, 2, -1] = rows[:, 0, 1:], EOS_ID
    for k, lo in enumerate(range(0, 103, 40)):
        with h5py.File(folder / f"data-{k:05d}.h5", "w") as f:
            part = rows[lo:lo + 40]
            f.attrs["n_examples"] = len(part)
            f.create_dataset("data", data=part)
    return folder


def _firsts(loader, n: int) -> list[list[int]]:
    return [b["input_ids"][:, 0].tolist() for b in itertools.islice(loader, n)]


def test_batches_from_tiny_dataset(tiny_dataset: Path):
    loader = build_dataloader(tiny_dataset / "train", 4)
    batch = next(iter(loader))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for t in batch.values():
        assert t.dtype == torch.int32 and t.shape == (4, 128) and t.is_contiguous()
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    assert len(loader) == len(loader.dataset) // 4
    item = loader.dataset[0]
    assert item["input_ids"].shape == (128,) and item["labels"].dtype == torch.int32


def test_epoch_is_a_permutation_and_epochs_differ(small_split: Path):
    loader = build_dataloader(small_split, 10, seed=3)
    assert len(loader) == 10
    epoch0, epoch1 = _firsts(loader, 10), _firsts(loader, 10)
    seen0 = sum(epoch0, [])
    assert len(set(seen0)) == 100 and set(seen0) <= set(range(103))
    assert epoch0 != epoch1  # reshuffled with seed + epoch
    assert _firsts(build_dataloader(small_split, 10, seed=3), 10) == epoch0
    assert _firsts(build_dataloader(small_split, 10, seed=4), 10) != epoch0
    in_order = build_dataloader(small_split, 10, shuffle=False)
    assert sum(_firsts(in_order, 10), []) == list(range(100))


def test_global_order_independent_of_world_size_and_workers(small_split: Path):
    single = _firsts(build_dataloader(small_split, 8, seed=1), 20)
    ranks = [_firsts(build_dataloader(small_split, 4, seed=1, rank=r, world_size=2), 20) for r in range(2)]
    for step in range(20):
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(single[step])
        assert not set(ranks[0][step]) & set(ranks[1][step])
    workers = _firsts(build_dataloader(small_split, 8, seed=1, num_workers=2), 20)
    assert workers == single


def test_resume_at_the_exact_next_batch(small_split: Path):
    reference = build_dataloader(small_split, 8, seed=7)
    expected = _firsts(reference, 30)  # crosses two epoch boundaries (12 batches per epoch)
    first = build_dataloader(small_split, 8, seed=7)
    head = _firsts(first, 17)
    state = first.state_dict()
    resumed = build_dataloader(small_split, 8, seed=7, num_workers=1)
    resumed.load_state_dict(state)
    assert head + _firsts(resumed, 13) == expected
    # a different world size with the same global batch resumes the same samples
    halves = [build_dataloader(small_split, 4, seed=7, rank=r, world_size=2) for r in range(2)]
    for h in halves:
        h.load_state_dict(state)
    tails = [_firsts(h, 13) for h in halves]
    assert [sorted(a + b) for a, b in zip(*tails, strict=True)] == [sorted(x) for x in expected[17:]]


def test_persistent_workers_serve_every_epoch_and_the_next_iteration(small_split: Path):
    expected = _firsts(build_dataloader(small_split, 8, seed=2), 30)  # 12 batches per epoch
    loader = build_dataloader(small_split, 8, seed=2, num_workers=2, prefetch_factor=3, persistent_workers=True)
    head = _firsts(loader, 17)
    workers = loader._workers
    assert (workers.num_workers, workers.prefetch_factor, workers.persistent_workers) == (2, 3, True)
    assert head + _firsts(loader, 13) == expected  # the same workers, reset at the loader's position
    assert loader._workers is workers
    loader.seek(0)
    assert _firsts(loader, 5) == expected[:5]
    fresh = build_dataloader(small_split, 8, seed=2, num_workers=1)
    fresh.seek(25)
    assert _firsts(fresh, 5) == expected[25:30] and fresh._workers is not None


def test_input_dataloader_reads_its_config_section(small_split: Path):
    section = load_params("gpt2_tiny", {"train_input.shuffle_seed": 3, "train_input.drop_last": False,
                                        "train_input.prefetch_factor": 4, "train_input.max_sequence_length": 8,
                                        "train_input.persistent_workers": True}).train_input
    train = input_dataloader(section, small_split, name="train_input", batch_size=10, training=True)
    assert (train.seed, train.shuffle, train.drop_last, len(train)) == (3, True, False, 11)
    assert (train.prefetch_factor, train.persistent_workers) == (None, False)  # no workers, nothing to keep
    assert _firsts(train, 11) == _firsts(build_dataloader(small_split, 10, seed=3, drop_last=False), 11)
    dropping = section.model_copy(update={"drop_last": True, "num_workers": 2})
    assert len(input_dataloader(dropping, small_split, name="train_input", batch_size=10, training=True)) == 10
    evaluation = input_dataloader(dropping, small_split, name="train_input", batch_size=10, training=False, rank=1,
                                  world_size=2)
    assert not evaluation.drop_last and len(evaluation) == 6  # evaluation scores every sequence
    assert (evaluation.num_workers, evaluation.prefetch_factor, evaluation.persistent_workers) == (2, 4, True)


def test_input_dataloader_refuses_data_that_does_not_fit_its_section(small_split: Path):
    """Rows of another length than the section's max_sequence_length, and token ids past its
    vocab_size (small_split's labels end with EOS, 50256), are refused naming the section's key."""
    section = load_params("gpt2_tiny", {"eval_input.max_sequence_length": 16}).eval_input
    with pytest.raises(ConfigError, match=rf"^eval_input.max_sequence_length: 16, but {small_split} holds "
                                          r"sequences of 8 tokens$"):
        input_dataloader(section, small_split, name="eval_input", batch_size=4, training=False)
    small_vocab = section.model_copy(update={"max_sequence_length": 8, "vocab_size": 50000})
    loader = input_dataloader(small_vocab, small_split, name="eval_input", batch_size=103, training=False)
    with pytest.raises(DataError, match=r"token ids from 0 to 50256, but eval_input.vocab_size is 50000"):
        next(iter(loader))
    fits = small_vocab.model_copy(update={"vocab_size": 50257})
    assert next(iter(input_dataloader(fits, small_split, name="eval_input", batch_size=103, training=False)))


def test_resume_refuses_other_data_or_batch(small_split: Path):
    state = build_dataloader(small_split, 8).state_dict()
    with pytest.raises(DataError, match="global_batch_size=8"):
        build_dataloader(small_split, 4).load_state_dict(state)
    with pytest.raises(DataError, match="seed=0"):
        build_dataloader(small_split, 8, seed=1).load_state_dict(state)


def test_drop_last_false_covers_every_sample(small_split: Path):
    loader = build_dataloader(small_split, 10, drop_last=False, shuffle=False)
    assert len(loader) == 11
    batches = _firsts(loader, 11)
    assert sum(batches, []) == list(range(103)) and len(batches[-1]) == 3
    ranks = [build_dataloader(small_split, 10, drop_last=False, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 6  # padded like DistributedSampler: equal steps per rank
    seen = set().union(*(sum(_firsts(r, 6), []) for r in ranks))
    assert seen == set(range(103))


def test_compressed_and_reference_layout_files(small_split: Path, tmp_path: Path):
    """Files as the reference writes them (row chunks, gzip) read like our memory-mapped ones."""
    with h5py.File(next(small_split.glob("*.h5")), "r") as f:
        rows = f["data"][:]
    with h5py.File(tmp_path / "examples_0.h5", "w") as f:
        f.attrs["n_examples"] = len(rows)
        f.create_dataset("data", data=rows, dtype="i4", chunks=(1, 3, 8), compression="gzip")
    reference_style = HDF5Dataset(tmp_path)
    ours = HDF5Dataset(small_split)
    assert reference_style._offsets == [None] and ours._offsets[0] is not None
    picks = np.array([39, 0, 17, 17, 5])
    np.testing.assert_array_equal(reference_style.read_rows(picks), ours.read_rows(picks))
    assert verify_dataset(tmp_path)["num_sequences"] == 40


def test_verify_dataset(tiny_dataset: Path):
    stats = verify_dataset(tiny_dataset, max_seq_length=128)
    assert set(stats["splits"]) == {"train", "val"}
    assert stats["num_sequences"] == sum(s["num_sequences"] for s in stats["splits"].values()) > 0
    assert verify_dataset(tiny_dataset / "val")["num_sequences"] == stats["splits"]["val"]["num_sequences"]
    with pytest.raises(DataError, match="max_seq_length is 128, expected 64"):
        verify_dataset(tiny_dataset / "val", max_seq_length=64)


def _corrupt_copy(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        dst.joinpath(p.name).write_bytes(p.read_bytes())
    with h5py.File(next(dst.glob("*.h5")), "r+") as f:
        edit(f)
    return dst


@pytest.mark.parametrize("edit, match", [
    (lambda f: f["data"].__setitem__((3, 2, 5), 12345), "row 3: labels are not input_ids shifted"),
    (lambda f: f["data"].__setitem__((0, 0, 0), VOCAB_SIZE), "input_ids outside"),
    (lambda f: f["data"].__setitem__((0, 1, 0), 7), "attention_mask holds values"),
    (lambda f: f.attrs.__setitem__("n_examples", 1), "n_examples=1 but 'data' holds"),
])
def test_verify_finds_problems(tiny_dataset: Path, tmp_path: Path, edit, match: str):
    bad = _corrupt_copy(tiny_dataset / "val", tmp_path / "val", edit)
    with pytest.raises(DataError, match=match):
        verify_dataset(bad)


def test_verify_checks_recorded_counts(tiny_dataset: Path, tmp_path: Path):
    bad = _corrupt_copy(tiny_dataset / "val", tmp_path / "val", lambda f: None)
    params = bad / "data_params.json"
    params.write_text(params.read_text().replace('"num_sequences": 246', '"num_sequences": 999'))
    with pytest.raises(DataError, match="num_sequences=999 but the files hold 246"):
        verify_dataset(bad)


@pytest.mark.parametrize("write, match", [
    (lambda p: p.write_bytes(b"not hdf5"), "not a readable HDF5"),
    (lambda p: h5py.File(p, "w").create_dataset("other", data=np.zeros((2, 3, 4), np.int32)), "no dataset 'data'"),
    (lambda p: h5py.File(p, "w").create_dataset("data", data=np.zeros((2, 4), np.int32)), r"expected int32 \[n, 3"),
    (lambda p: h5py.File(p, "w").create_dataset("data", data=np.zeros((2, 3, 4), np.float32)), "float32"),
])
def test_bad_files(tmp_path: Path, write, match: str):
    path = tmp_path / "data-00000.h5"
    f = write(path)
    if hasattr(f, "file"):
        f.file.close()
    with pytest.raises(DataError, match=match):
        HDF5Dataset(tmp_path)
    with pytest.raises(DataError, match=match):
        verify_dataset(tmp_path)


def test_a_dataset_root_given_for_a_split_names_the_key_and_the_split_folders(small_split: Path, tmp_path: Path):
    shutil.copytree(small_split, tmp_path / "dataset" / "val")
    section = load_params("gpt2_tiny", {"eval_input.max_sequence_length": 16}).eval_input
    with pytest.raises(DataError, match=rf"^eval_input.data_dir {tmp_path}/dataset: a dataset's root, not a split "
                                        rf"of it; name its split folder, {tmp_path}/dataset/val$"):
        input_dataloader(section, tmp_path / "dataset", name="eval_input", batch_size=2, training=False)


def test_verify_names_an_empty_split_as_the_loader_does(tmp_path: Path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "data_params.json").write_text(json.dumps(
        {"h5_dataset_stats": {"num_sequences": 0, "num_documents": 2}}))
    with pytest.raises(DataError, match=r"train: the split is empty \(data_params.json: 0 sequences from 2 documents\)"):
        verify_dataset(tmp_path)


def test_bad_arguments(small_split: Path, tmp_path: Path):
    with pytest.raises(DataError, match="no .h5 files"):
        build_dataloader(tmp_path, 2)
    with pytest.raises(DataError, match="no such dataset directory"):
        build_dataloader(tmp_path / "missing", 2)
    with pytest.raises(DataError, match="make no full batch"):
        build_dataloader(small_split, 200)
    with pytest.raises(DataError, match="rank=2, world_size=2"):
        build_dataloader(small_split, 2, rank=2, world_size=2)


# ----------------------------------------------------------------------------- inverted masks (reference option)


def _inverted_copy(src: Path, dst: Path, *, declared: bool, section: str = "dataset") -> Path:
    """``src``'s rows written as the reference does with inverted_mask: true (0 = real token), with or
    without the data_params.json that says so."""
    dst.mkdir(parents=True)
    for path in sorted(src.glob("*.h5")):
        rows = h5py.File(path, "r")["data"][:]
        rows[:, 1] = 1 - rows[:, 1]
        with h5py.File(dst / f"examples_0_{path.stem[-1]}.h5", "w") as f:
            f.attrs["n_examples"] = len(rows)
            f.create_dataset("data", data=rows, chunks=(1, 3, rows.shape[2]), compression="gzip")
    if declared:
        (dst / "data_params.json").write_text(json.dumps({section: {"inverted_mask": True}}))
    return dst


@pytest.mark.parametrize("section", ["dataset", "processing"])  # 1.9-2.3 write it in dataset, 2.4+ in processing
def test_declared_inverted_masks_are_read_flipped_back(tiny_dataset: Path, tmp_path: Path, section: str):
    src = tiny_dataset / "val"
    inverted = _inverted_copy(src, tmp_path / "ref", declared=True, section=section)
    plain, flipped = HDF5Dataset(src), HDF5Dataset(inverted)
    assert flipped.inverted_mask and not plain.inverted_mask
    every = np.arange(len(plain))
    np.testing.assert_array_equal(flipped.read_rows(every), plain.read_rows(every))
    batch = next(iter(build_dataloader(inverted, 4, shuffle=False)))
    assert batch["attention_mask"][:, 0].all()  # the loss sees the real tokens, not the padding
    stats = verify_dataset(inverted)
    assert stats["inverted_mask"] and stats["loss_valid_tokens"] == verify_dataset(src)["loss_valid_tokens"]


def test_inverted_masks_without_the_declaration_are_refused_naming_the_file(tiny_dataset: Path, tmp_path: Path):
    inverted = _inverted_copy(tiny_dataset / "val", tmp_path / "ref", declared=False)
    first = sorted(inverted.glob("*.h5"))[0]
    with pytest.raises(DataError, match=rf"{first}: attention_mask is 0 at the first position of every row "
                                        r"checked.*inverted_mask: true"):
        HDF5Dataset(inverted)
    with pytest.raises(DataError, match=rf"{first}: attention_mask is 0 at the first position"):
        verify_dataset(inverted)


def test_a_declaration_the_rows_contradict_is_refused(tiny_dataset: Path, tmp_path: Path):
    folder = tmp_path / "plain"
    shutil.copytree(tiny_dataset / "val", folder)
    (folder / "data_params.json").write_text(json.dumps({"dataset": {"inverted_mask": True}}))
    with pytest.raises(DataError, match=r"data_params.json declares inverted_mask: true, but .*data-00000.h5 has "
                                        r"attention_mask 1"):
        HDF5Dataset(folder)


def test_validate_reports_inverted_masks_it_honours(tiny_dataset: Path, tmp_path: Path):
    from gpt2core.validation import ValidationReport, check_dataset

    inverted = _inverted_copy(tiny_dataset / "val", tmp_path / "ref", declared=True)
    report = ValidationReport(target="cpu")
    params = load_params("gpt2_tiny", {"train_input.max_sequence_length": 128})
    assert check_dataset("train_input.data_dir", str(inverted), inverted, params, report)["inverted_mask"]
    assert report.ok and any("inverted_mask: true" in note for note in report.notes)
