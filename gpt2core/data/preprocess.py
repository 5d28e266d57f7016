"""Tokenize a text corpus into Cerebras Model Zoo HDF5 (the reference's create_hdf5_dataset, done better).

Layout, per split folder (`train/`, `val/`): files `data-00000.h5`, ... each holding one dataset `data`,
int32 `[n, 3, max_seq_length]` = (input_ids, attention_mask, labels), attribute `n_examples`, and a
`data_params.json` with the arguments and `h5_dataset_stats`. EOS follows every document; PAD = EOS;
attention_mask is 1 on real tokens and is the loss mask; labels are the inputs shifted by one.

How it runs, in two phases so the result never depends on the number of workers:
1. tokenize: one task per input file, on a process pool; each writes its token stream and document lengths
   to a cache folder (write then rename), so a rerun after a crash skips what is done;
2. pack and write: the documents of each split (chosen per document from the seed) are concatenated
   in file order, cut into windows, and the HDF5 files are written in parallel, each to a temporary
   name then renamed. `data_params.json` is written last: a split without it is not complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import h5py
import numpy as np
import tiktoken
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gpt2core.data.readers import ReadStats, corpus_format, iter_documents
from gpt2core.errors import ConfigError, DataError
from gpt2core.flags import Cli
from gpt2core.tokenizer import PAD_ID, get_tokenizer

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
DATA_PARAMS = "data_params.json"
CORPUS_INFO = "corpus.json"  # written by the download stage: names the text key of the corpus
CACHE_FOLDER = ".tokens"
_IGNORED_INPUTS = {"MANIFEST.json", CORPUS_INFO}
_ROWS_PER_WRITE = 1024  # bounds memory while a file is written (rows of [3, max_seq_length])


class PreprocessParams(BaseModel):
    """How a corpus becomes HDF5. Field names follow the reference script's flags where it has one
    (create_hdf5_dataset.py: --max_seq_length, --pack_sequences, --min_sequence_len, --files_per_record,
    ...). A bad value is a ConfigError ``preprocess.<field>=<value>: ...`` naming the field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_seq_length: int = Field(1024, description="tokens per sequence (default: train_input."
                                                  "max_sequence_length of --params, else 1024)")
    pack_sequences: bool = Field(True, description="pack documents into full windows")
    packing_scheme: Literal["carry_over", "overlap"] = Field(
        "carry_over", description="carry_over: windows of max_seq_length + 1 tokens at stride "
                                  "max_seq_length, the remainder carried into the next document (Model Zoo "
                                  "2.x); overlap: consecutive windows share overlap_size tokens (1.x)")
    overlap_size: int | None = Field(None, description="overlap scheme only (default max_seq_length/4)")
    min_sequence_len: int = Field(10, ge=0, description="shorter windows (the last piece of a document or "
                                                        "corpus) are dropped")
    samples_per_file: Annotated[int, Cli(flags=("--files_per_record", "--samples_per_file"))] = Field(
        50_000, ge=1, description="sequences per HDF5 file")
    compression: Literal["none", "gzip", "lzf"] = Field("none", description="HDF5 compression of the rows")
    val_fraction: float = Field(0.01, ge=0.0, lt=1.0, allow_inf_nan=False, description="fraction of documents for val/ (chosen "
                                                                  "by --seed; at least one when > 0)")
    seed: int = Field(0, description="seed of the document-level train/val split")
    processes: int = Field(0, ge=0, description="worker processes (0: all cores)")
    jsonl_key: str | None = Field(None, description="JSON/parquet text field (default: the corpus's, else text)")
    vocab_file: str | None = Field(None, description="BPE merges (vocab.bpe); default: GPT-2's")
    encoder_file: str | None = Field(None, description="token -> id map (encoder.json); default: GPT-2's")

    @model_validator(mode="wrap")
    @classmethod
    def _one_line_errors(cls, data: Any, handler: Any) -> PreprocessParams:
        try:
            return handler(data)
        except ValidationError as exc:
            error = exc.errors()[0]
            raise ConfigError(f"preprocess.{'.'.join(map(str, error['loc']))}={error.get('input')!r}: "
                              f"{error['msg']}") from None

    @model_validator(mode="after")
    def _check(self) -> PreprocessParams:
        def bad(key: str, expected: str) -> ConfigError:
            return ConfigError(f"preprocess.{key}={getattr(self, key)!r}: expected {expected}")

        if self.max_seq_length < 2:
            raise bad("max_seq_length", "an integer >= 2")
        if self.overlap_size is not None and self.packing_scheme != "overlap":
            raise bad("overlap_size", "to be unset unless packing_scheme='overlap'")
        if self.packing_scheme == "overlap" and not 0 <= self.window_overlap < self.max_seq_length:
            raise bad("overlap_size", f"0 <= overlap_size < max_seq_length ({self.max_seq_length})")
        return self

    @property
    def window_overlap(self) -> int:
        if self.packing_scheme == "carry_over":
            return 0
        return self.max_seq_length // 4 if self.overlap_size is None else self.overlap_size

    @property
    def stride(self) -> int:
        return self.max_seq_length - self.window_overlap

    def data_fields(self) -> dict:
        """The fields that decide the output bytes (not how many processes made it)."""
        return self.model_dump(exclude={"processes"})


