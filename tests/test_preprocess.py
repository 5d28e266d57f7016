"""HDF5 preprocessing: the Cerebras layout, packing that loses no token, determinism, resume, bad input."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import h5py
import ftfy
import numpy as np
import pytest

from gpt2core.cli import main as cli_main
from gpt2core.data.preprocess import PreprocessParams, _write_h5, preprocess_corpus
from gpt2core.errors import ConfigError, DataError
from gpt2core.tokenizer import EOS_ID, get_tokenizer

SMALL_WORKS = ("phoenix_and_the_turtle_gut.txt", "passionate_pilgrim_gut.txt", "lovers_complaint_gut.txt",
               "comedy_of_errors_gut.txt")


@pytest.fixture(scope="module")
def small_corpus(english_text_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four real works (110 KB, about 32k tokens)."""
    folder = tmp_path_factory.mktemp("small_corpus")
    for name in SMALL_WORKS:
        shutil.copyfile(english_text_dir / name, folder / name)
    return folder


def _expected_stream(folder: Path) -> np.ndarray:
    enc = get_tokenizer()
    docs = [enc.encode_ordinary(p.read_text(encoding="utf-8")) + [EOS_ID] for p in sorted(folder.iterdir())]
    return np.concatenate([np.array(d) for d in docs])


def _rows(split_dir: Path) -> np.ndarray:
    files = sorted(split_dir.glob("*.h5"))
    return np.concatenate([h5py.File(p, "r")["data"][:] for p in files])


def _params(**overrides) -> PreprocessParams:
    return PreprocessParams(**{"max_seq_length": 64, "val_fraction": 0.0, "processes": 1, **overrides})


def test_cerebras_layout(small_corpus: Path, tmp_path: Path):
    stats = preprocess_corpus(small_corpus, tmp_path, _params(samples_per_file=200, val_fraction=0.3))
    for split in ("train", "val"):
        folder = tmp_path / split
        files = sorted(folder.glob("*.h5"))
        assert [p.name for p in files][:2] == ["data-00000.h5", "data-00001.h5"][:len(files)]
        total = 0
        for path in files:
            with h5py.File(path, "r") as f:
                assert list(f.keys()) == ["data"]
                data = f["data"]
                assert data.dtype == np.int32 and data.shape[1:] == (3, 64)
                assert int(f.attrs["n_examples"]) == data.shape[0] <= 200
                total += data.shape[0]
        params = json.loads((folder / "data_params.json").read_text())
        recorded = params["h5_dataset_stats"]
        rows = _rows(folder)
        assert recorded == stats[split]
        assert recorded["num_sequences"] == total == len(rows)
        assert recorded["num_tokens"] == total * 64
        assert recorded["loss_valid_tokens"] == int(rows[:, 1].sum())
        assert recorded["non_pad_tokens"] == int((rows[:, 0] != EOS_ID).sum())  # the reference's definition
        assert params["processing"]["max_seq_length"] == 64
        assert params["processing"]["files_per_record"] == 200
        assert params["processing"]["eos_id"] == params["processing"]["pad_id"] == EOS_ID
        assert params["dataset"]["split"] == split
        # labels are the inputs shifted by one; padding is EOS with mask 0
        ids, mask, labels = rows[:, 0], rows[:, 1], rows[:, 2]
        real = (mask[:, 1:] == 1)
        assert (ids[:, 1:][real] == labels[:, :-1][real]).all()
        assert (ids[mask == 0] == EOS_ID).all() and (labels[mask == 0] == EOS_ID).all()
    assert stats["train"]["num_documents"] + stats["val"]["num_documents"] == len(SMALL_WORKS)
    assert stats["val"]["num_documents"] >= 1
    assert stats["corpus"]["documents"] == len(SMALL_WORKS)


