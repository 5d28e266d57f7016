"""A full disk is one line naming the folder, the space needed and the space free (exit 2), with the
writer's temporary files removed: the checkpoint writer, preprocessing's HDF5 writer and artifact
downloads, each on a real full filesystem (a small tmpfs; needs root to mount, skipped otherwise)."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest

from gpt2core.cli import main
from gpt2core.errors import DiskFullError
from gpt2core.platform.artifacts import download_dir, upload_dir


@pytest.fixture
def full_disk(tmp_path):
    """A 4 MB tmpfs: a folder whose filesystem fills up after 4 MB."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs (the full disk) needs root")
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def files_in(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gpt2ops ")]
    assert len(err) == 1, err
    return err[0]


def test_training_checkpoint_on_a_full_disk(full_disk, tiny_dataset, tmp_path, capsys):
    # gpt2_tiny with its AdamW state: a checkpoint of about 40 MB
    code = main(["train", "--params", "gpt2_tiny", "--dataset", str(tiny_dataset), "--max_steps", "1",
                 "--set", "runconfig.eval_frequency=0", "--model_dir", str(full_disk / "m"),
                 "--artifact_root", str(tmp_path / "artifacts"), "--experiment", "disk-full-tests"])
    line = one_error_line(capsys)
    assert code == 2
    folder = full_disk / "m" / "checkpoints"
    assert line.startswith(f"gpt2ops train: error: {folder}: no space left on device writing checkpoint "
                           f"checkpoint_00000001.pt (needs about ")
    assert " MB, " in line and " free)" in line
    assert files_in(full_disk) == []  # the partial .tmp checkpoint is gone: the disk is not kept full


def test_preprocessing_onto_a_full_disk(full_disk, english_text_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GPT2OPS_CACHE_DIR", str(tmp_path / "cache"))  # the token cache: on the big disk
    corpus = tmp_path / "corpus"
    shutil.copytree(english_text_dir, corpus)
    code = main(["preprocess", "--input_dir", str(corpus), "--output_dir", str(full_disk / "dataset"),
                 "--max_seq_length", "128", "--artifact_root", str(tmp_path / "artifacts"),
                 "--experiment", "disk-full-tests"])
    line = one_error_line(capsys)
    assert code == 2
    assert f"{full_disk}" in line and "no space left on device writing the train split (" in line
    assert "needs about " in line and " free)" in line
    assert files_in(full_disk) == []  # staging and partial HDF5 files removed
    assert not list((tmp_path / "cache").rglob("*.stream"))  # nor the split's token stream


def test_downloading_an_artifact_onto_a_full_disk(full_disk, s3_root, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"part-{i}.bin").write_bytes(os.urandom(2_000_000))
    uri = f"{s3_root}/{uuid.uuid4().hex[:8]}/big"
    upload_dir(data, uri)
    with pytest.raises(DiskFullError) as caught:
        download_dir(uri, full_disk / "copy")
    assert str(caught.value).startswith(f"{full_disk / 'copy'}: no space left on device downloading {uri} "
                                        f"(needs about 6.0 MB, ")
    assert files_in(full_disk) == []


def test_a_stage_staging_its_output_on_a_full_disk(full_disk, tiny_dataset, s3_root, tmp_path, capsys,
                                                    monkeypatch):
    """The train stage's model, staged for upload in a full scratch folder: safetensors' writer
    keeps only the text of the error (no OSError), still one line naming the folder."""
    monkeypatch.setenv("GPT2OPS_SCRATCH_DIR", str(full_disk))
    code = main(["train", "--params", "gpt2_tiny", "--dataset", str(tiny_dataset), "--max_steps", "1",
                 "--set", "runconfig.eval_frequency=0", "--model_dir", str(tmp_path / "m"),
                 "--artifact_root", s3_root, "--experiment", "disk-full-tests"])
    line = one_error_line(capsys)
    assert code == 2
    assert line.startswith(f"gpt2ops train: error: {full_disk}: no space left on device staging {s3_root}/")
    assert "/train/model for upload (needs more than the " in line
    assert files_in(full_disk) == []