# ---------------------------------------------------------------------------------------------------
# Phase 1: tokenize each input file into the cache.

@dataclass(frozen=True)
class _InputFile:
    path: Path
    relpath: str
    cache_key: str


def list_corpus_files(input_dir: Path) -> list[Path]:
    """Corpus files under `input_dir` in a fixed order (relative path); raises on anything else."""
    if not input_dir.is_dir():
        raise DataError(f"{input_dir}: input directory does not exist")
    files, unsupported = [], []
    for path in sorted(p for p in input_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(input_dir)
        if any(part.startswith(".") for part in rel.parts) or rel.as_posix() in _IGNORED_INPUTS:
            continue
        (files if corpus_format(path) else unsupported).append(path)
    if unsupported:
        shown = ", ".join(str(p) for p in unsupported[:3]) + (" ..." if len(unsupported) > 3 else "")
        raise DataError(f"{input_dir}: unsupported file type(s): {shown} "
                        f"(expected .txt, .jsonl, .json.gz, .jsonl.gz, .jsonl.zst or .parquet)")
    if not files:
        raise DataError(f"{input_dir}: empty corpus (no .txt/.jsonl/.json.gz/.jsonl.zst/.parquet files)")
    return files


def _input_files(input_dir: Path, text_key: str, tokenizer_name: str) -> list[_InputFile]:
    # A downloaded corpus carries sha256s in its manifest: cache entries then survive a re-download.
    manifest = input_dir / "MANIFEST.json"
    digests = {}
    if manifest.exists():
        digests = {f["path"]: f["sha256"] for f in json.loads(manifest.read_text()).get("files", [])}
    out = []
    for path in list_corpus_files(input_dir):
        rel = path.relative_to(input_dir).as_posix()
        st = path.stat()
        identity = digests.get(rel) or f"{st.st_size}:{st.st_mtime_ns}"
        key = hashlib.sha256(f"{rel}\0{identity}\0{text_key}\0{tokenizer_name}".encode()).hexdigest()[:24]
        out.append(_InputFile(path, rel, key))
    return out


def _token_dtype(n_vocab: int) -> np.dtype:
    return np.dtype(np.uint16 if n_vocab <= 1 << 16 else np.uint32)


def _tokenize_file(item: _InputFile, cache_dir: Path, text_key: str, vocab_file: str | None,
                   encoder_file: str | None) -> dict:
    """Token stream (every document + EOS) and per-document lengths of one file, into the cache."""
    tokens_path, meta_path = cache_dir / f"{item.cache_key}.bin", cache_dir / f"{item.cache_key}.json"
    if meta_path.exists():  # written last: the entry is complete
        return json.loads(meta_path.read_text())
    enc = get_tokenizer(vocab_file, encoder_file)  # loaded before the fork: inherited, not reloaded
    dtype = _token_dtype(enc.n_vocab)
    eos = np.array([enc.eot_token], dtype=dtype)
    stats, lengths, skipped = ReadStats(), [], 0
    unique = uuid.uuid4().hex[:8]  # two runs may share a cache folder
    tmp = tokens_path.with_suffix(f".bin.{unique}.tmp")
    with tmp.open("wb") as out:
        for text in iter_documents(item.path, text_key, stats):
            if not text:
                skipped += 1
                continue
            # Text that spells "<|endoftext|>" is ordinary text, never the special token.
            ids = enc.encode_to_numpy(text, disallowed_special=())
            out.write(ids.astype(dtype).tobytes())
            out.write(eos.tobytes())
            lengths.append(len(ids) + 1)
    os.replace(tmp, tokens_path)
    meta = {"relpath": item.relpath, "cache_key": item.cache_key, "documents": len(lengths), "empty_documents": skipped,
            "tokens": int(sum(lengths)), "bytes": stats.bytes, "replaced_chars": stats.replaced_chars,
            "lengths": lengths}
    tmp_meta = meta_path.with_suffix(f".json.{unique}.tmp")
    tmp_meta.write_text(json.dumps(meta))
    os.replace(tmp_meta, meta_path)
    return meta


# ---------------------------------------------------------------------------------------------------
# Phase 2: split, pack, write.

def _val_documents(relpath: str, n_docs: int, seed: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Per document: a uniform draw fixed by (seed, file, index); below val_fraction means val."""
    file_id = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "little")
    draws = np.random.default_rng([seed, file_id]).random(n_docs)
    return draws < val_fraction, draws


def _windows(doc_lengths: np.ndarray, params: PreprocessParams) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of every sequence window over the split's token stream; length <= msl + 1."""
    width, stride = params.max_seq_length + 1, params.stride
    keep_from = max(2, params.min_sequence_len)  # a window of one token has nothing to predict
    if params.pack_sequences:
        spans = np.array([[0, int(doc_lengths.sum())]], dtype=np.int64)
    else:
        ends = np.cumsum(doc_lengths, dtype=np.int64)
        spans = np.stack([ends - doc_lengths, doc_lengths], axis=1)
    # Windows start every `stride` tokens within a span; the last one of a span may be short.
    per_span = np.maximum(0, -(-(spans[:, 1] - (width - stride)) // stride))
    per_span = np.where(spans[:, 1] > 0, np.maximum(per_span, 1), 0)
    span_of = np.repeat(np.arange(len(spans)), per_span)
    k = np.arange(len(span_of)) - np.repeat(np.cumsum(per_span) - per_span, per_span)
    offset = k * stride
    starts = spans[span_of, 0] + offset
    lengths = np.minimum(width, spans[span_of, 1] - offset)
    keep = lengths >= keep_from
    return starts[keep], lengths[keep]


def _sequences(stream: np.ndarray, starts: np.ndarray, lengths: np.ndarray, msl: int) -> np.ndarray:
    """Rows [n, 3, msl] int32 = input_ids, attention_mask, labels (PAD and mask 0 past a window's end)."""
    pos = np.arange(msl + 1)
    present = pos[None, :] < lengths[:, None]
    tokens = stream[np.where(present, starts[:, None] + pos[None, :], 0)].astype(np.int32)
    mask = present[:, 1:]
    out = np.empty((len(starts), 3, msl), dtype=np.int32)
    out[:, 0] = np.where(mask, tokens[:, :-1], PAD_ID)
    out[:, 1] = mask
    out[:, 2] = np.where(mask, tokens[:, 1:], PAD_ID)
    return out


def h5_name(index: int) -> str:
    return f"data-{index:05d}.h5"


def _write_h5(stream_path: Path, dtype: str, starts: np.ndarray, lengths: np.ndarray, out_path: Path, *,
              msl: int, compression: str) -> int:
    """Write one HDF5 file of the windows (starts, lengths); returns its count of non-EOS input ids."""
    stream = np.memmap(stream_path, dtype=np.dtype(dtype), mode="r")
    tmp = out_path.with_name(out_path.name + ".tmp")
    n = len(starts)
    # Fixed layout and no timestamps: the bytes depend only on the data. Uncompressed files are
    # contiguous so the loader can memory-map them; compressed ones use the reference's row chunks.
    layout = {} if compression == "none" else {"chunks": (1, 3, msl), "compression": compression}
    non_eos = 0
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["n_examples"] = np.int64(n)
            data = f.create_dataset("data", shape=(n, 3, msl), dtype="<i4", track_times=False, **layout)
            for lo in range(0, n, _ROWS_PER_WRITE):
                hi = min(n, lo + _ROWS_PER_WRITE)
                rows = _sequences(stream, starts[lo:hi], lengths[lo:hi], msl)
                data[lo:hi] = rows
                non_eos += int((rows[:, 0] != PAD_ID).sum())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out_path)
    return non_eos


class _InProcess(Executor):
    """processes=1: the same tasks in this process; no pool to start and no arrays to pickle."""

    def map(self, fn, *iterables, **_):  # noqa: ANN001, ANN201 - Executor.map's signature
        return map(fn, *iterables)


def _worker_pool(processes: int) -> Executor:
    """Processes, so JSON decoding and HDF5 compression run on every core too. Forked where the OS
    can: workers then start in milliseconds and inherit the tokenizer this process already loaded."""
    if processes == 1:
        return _InProcess()
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context(method))


def _fingerprint(params: PreprocessParams, files: Sequence[_InputFile], text_key: str) -> str:
    blob = json.dumps({"params": params.data_fields(), "text_key": text_key,
                       "files": [(f.relpath, f.cache_key) for f in files]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _check_output_dir(output_dir: Path, fingerprint: str) -> dict | None:
    """Stats of a finished identical run; None to (re)start; raises rather than touch foreign files."""
    done = {}
    for split in SPLITS:
        params_file = output_dir / split / DATA_PARAMS
        if params_file.exists():
            recorded = json.loads(params_file.read_text())
            if recorded.get("setup", {}).get("fingerprint") != fingerprint:
                raise DataError(f"{output_dir}: already holds a dataset made from other input or parameters; "
                                f"choose another --output_dir (nothing was overwritten)")
            done[split] = recorded["h5_dataset_stats"]
            done["corpus"] = recorded["dataset"]["corpus"]
    if len(done) == len(SPLITS) + 1:
        return done
    if output_dir.exists():
        ours = {CACHE_FOLDER, *SPLITS}
        foreign = [p.name for p in output_dir.iterdir() if p.name not in ours]
        for split in SPLITS:
            folder = output_dir / split
            if folder.exists():
                foreign += [f"{split}/{p.name}" for p in folder.iterdir()
                            if not (p.name.startswith("data-") and p.name.endswith((".h5", ".h5.tmp")))
                            and p.name != DATA_PARAMS]
        if foreign:
            raise DataError(f"{output_dir}: output directory holds other files ({', '.join(sorted(foreign)[:3])}); "
                            f"choose an empty or new --output_dir (nothing was overwritten)")
    return None


def _resolve_text_key(input_dir: Path, params: PreprocessParams) -> str:
    if params.jsonl_key:
        return params.jsonl_key
    info = input_dir / CORPUS_INFO
    if info.exists():
        return json.loads(info.read_text()).get("text_key", "text")
    return "text"


def preprocess_corpus(input_dir: str | Path, output_dir: str | Path, params: PreprocessParams, *,
                      cache_dir: str | Path | None = None) -> dict:
    """Tokenize the corpus in `input_dir` into `output_dir/{train,val}`; returns h5_dataset_stats per split
    (`train`, `val`) and the input's totals (`corpus`: files, documents, tokens, bytes, replaced_chars).

    `cache_dir` keeps the tokenized files between runs (default `output_dir/.tokens`, removed on success
    when it is that default). Rerunning after a crash reuses the finished tokenization; rerunning a
    finished run with the same input and parameters returns at once.
    """
    started = time.monotonic()
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    enc = get_tokenizer(params.vocab_file, params.encoder_file)
    text_key = _resolve_text_key(input_dir, params)
    files = _input_files(input_dir, text_key, enc.name)
    fingerprint = _fingerprint(params, files, text_key)
    finished = _check_output_dir(output_dir, fingerprint)
    if finished is not None:
        log.info("%s: already complete for this input and parameters", output_dir)
        return finished
    own_cache = cache_dir is None
    cache = Path(cache_dir) if cache_dir is not None else output_dir / CACHE_FOLDER
    cache.mkdir(parents=True, exist_ok=True)
    processes = params.processes or os.cpu_count() or 1
    dtype = _token_dtype(enc.n_vocab)

    with _worker_pool(processes) as pool:
        metas, done_bytes, last_log = [], 0, time.monotonic()
        tokenize = partial(_tokenize_file, cache_dir=cache, text_key=text_key, vocab_file=params.vocab_file,
                           encoder_file=params.encoder_file)
        for meta in pool.map(tokenize, files):  # in file order
            metas.append(meta)
            done_bytes += meta["bytes"]
            if time.monotonic() - last_log > 10 or len(metas) == len(files):
                elapsed = time.monotonic() - started
                log.info("tokenized %d/%d files, %.1f MB, %.2f MB/s", len(metas), len(files),
                         done_bytes / 1e6, done_bytes / 1e6 / max(elapsed, 1e-9))
                last_log = time.monotonic()
        if not any(m["documents"] for m in metas):
            raise DataError(f"{input_dir}: empty corpus (all {len(files)} files hold no text)")

        in_val = _assign_splits(metas, params)
        for split in SPLITS:  # before anything is written: a split asked for must not come out empty
            _require_sequences(split, _split_lengths(metas, in_val, split), params)
        corpus = _corpus_stats(metas)
        if corpus["replaced_chars"]:
            log.warning("%s: %d undecodable bytes replaced with U+FFFD", input_dir, corpus["replaced_chars"])
        stats = {}
        for split in SPLITS:
            stats[split] = _write_split(split, metas, in_val, cache, dtype, output_dir, params, pool)
            _write_data_params(output_dir / split, split, input_dir, text_key, params, enc, fingerprint,
                               stats[split], corpus)
    if own_cache:
        shutil.rmtree(cache)
    log.info("wrote %s: %d sequences, %d tokens in %.1f s", output_dir,
             sum(s["num_sequences"] for s in stats.values()), sum(s["num_tokens"] for s in stats.values()),
             time.monotonic() - started)
    return {**stats, "corpus": corpus}


def _assign_splits(metas: list[dict], params: PreprocessParams) -> list[np.ndarray]:
    picks, draws = zip(*(_val_documents(m["relpath"], m["documents"], params.seed, params.val_fraction)
                         for m in metas), strict=True)
    picks = [p.copy() for p in picks]
    flat = np.concatenate(draws)
    n_docs, n_val = len(flat), int(sum(p.sum() for p in picks))
    if params.val_fraction > 0 and n_val == 0:
        if n_docs < 2:
            raise DataError(f"val_fraction={params.val_fraction} needs at least 2 documents, the corpus has {n_docs}")
        _flip(picks, int(np.argmin(flat)), True)  # the document closest to being drawn
    elif n_val == n_docs and n_docs > 0:
        _flip(picks, int(np.argmax(flat)), False)
    return picks


def _flip(picks: list[np.ndarray], flat_index: int, value: bool) -> None:
    for p in picks:
        if flat_index < len(p):
            p[flat_index] = value
            return
        flat_index -= len(p)


def _split_lengths(metas: list[dict], in_val: list[np.ndarray], split: str) -> np.ndarray:
    """Token counts of the split's documents, in file order."""
    chosen = [np.asarray(m["lengths"], dtype=np.int64)[v == (split == "val")]
              for m, v in zip(metas, in_val, strict=True) if len(m["lengths"])]
    return np.concatenate(chosen) if chosen else np.zeros(0, np.int64)


def _require_sequences(split: str, doc_lengths: np.ndarray, params: PreprocessParams) -> None:
    """A DataError naming the knobs when a split that is asked for (train always, val with
    val_fraction > 0) would hold no sequence."""
    if (split == "val" and params.val_fraction == 0) or len(_windows(doc_lengths, params)[0]):
        return
    shortest, tokens = max(2, params.min_sequence_len), int(doc_lengths.sum())
    if split == "train":
        raise DataError(f"corpus yields no training sequence of at least {shortest} tokens ({tokens} tokens in "
                        f"{len(doc_lengths)} documents); lower --min_sequence_len (nothing was written)")
    raise DataError(f"val: --val_fraction {params.val_fraction} drew {len(doc_lengths)} document(s) of {tokens} "
                    f"tokens in all, which yield no sequence of at least --min_sequence_len {shortest} tokens; "
                    f"lower --min_sequence_len or raise --val_fraction (nothing was written)")


def _write_split(split: str, metas: list[dict], in_val: list[np.ndarray], cache: Path, dtype: np.dtype,
                 output_dir: Path, params: PreprocessParams, pool: Executor) -> dict:
    """Concatenate this split's documents in file order, cut windows, write the HDF5 files."""
    want_val = split == "val"
    stream_path = cache / f"{split}.{uuid.uuid4().hex[:8]}.stream"
    with stream_path.open("wb") as out:
        for meta, val_mask in zip(metas, in_val, strict=True):
            lengths = np.asarray(meta["lengths"], dtype=np.int64)
            if not len(lengths):
                continue
            chosen = val_mask == want_val
            tokens = np.memmap(cache / f"{meta['cache_key']}.bin", dtype=dtype, mode="r")
            ends = np.cumsum(lengths)
            # one write per run of consecutive chosen documents
            edges = np.flatnonzero(np.diff(np.concatenate([[0], chosen.astype(np.int8), [0]])))
            for first, stop in edges.reshape(-1, 2):
                out.write(tokens[ends[first] - lengths[first]:ends[stop - 1]].tobytes())
    doc_lengths_all = _split_lengths(metas, in_val, split)
    n_docs = len(doc_lengths_all)
    starts, lengths = _windows(doc_lengths_all, params)

    folder = output_dir / split
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("data-*.h5*"):  # left by an interrupted run (maybe of other parameters)
        stale.unlink()
    spf, msl = params.samples_per_file, params.max_seq_length
    n_files = -(-len(starts) // spf)
    write = partial(_write_h5, stream_path, dtype.str, msl=msl, compression=params.compression)
    pieces = range(n_files)
    non_pad = sum(pool.map(write, [starts[i * spf:(i + 1) * spf] for i in pieces],
                           [lengths[i * spf:(i + 1) * spf] for i in pieces], [folder / h5_name(i) for i in pieces]))
    stream_path.unlink()
    log.info("%s: %d sequences from %d documents in %d files", folder, len(starts), n_docs, n_files)

    real = int((lengths - 1).sum())  # positions with a label; the rest is padding
    num_tokens = len(starts) * msl
    # non_pad_tokens as the reference counts it: input ids other than EOS/PAD (it cannot tell them apart)
    return {"num_documents": n_docs, "num_sequences": len(starts), "num_tokens": num_tokens,
            "non_pad_tokens": non_pad, "loss_valid_tokens": real, "num_pad_tokens": num_tokens - real,
            "num_files": n_files}


def _corpus_stats(metas: list[dict]) -> dict:
    return {"files": len(metas), **{key: sum(m[key] for m in metas)
                                    for key in ("documents", "empty_documents", "tokens", "bytes", "replaced_chars")}}


def _write_data_params(folder: Path, split: str, input_dir: Path, text_key: str, params: PreprocessParams,
                       enc: tiktoken.Encoding, fingerprint: str, stats: dict, corpus: dict) -> None:
    """The reference's data_params.json (sections setup / processing / dataset / h5_dataset_stats)."""
    doc = {
        "setup": {"input_dir": str(input_dir), "fingerprint": fingerprint,
                  "format": "gpt2ops-hdf5/1"},
        "processing": {**params.data_fields(), "files_per_record": params.samples_per_file,
                       "tokenizer_type": "GPT2Tokenizer", "eos_id": enc.eot_token, "pad_id": PAD_ID,
                       "vocab_size": enc.n_vocab, "window_overlap": params.window_overlap},
        "dataset": {"split": split, "jsonl_key": text_key, "corpus": corpus},
        "h5_dataset_stats": stats,
    }
    tmp = folder / (DATA_PARAMS + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder / DATA_PARAMS)