def test_packing_carry_over_reconstructs_the_token_stream(small_corpus: Path, tmp_path: Path):
    preprocess_corpus(small_corpus, tmp_path, _params(min_sequence_len=2))
    rows = _rows(tmp_path / "train")
    ids, mask, labels = rows[:, 0], rows[:, 1], rows[:, 2]
    assert mask[:-1].all()  # only the last window may be short
    # The first input, then every label exactly once, is the corpus: every document followed by EOS.
    rebuilt = np.concatenate([[ids[0, 0]], labels[mask == 1]])
    np.testing.assert_array_equal(rebuilt, _expected_stream(small_corpus))
    # carry-over: each window starts with the previous window's last label
    np.testing.assert_array_equal(ids[1:, 0], labels[:-1, -1])


def test_packing_overlap_scheme(small_corpus: Path, tmp_path: Path):
    """Model Zoo 1.6-1.7: windows at stride max_seq_length - overlap_size over a buffer that starts with
    EOS, and a final window of the buffer's last max_seq_length + 1 tokens."""
    preprocess_corpus(small_corpus, tmp_path, _params(packing_scheme="overlap", overlap_size=16, min_sequence_len=2))
    rows = _rows(tmp_path / "train")
    stream = np.concatenate([[EOS_ID], _expected_stream(small_corpus)])  # one buffer: < 1e6 tokens
    stride = 64 - 16
    full = (len(stream) - 65) // stride + 1
    assert len(rows) == full + 1 and rows[:, 1].all()  # every window full, the last one overlapping more
    for i in range(full):  # full windows at stride 48: window i = stream[48 i : 48 i + 65]
        window = stream[i * stride:i * stride + 65]
        np.testing.assert_array_equal(rows[i, 0], window[:-1])
        np.testing.assert_array_equal(rows[i, 2], window[1:])
    np.testing.assert_array_equal(rows[-1, 0], stream[-65:-1])
    np.testing.assert_array_equal(rows[-1, 2], stream[-64:])


def test_unpacked_documents_start_their_own_rows(small_corpus: Path, tmp_path: Path):
    stats = preprocess_corpus(small_corpus, tmp_path, _params(pack_sequences=False, min_sequence_len=2))
    rows = _rows(tmp_path / "train")
    ids, mask, labels = rows[:, 0], rows[:, 1], rows[:, 2]
    # every document's last row ends with EOS as its last label, then padding
    last_label = labels[np.arange(len(rows)), mask.sum(axis=1) - 1]
    assert (last_label == EOS_ID).sum() == len(SMALL_WORKS)
    starts_document = [r == 0 or last_label[r - 1] == EOS_ID for r in range(len(rows))]
    rebuilt = np.concatenate([np.concatenate([[ids[r, 0]], labels[r][mask[r] == 1]]) if first
                              else labels[r][mask[r] == 1] for r, first in enumerate(starts_document)])
    np.testing.assert_array_equal(rebuilt, _expected_stream(small_corpus))
    assert stats["train"]["num_pad_tokens"] > 0


def test_min_sequence_len_drops_short_windows(tmp_path: Path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["one two", "x" * 3000]))
    kept = preprocess_corpus(corpus, tmp_path / "keep", _params(pack_sequences=False, min_sequence_len=2))
    dropped = preprocess_corpus(corpus, tmp_path / "drop", _params(pack_sequences=False, min_sequence_len=10))
    assert kept["train"]["num_sequences"] == dropped["train"]["num_sequences"] + 1


def test_same_bytes_for_one_and_two_workers(small_corpus: Path, tmp_path: Path):
    common = {"samples_per_file": 150, "val_fraction": 0.25, "compression": "gzip"}
    preprocess_corpus(small_corpus, tmp_path / "one", _params(processes=1, **common))
    preprocess_corpus(small_corpus, tmp_path / "two", _params(processes=2, **common))
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    two = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    assert one == two and len(one) > 4
    for rel in one:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes(), rel


def test_split_follows_the_seed(small_corpus: Path, tmp_path: Path):
    def val_docs(seed: int, out: str) -> int:
        stats = preprocess_corpus(small_corpus, tmp_path / out, _params(val_fraction=0.5, seed=seed))
        return stats["val"]["num_sequences"]

    assert val_docs(1, "a") == val_docs(1, "b")
    assert len({val_docs(s, f"s{s}") for s in range(2, 7)}) > 1


def test_formats_give_the_same_tokens(small_corpus: Path, tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    texts = [p.read_text(encoding="utf-8") for p in sorted(small_corpus.iterdir())]
    lines = "".join(json.dumps({"body": t}) + "\n" for t in texts).encode()
    variants = {
        "a.jsonl": lambda p: p.write_bytes(lines),
        "a.json.gz": lambda p: p.write_bytes(gzip.compress(lines)),
        "a.jsonl.zst": lambda p: p.write_bytes(zstandard.ZstdCompressor().compress(lines)),
        "a.parquet": lambda p: pq.write_table(pa.table({"body": texts, "id": list(range(len(texts)))}), p),
    }
    reference = _rows(_run(small_corpus, tmp_path / "txt"))
    for name, write in variants.items():
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        write(folder / name)
        rows = _rows(_run(folder, tmp_path / f"out_{name}", jsonl_key="body"))
        np.testing.assert_array_equal(rows, reference, err_msg=name)


def _run(corpus: Path, out: Path, **overrides) -> Path:
    preprocess_corpus(corpus, out, _params(**overrides))
    return out / "train"


def test_corpus_json_names_the_text_key(tmp_path: Path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text(json.dumps({"content": "hello " * 50}) + "\n")
    (corpus / "corpus.json").write_text(json.dumps({"text_key": "content"}))
    stats = preprocess_corpus(corpus, tmp_path / "out", _params())
    assert stats["corpus"]["documents"] == 1


def test_undecodable_bytes_are_replaced_and_counted(tmp_path: Path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_bytes(b"caf\xe9 and \xff\xfe more text " * 20)
    stats = preprocess_corpus(corpus, tmp_path / "out", _params())
    assert stats["corpus"]["replaced_chars"] == 60
    params = json.loads((tmp_path / "out" / "train" / "data_params.json").read_text())
    assert params["dataset"]["corpus"]["replaced_chars"] == 60


def test_rerun_resumes_and_finished_run_is_kept(small_corpus: Path, tmp_path: Path):
    corpus = tmp_path / "corpus"
    shutil.copytree(small_corpus, corpus)
    (corpus / "zz_broken.jsonl").write_text('{"text": "fine"}\n{not json\n')
    out, cache = tmp_path / "out", tmp_path / "cache"
    with pytest.raises(DataError, match=r"zz_broken.jsonl:2: not valid JSON"):
        preprocess_corpus(corpus, out, _params(), cache_dir=cache)
    assert not list(out.rglob("*.h5")) and not list(out.rglob("data_params.json"))
    done = sorted(cache.glob("*.json"))
    assert len(done) == len(SMALL_WORKS)  # the finished files' tokens are kept
    stamps = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    (corpus / "zz_broken.jsonl").write_text('{"text": "fine"}\n')
    first = preprocess_corpus(corpus, out, _params(), cache_dir=cache)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # reused, not redone
    assert first["corpus"]["documents"] == len(SMALL_WORKS) + 1
    assert preprocess_corpus(corpus, out, _params(), cache_dir=cache) == first  # finished: returned as is
    with pytest.raises(DataError, match="other input or parameters"):
        preprocess_corpus(corpus, out, _params(max_seq_length=32), cache_dir=cache)


def test_interrupted_write_leaves_no_complete_looking_file(tmp_path: Path):
    stream = tmp_path / "stream"
    np.arange(100, dtype=np.uint16).tofile(stream)
    out = tmp_path / "data-00000.h5"
    with pytest.raises(IndexError):  # a window past the end of the stream fails mid-file
        _write_h5(stream, "<u2", np.array([0, 5000]), np.array([9, 9]), out, msl=8, compression="none")
    assert not list(tmp_path.glob("data-*"))


def test_default_cache_is_removed(small_corpus: Path, tmp_path: Path):
    preprocess_corpus(small_corpus, tmp_path, _params())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train", "val"]


@pytest.mark.parametrize("make, match", [
    (lambda d: None, "empty corpus"),
    (lambda d: (d / "notes.md").write_text("x"), "unsupported file type"),
    (lambda d: (d / "a.txt").write_text(""), "empty corpus"),
    (lambda d: (d / "a.jsonl").write_text('{"txt": "x"}\n'), r"a.jsonl:1: expected an object with text key 'text'"),
    (lambda d: (d / "a.jsonl").write_text('{"text": 5}\n'), "must be a string"),
    (lambda d: (d / "a.json.gz").write_bytes(b"not gzip"), "a.json.gz: cannot read"),
    (lambda d: (d / "a.parquet").write_bytes(b"not parquet"), "not a readable parquet"),
    (lambda d: (d / "a.txt").write_text("hi"), "no training sequence"),
])
def test_bad_input(tmp_path: Path, make, match: str):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    make(corpus)
    with pytest.raises(DataError, match=match):
        preprocess_corpus(corpus, tmp_path / "out", _params())
    assert not list((tmp_path / "out").rglob("*.h5"))


def test_missing_input_and_foreign_output(small_corpus: Path, tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        preprocess_corpus(tmp_path / "nope", tmp_path / "out", _params())
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="holds other files"):
        preprocess_corpus(small_corpus, tmp_path / "busy", _params())
    assert (tmp_path / "busy" / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("field, value", [("max_seq_length", 1), ("packing_scheme", "zigzag"), ("compression", "zip"),
                                          ("val_fraction", 1.0), ("samples_per_file", 0), ("overlap_size", 8)])
def test_bad_params(field: str, value):
    with pytest.raises(ConfigError, match=f"preprocess.{field}="):
        PreprocessParams(**{field: value})


def test_cli(small_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "dataset"
    code = cli_main(["preprocess", "--input_dir", str(small_corpus), "--output_dir", str(out),
                     "--max_seq_length", "32", "--files_per_record", "300", "--pack_sequences", "false",
                     "--val_fraction", "0.25", "--processes", "1", "--verify", "--artifact_root", str(tmp_path)])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["outputs"]["dataset"] == str(out)
    assert result["metrics"]["preprocess/num_sequences"] > 0
    assert (out / "MANIFEST.json").exists() and (out / "train" / "data-00000.h5").exists()
    params = json.loads((out / "train" / "data_params.json").read_text())["processing"]
    assert params["pack_sequences"] is False and params["samples_per_file"] == 300
    assert params["use_ftfy"] is True and params["min_sequence_len"] == 6
    corpus = json.loads((out / "train" / "data_params.json").read_text())["dataset"]["corpus"]
    for key in ("newline_fixed_documents", "bom_removed_documents", "ftfy_fixed_documents", "normalized_documents"):
        assert result["metrics"][f"preprocess/{key}"] == corpus[key]
    code = cli_main(["preprocess", "--input_dir", str(small_corpus), "--output_dir", str(tmp_path / "raw"),
                     "--max_seq_length", "32", "--use_ftfy", "false", "--universal_newlines", "false",
                     "--strip_bom", "false", "--packing_scheme", "disjoint", "--processes", "1",
                     "--artifact_root", str(tmp_path)])
    assert code == 0 and json.loads(capsys.readouterr().out)["metrics"]["preprocess/normalized_documents"] == 0
    params = json.loads((tmp_path / "raw" / "train" / "data_params.json").read_text())["processing"]
    assert (params["use_ftfy"], params["packing_scheme"], params["min_sequence_len"]) == (False, "disjoint", 10)
    code = cli_main(["preprocess", "--input_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "x")])
    assert code == 2
    assert "missing" in capsys.readouterr().err


def test_stages_through_s3(small_corpus: Path, s3_root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """download -> preprocess as the pipeline runs them: artifacts in S3 (SeaweedFS), manifests, metrics."""
    from gpt2core.data.loader import build_dataloader
    from gpt2core.stages import download, preprocess, run_stage
    from gpt2core.platform.context import RunContext
    from gpt2core.platform.artifacts import local_input, read_manifest
    from gpt2core.platform.settings import reload_settings

    monkeypatch.setenv("GPT2OPS_CACHE_DIR", str(tmp_path / "cache"))
    reload_settings()
    ctx = RunContext(pipeline_run_id="run7", artifact_root=s3_root)
    corpus = run_stage("download", ctx, download.Request(source=str(small_corpus))).outputs["corpus"]
    assert corpus == f"{s3_root}/run7/download/corpus"
    # two forked workers inside a tracked stage run (MLflow's system-metrics thread is running)
    params = _params(val_fraction=0.25, samples_per_file=100, processes=2)
    result = run_stage("preprocess", ctx, preprocess.Request(input_dir=corpus, preprocessing=params, verify=True))
    dataset = result.outputs["dataset"]
    assert dataset == f"{s3_root}/run7/preprocess/dataset"
    paths = {f["path"] for f in read_manifest(dataset)["files"]}
    assert {"train/data-00000.h5", "train/data_params.json", "val/data_params.json"} <= paths
    m = result.metrics
    assert m["preprocess/num_sequences"] == m["preprocess/train_sequences"] + m["preprocess/val_sequences"]
    assert m["preprocess/num_tokens"] == 64 * m["preprocess/num_sequences"]
    assert m["preprocess/documents"] == len(SMALL_WORKS) and m["preprocess/tokens_per_s"] > 0
    assert not (tmp_path / "cache" / "tokens").exists() or not any((tmp_path / "cache" / "tokens").iterdir())
    with local_input(dataset) as local:
        batch = next(iter(build_dataloader(local / "train", 4)))
        assert batch["input_ids"].shape == (4, 64)


def test_rerun_after_an_interrupted_write_removes_stale_files(small_corpus: Path, tmp_path: Path):
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "train" / "data-00042.h5").write_bytes(b"left by a killed run")
    (out / "train" / "data-00000.h5.tmp").write_bytes(b"half written")
    preprocess_corpus(small_corpus, out, _params(samples_per_file=100, val_fraction=0.25))
    names = sorted(p.name for p in (out / "train").iterdir())
    assert "data-00042.h5" not in names and not any(n.endswith(".tmp") for n in names)
    assert names[-1] == "data_params.json"


def test_killed_run_resumes_to_the_same_bytes(english_text_dir: Path, tmp_path: Path):
    """SIGKILL mid-tokenization: nothing that looks finished is left; the rerun reuses the finished
    files' tokens and writes exactly what an uninterrupted run writes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out, cache = tmp_path / "out", tmp_path / "cache"
    code = ("import sys; from gpt2core.data.preprocess import PreprocessParams, preprocess_corpus; "
            "preprocess_corpus(sys.argv[1], sys.argv[2], PreprocessParams(max_seq_length=64, processes=1), "
            "cache_dir=sys.argv[3])")
    proc = subprocess.Popen([sys.executable, "-c", code, str(english_text_dir), str(out), str(cache)])
    deadline = time.monotonic() + 120
    while not list(cache.glob("*.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(cache.glob("*.json")))
    assert 0 < finished < 49, "killed too late to test a resume"
    assert not list(out.rglob("data_params.json")) and not list(out.rglob("*.h5"))
    preprocess_corpus(english_text_dir, out, _params(processes=1, val_fraction=0.01), cache_dir=cache)
    preprocess_corpus(english_text_dir, tmp_path / "clean", _params(processes=1, val_fraction=0.01))
    for path in sorted((tmp_path / "clean").rglob("*")):
        if path.is_file():
            assert (out / path.relative_to(tmp_path / "clean")).read_bytes() == path.read_bytes()


# ----------------------------------------------------------------------------- text normalisation

MESSY_TXT = "\ufeffA line with \u201ccurly\u201d quotes and caf\u00e9 mojibake: \u00c3\u00a9t\u00c3\u00a9.\r\nFish &amp; chips\rend\r\n"


def _stream_ids(split_dir: Path) -> list[int]:
    rows = _rows(split_dir)
    return [int(rows[0, 0, 0])] + [int(t) for r in rows for t in r[2][r[1] == 1]]


def test_txt_is_read_and_normalised_as_the_reference_does(tmp_path: Path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_bytes(MESSY_TXT.encode("utf-8"))
    stats = preprocess_corpus(corpus, tmp_path / "out", _params(min_sequence_len=2))
    with open(corpus / "a.txt", encoding="utf-8") as f:  # the reference's read_txt: text mode
        text = ftfy.fix_text(f.read(), normalization="NFC")
    assert _stream_ids(tmp_path / "out" / "train") == get_tokenizer().encode_ordinary(text) + [EOS_ID]
    assert "\r" not in text and "\ufeff" not in text and "&amp;" not in text
    corpus_stats = stats["corpus"]
    assert [corpus_stats[k] for k in ("newline_fixed_documents", "bom_removed_documents", "ftfy_fixed_documents",
                                      "normalized_documents")] == [1, 1, 1, 1]
    recorded = json.loads((tmp_path / "out" / "train" / "data_params.json").read_text())
    assert recorded["dataset"]["corpus"]["normalized_documents"] == 1
    assert recorded["dataset"]["use_ftfy"] is True and recorded["dataset"]["ftfy_normalizer"] == "NFC"


@pytest.mark.parametrize("off, expected", [
    ({"use_ftfy": False, "universal_newlines": False, "strip_bom": False}, lambda raw: raw),
    ({"use_ftfy": False}, lambda raw: raw.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")),
    ({"use_ftfy": False, "strip_bom": False}, lambda raw: raw.replace("\r\n", "\n").replace("\r", "\n")),
    ({"universal_newlines": False, "strip_bom": False}, lambda raw: ftfy.fix_text(raw, normalization="NFC")),
    ({"ftfy_normalizer": "NFKC"}, lambda raw: ftfy.fix_text(raw.replace("\r\n", "\n"), normalization="NFKC")),
])
def test_each_normalisation_turns_off(tmp_path: Path, off: dict, expected):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_bytes(MESSY_TXT.encode("utf-8"))
    preprocess_corpus(corpus, tmp_path / "out", _params(min_sequence_len=2, **off))
    ids = get_tokenizer().encode_ordinary(expected(MESSY_TXT)) + [EOS_ID]
    assert _stream_ids(tmp_path / "out" / "train") == ids


def test_plain_ascii_gives_the_same_bytes_with_normalisation_on_and_off(small_corpus: Path, tmp_path: Path):
    ascii_corpus = tmp_path / "ascii"
    ascii_corpus.mkdir()
    for path in small_corpus.iterdir():  # plain ASCII, LF line ends: nothing for any normalisation to do
        text = path.read_text(encoding="utf-8")
        (ascii_corpus / path.name).write_text(text.encode("ascii", "ignore").decode().replace("&", "and"))
    on = preprocess_corpus(ascii_corpus, tmp_path / "on", _params(val_fraction=0.25))
    off = preprocess_corpus(ascii_corpus, tmp_path / "off", _params(val_fraction=0.25, use_ftfy=False,
                                                                    universal_newlines=False, strip_bom=False))
    assert on["corpus"]["normalized_documents"] == 0
    for split in ("train", "val"):
        for path in sorted((tmp_path / "on" / split).glob("*.h5")):
            assert path.read_bytes() == (tmp_path / "off" / split / path.name).read_bytes()
        assert on[split] == off[split]


def test_data_params_carry_the_reference_keys(small_corpus: Path, tmp_path: Path):
    preprocess_corpus(small_corpus, tmp_path, _params(val_fraction=0.3))
    enc = get_tokenizer()
    for split in ("train", "val"):
        recorded = json.loads((tmp_path / split / "data_params.json").read_text())
        rows = _rows(tmp_path / split)
        assert recorded["features"] == ["input_ids", "attention_mask", "labels"]
        post = recorded["post-process"]
        assert post["n_examples"] == len(rows) == recorded["h5_dataset_stats"]["num_sequences"]
        assert (post["eos_id"], post["pad_id"], post["vocab_size"]) == (EOS_ID, EOS_ID, 50257)
        assert post["processed_files"] == post["successful_files"] + post["discarded_files"] == \
            recorded["h5_dataset_stats"]["num_documents"]
        assert post["loss_valid_tokens"] == int(rows[:, 1].sum())
        assert post["num_masked_tokens"] == post["num_tokens"] - post["loss_valid_tokens"]
        assert post["raw_bytes_count"] >= post["normalized_bytes_count"] > 0
        assert post["raw_chars_count"] >= post["normalized_chars_count"] > 0
        decoded = [enc.decode(list(r)) for r in rows[:, 0]]  # the reference's collect_stats
        stats = recorded["h5_dataset_stats"]
        assert stats["detokenized_chars"] == sum(len(t) for t in decoded)
        assert stats["detokenized_bytes"] == sum(len(t.encode()) for t in decoded)
        assert recorded["dataset"]["min_sequence_len"] == 6 and recorded["dataset"]["pack_sequences"] is True


def test_documents_too_short_for_any_row_are_counted_as_discarded(tmp_path: Path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["one", "x " * 200, "two"]))
    preprocess_corpus(corpus, tmp_path / "out", _params(pack_sequences=False, min_sequence_len=10))
    post = json.loads((tmp_path / "out" / "train" / "data_params.json").read_text())["post-process"]
    assert (post["processed_files"], post["discarded_files"], post["successful_files"]) == (3, 2, 1)


def test_the_stage_works_beside_mlflow_start_up_and_never_leaves_it_running(small_corpus: Path, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch):
    """The work starts before the MLflow run opens; a tracking failure is raised only once it has ended."""
    import socket
    import threading

    from gpt2core.errors import TrackingError
    from gpt2core.platform.context import RunContext
    from gpt2core.platform.settings import reload_settings
    from gpt2core.stages import preprocess as preprocess_stage, run_stage

    with socket.socket() as s:  # a port with nothing listening: MLflow is down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    reload_settings()
    request = preprocess_stage.Request(input_dir=str(small_corpus), output_dir=str(tmp_path / "out"),
                                       preprocessing=_params(max_seq_length=32))
    with pytest.raises(TrackingError, match="unreachable"):
        run_stage("preprocess", RunContext(pipeline_run_id="bg", artifact_root=str(tmp_path / "a")), request)
    assert not [t for t in threading.enumerate() if t.name == "preprocess-work"]
    assert (tmp_path / "out" / "train" / "data_params.json").is_file()  # the work ran to its end


def test_detokenized_sizes_are_those_of_each_row_decoded():
    from gpt2core.data.preprocess import _detokenized_sizes

    enc = get_tokenizer()
    ids = enc.encode_ordinary("caf\u00e9 \u201cquoted\u201d \U0001F600 plain ascii words here and more " * 3)
    rows = np.array([ids[i:i + 7] for i in range(0, 7 * (len(ids) // 7), 7)])  # rows cut inside characters too
    decoded = [enc.decode_bytes(list(r)).decode("utf-8", errors="replace") for r in rows]
    assert any("\ufffd" in t for t in decoded) and any(t.isascii() for t in decoded)
    assert _detokenized_sizes(rows, enc) == (sum(len(t.encode()) for t in decoded), sum(len(t) for t in decoded))
