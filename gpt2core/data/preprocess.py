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
from functools import lru_cache, partial
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import h5py
import numpy as np
import tiktoken
from pydantic import Field, model_validator

from gpt2core.data import DATA_PARAMS, FEATURES, normalize
from gpt2core.data.readers import ReadStats, corpus_format, import_readers, iter_documents
from gpt2core.errors import ConfigError, DataError
from gpt2core.flags import Cli, Parameters
from gpt2core.platform.disk import disk_space
from gpt2core.tokenizer import EOS_ID, PAD_ID, get_tokenizer

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
# Per file in the cache, per corpus in data_params.json and MLflow: documents each normalisation changed.
NORMALIZATION_COUNTS = ("newline_fixed_documents", "bom_removed_documents", "ftfy_fixed_documents",
                        "normalized_documents")
# Per document in the cache: tokens (with the EOS), and the size of the text as the reference reads it
# (raw) and as tokenized (normalized): the reference's raw_/normalized_ chars_count / bytes_count.
DOCUMENT_SIZES = ("lengths", "raw_chars", "raw_bytes", "normalized_chars", "normalized_bytes")
# min_sequence_len of each generation's script: create_hdf5_dataset.py 1.9.1-2.1 (--min_sequence_len,
# default 6), preprocess_data.py 2.4+ (processing.min_sequence_len, 10); 1.6-1.7 keep every window of
# 2 tokens or more.
MIN_SEQUENCE_LEN = {"carry_over": 6, "disjoint": 10, "overlap": 2}
OVERLAP_BUFFER_TOKENS = 1_000_000  # 1.6-1.7 training_data_generator(buffer_size=1e6)
CORPUS_INFO = "corpus.json"  # written by the download stage: names the text key of the corpus
CACHE_FOLDER = ".tokens"
_IGNORED_INPUTS = {"MANIFEST.json", CORPUS_INFO}
_ROWS_PER_WRITE = 1024  # bounds memory while a file is written (rows of [3, max_seq_length])


class PreprocessParams(Parameters):
    """How a corpus becomes HDF5. Field names follow the reference script's flags where it has one
    (create_hdf5_dataset.py: --max_seq_length, --pack_sequences, --min_sequence_len, --files_per_record,
    ...). A bad value is a ConfigError ``preprocess.<field>=<value>: ...`` naming the field."""

    error_prefix: ClassVar[str] = "preprocess."

    max_seq_length: int = Field(1024, description="tokens per sequence (default: train_input."
                                                  "max_sequence_length of --params, else 1024)")
    pack_sequences: bool = Field(True, description="pack documents into full windows")
    packing_scheme: Literal["carry_over", "disjoint", "overlap"] = Field(
        "carry_over", description="which Model Zoo generation's packing to reproduce, token for token: "
                                  "carry_over (1.9-2.3): windows of max_seq_length + 1 tokens at stride "
                                  "max_seq_length, EOS after every document; disjoint (2.4+): windows of "
                                  "max_seq_length + 1 tokens that share none, no EOS between packed documents "
                                  "but on the last token of a document's last full window; overlap (1.6-1.7): "
                                  "windows sharing overlap_size tokens over buffers of 1e6 tokens that start "
                                  "with EOS, each buffer ending with its last max_seq_length + 1 tokens")
    overlap_size: int | None = Field(None, description="overlap scheme only (default max_seq_length/4)")
    min_sequence_len: int | None = Field(None, ge=0, description="windows of fewer tokens are dropped (the last "
                                                                 "piece of a document or of the packed stream); "
                                                                 "default: the generation's, 6 for carry_over "
                                                                 "(1.9-2.1), 10 for disjoint, 2 for overlap")
    keep_final_window: bool = Field(True, description="keep the packed stream's last window when it is "
                                                      "short (padded; false drops it, as 1.9-2.3 do)")
    use_ftfy: bool = Field(True, description="fix text with ftfy before tokenizing (the reference's "
                                             "default since Model Zoo 2.0)")
    ftfy_normalizer: Literal["NFC", "NFKC", "NFD", "NFKD"] = Field("NFC", description="ftfy's Unicode "
                                                                                       "normalization")
    universal_newlines: bool = Field(True, description=".txt: \\r\\n and \\r become \\n, as the "
                                                       "reference's text-mode read gives them")
    strip_bom: bool = Field(True, description=".txt: drop a leading byte-order mark (U+FEFF)")
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

    @model_validator(mode="before")
    @classmethod
    def _generation_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("min_sequence_len") is None:
            scheme = data.get("packing_scheme", "carry_over")
            data = {**data, "min_sequence_len": MIN_SEQUENCE_LEN.get(scheme, MIN_SEQUENCE_LEN["carry_over"])}
        return data

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
        """overlap_size of the overlap scheme (default max_seq_length/4); 0 for the others."""
        if self.packing_scheme != "overlap":
            return 0
        return self.max_seq_length // 4 if self.overlap_size is None else self.overlap_size

    @property
    def stride(self) -> int:
        """Tokens from one window's start to the next one's: windows hold max_seq_length + 1 tokens,
        so carry_over's share one (a window's last label is the next one's first input)."""
        if self.packing_scheme == "disjoint":
            return self.max_seq_length + 1
        return self.max_seq_length - self.window_overlap

    def normalization(self) -> dict:
        """The fields that decide the text handed to the tokenizer."""
        return self.model_dump(include={"use_ftfy", "ftfy_normalizer", "universal_newlines", "strip_bom"})

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


def _input_files(input_dir: Path, text_key: str, tokenizer_name: str, normalization: dict) -> list[_InputFile]:
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
        recipe = json.dumps([rel, identity, text_key, tokenizer_name, normalization], sort_keys=True)
        key = hashlib.sha256(recipe.encode()).hexdigest()[:24]
        out.append(_InputFile(path, rel, key))
    return out


def _token_dtype(n_vocab: int) -> np.dtype:
    return np.dtype(np.uint16 if n_vocab <= 1 << 16 else np.uint32)


def _normalized(text: str, is_txt: bool, params: PreprocessParams, counts: dict[str, int]) -> tuple[str, str]:
    """(the text as the reference reads it, the text to tokenize), counting the documents each step
    changed. As read: a .txt file in text mode (universal newlines); then the BOM goes, then ftfy."""
    if is_txt and params.universal_newlines:
        text, before = normalize.universal_newlines(text), text
        counts["newline_fixed_documents"] += text != before
    read = text
    if is_txt and params.strip_bom:
        text, before = normalize.strip_bom(text), text
        counts["bom_removed_documents"] += text != before
    if params.use_ftfy:
        text, before = normalize.fix_text(text, params.ftfy_normalizer), text
        counts["ftfy_fixed_documents"] += text != before
    return read, text


def _tokenize_file(item: _InputFile, cache_dir: Path, text_key: str, params: PreprocessParams) -> dict:
    """Token stream (every document + EOS), per-document lengths and text sizes of one file, into the
    cache."""
    tokens_path, meta_path = cache_dir / f"{item.cache_key}.bin", cache_dir / f"{item.cache_key}.json"
    if meta_path.exists():  # written last: the entry is complete
        return json.loads(meta_path.read_text())
    enc = get_tokenizer(params.vocab_file, params.encoder_file)  # loaded before the fork: inherited
    dtype = _token_dtype(enc.n_vocab)
    eos = np.array([enc.eot_token], dtype=dtype)
    is_txt = corpus_format(item.path) == ".txt"
    stats, skipped = ReadStats(), 0
    counts = dict.fromkeys(NORMALIZATION_COUNTS, 0)
    docs: dict[str, list[int]] = {key: [] for key in DOCUMENT_SIZES}
    unique = uuid.uuid4().hex[:8]  # two runs may share a cache folder
    tmp = tokens_path.with_suffix(f".bin.{unique}.tmp")
    # about 4 bytes of text per token, each stored in dtype.itemsize bytes
    needed = item.path.stat().st_size // 4 * dtype.itemsize
    with disk_space(cache_dir, doing=f"tokenizing {item.relpath} into the token cache", needed=needed,
                    remove=[tmp]), tmp.open("wb") as out:
        for decoded in iter_documents(item.path, text_key, stats):
            read, text = _normalized(decoded, is_txt, params, counts)
            counts["normalized_documents"] += text != decoded
            if not text:
                skipped += 1
                continue
            # Text that spells "<|endoftext|>" is ordinary text, never the special token.
            ids = enc.encode_to_numpy(text, disallowed_special=())
            out.write(ids.astype(dtype).tobytes())
            out.write(eos.tobytes())
            for key, value in (("lengths", len(ids) + 1), ("raw_chars", len(read)),
                               ("raw_bytes", len(read.encode("utf-8", "surrogatepass"))),
                               ("normalized_chars", len(text)),
                               ("normalized_bytes", len(text.encode("utf-8", "surrogatepass")))):
                docs[key].append(value)
    os.replace(tmp, tokens_path)
    meta = {"relpath": item.relpath, "cache_key": item.cache_key, "documents": len(docs["lengths"]),
            "empty_documents": skipped, "tokens": int(sum(docs["lengths"])), "bytes": stats.bytes,
            "replaced_chars": stats.replaced_chars, **counts, **docs}
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


@dataclass
class _Packing:
    """How a split's documents become rows, over the split's token stream: the stream holds the chosen
    documents in file order, each followed by its EOS, except for packed ``disjoint`` (no EOS between
    documents, one after the last) and packed ``overlap`` (one EOS first: the first buffer's)."""

    starts: np.ndarray  # int64 [n]: stream offset of each row's window
    lengths: np.ndarray  # int64 [n]: tokens in each window, <= max_seq_length + 1 (input + last label)
    eos_at: np.ndarray  # int64: stream offsets whose token becomes EOS (disjoint: a window's last)
    doc_ends: np.ndarray  # int64 [documents]: stream offset past each document


def _span_windows(spans: np.ndarray, width: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows of ``width`` tokens every ``stride`` tokens within each (start, length) span; the last
    one of a span may be short (at least 1 token)."""
    per_span = np.maximum(0, -(-(spans[:, 1] - max(0, width - stride)) // stride))
    per_span = np.where(spans[:, 1] > 0, np.maximum(per_span, 1), 0)
    span_of = np.repeat(np.arange(len(spans)), per_span)
    k = np.arange(len(span_of)) - np.repeat(np.cumsum(per_span) - per_span, per_span)
    offset = k * stride
    return spans[span_of, 0] + offset, np.minimum(width, spans[span_of, 1] - offset)


def _overlap_windows(doc_ends: np.ndarray, width: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Model Zoo 1.6-1.7 (training_data_generator): documents fill buffers that start with EOS, each
    flushed once it holds 1e6 tokens (and at the last document); a buffer's windows start every
    ``stride`` tokens while they fit, and unless that reached its last token a final window holds the
    buffer's last ``width`` tokens. ``doc_ends`` are offsets in a stream whose first token is the
    first buffer's EOS; a later buffer's EOS is the one ending the document before it."""
    starts, lengths, begin = [], [], 0
    for i, end in enumerate(doc_ends.tolist()):
        size = end - begin
        if size < OVERLAP_BUFFER_TOKENS and i < len(doc_ends) - 1:
            continue
        full = (size - width) // stride + 1 if size >= width else 0
        starts.append(begin + stride * np.arange(full))
        lengths.append(np.full(full, width))
        if full * stride < size - 1:
            starts.append(np.array([begin + max(0, size - width)]))
            lengths.append(np.array([min(size, width)]))
        begin = end - 1
    if not starts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(starts).astype(np.int64), np.concatenate(lengths).astype(np.int64)


def _packing(doc_lengths: np.ndarray, params: PreprocessParams) -> _Packing:
    """The windows of one split. ``doc_lengths``: tokens of each document, its EOS included."""
    width, stride, scheme = params.max_seq_length + 1, params.stride, params.packing_scheme
    keep_from = max(2, params.min_sequence_len)  # a window of one token has nothing to predict
    eos_at = np.zeros(0, np.int64)
    if not params.pack_sequences:  # each document alone (+ EOS), windows within it
        doc_ends = np.cumsum(doc_lengths, dtype=np.int64)
        starts, lengths = _span_windows(np.stack([doc_ends - doc_lengths, doc_lengths], axis=1), width, stride)
        if scheme == "disjoint":  # a document of whole windows: EOS replaces its last token (2.4+)
            n = doc_lengths - 1
            eos_at = (doc_ends - 2)[(n > 0) & (n % width == 0)]
    elif scheme == "overlap":
        doc_ends = 1 + np.cumsum(doc_lengths, dtype=np.int64)
        starts, lengths = _overlap_windows(doc_ends, width, stride)
    elif scheme == "disjoint":
        # 2.4+ (chop_doc_into_msl, _add_eos_to_doc): the documents' tokens run on without EOS; after each
        # document that completed a window, the last token of its last complete window becomes EOS; the
        # leftover of the last document gets an EOS appended.
        doc_ends = np.cumsum(doc_lengths - 1, dtype=np.int64)
        total = int(doc_ends[-1]) if len(doc_ends) else 0
        starts, lengths = _span_windows(np.array([[0, total + 1]], dtype=np.int64), width, stride)
        complete = doc_ends // width
        grew = np.diff(np.concatenate([[0], complete])) > 0
        eos_at = complete[grew] * width - 1
    else:  # carry_over, 1.9-2.3: every document + EOS, windows over the whole stream
        doc_ends = np.cumsum(doc_lengths, dtype=np.int64)
        starts, lengths = _span_windows(np.array([[0, int(doc_lengths.sum())]], dtype=np.int64), width, stride)
    keep = lengths >= keep_from
    if params.pack_sequences and not params.keep_final_window and len(keep) and lengths[-1] < width:
        keep[-1] = False
    return _Packing(starts[keep], lengths[keep], eos_at, doc_ends)


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
              msl: int, compression: str, vocab_file: str | None = None,
              encoder_file: str | None = None) -> dict[str, int]:
    """Write one HDF5 file of the windows (starts, lengths); returns its counts of non-EOS input ids and
    of the bytes and characters its rows' input_ids decode to (pads included: the reference's
    collect_stats detokenized_bytes / detokenized_chars)."""
    stream = np.memmap(stream_path, dtype=np.dtype(dtype), mode="r")
    enc = get_tokenizer(vocab_file, encoder_file)
    tmp = out_path.with_name(out_path.name + ".tmp")
    n = len(starts)
    # Fixed layout and no timestamps: the bytes depend only on the data. Uncompressed files are
    # contiguous so the loader can memory-map them; compressed ones use the reference's row chunks.
    layout = {} if compression == "none" else {"chunks": (1, 3, msl), "compression": compression}
    counts = {"non_pad_tokens": 0, "detokenized_bytes": 0, "detokenized_chars": 0}
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["n_examples"] = np.int64(n)
            data = f.create_dataset("data", shape=(n, 3, msl), dtype="<i4", track_times=False, **layout)
            for lo in range(0, n, _ROWS_PER_WRITE):
                hi = min(n, lo + _ROWS_PER_WRITE)
                rows = _sequences(stream, starts[lo:hi], lengths[lo:hi], msl)
                data[lo:hi] = rows
                counts["non_pad_tokens"] += int((rows[:, 0] != PAD_ID).sum())
                detokenized_bytes, detokenized_chars = _detokenized_sizes(rows[:, 0], enc)
                counts["detokenized_bytes"] += detokenized_bytes
                counts["detokenized_chars"] += detokenized_chars
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out_path)
    return counts


@lru_cache(maxsize=4)
def _token_sizes(enc: tiktoken.Encoding) -> tuple[np.ndarray, np.ndarray]:
    """Per token id: the length of its bytes, and whether they are all ASCII (a user's BPE may leave
    ids unused: none, and decoded if ever met)."""
    pieces = []
    for i in range(enc.n_vocab):
        try:
            pieces.append(enc.decode_single_token_bytes(i))
        except KeyError:
            pieces.append(b"\xff")
    return (np.array([len(b) for b in pieces], dtype=np.int64), np.array([b.isascii() for b in pieces]))


def _detokenized_sizes(ids: np.ndarray, enc: tiktoken.Encoding) -> tuple[int, int]:
    """(bytes, characters) of each row of ``ids`` decoded on its own (UTF-8, undecodable bytes as
    U+FFFD), summed: the reference's detokenized_bytes / detokenized_chars. Rows of ASCII tokens are
    counted from the token lengths; the others are decoded."""
    length, ascii_token = _token_sizes(enc)
    ascii_rows = ascii_token[ids].all(axis=1)
    total = int(length[ids[ascii_rows]].sum())
    sizes = [total, total]
    for row in ids[~ascii_rows].tolist():
        text = enc.decode_bytes(row).decode("utf-8", errors="replace")
        sizes[0] += len(text.encode("utf-8"))
        sizes[1] += len(text)
    return sizes[0], sizes[1]


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
    files = _input_files(input_dir, text_key, enc.name, params.normalization())
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
    import_readers([f.path for f in files])

    with _worker_pool(processes) as pool:
        metas, done_bytes, last_log = [], 0, time.monotonic()
        tokenize = partial(_tokenize_file, cache_dir=cache, text_key=text_key, params=params)
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
        log.info("%s: normalisation changed %d of %d documents (newlines %d, byte-order marks %d, ftfy %d)",
                 input_dir, corpus["normalized_documents"], corpus["documents"] + corpus["empty_documents"],
                 corpus["newline_fixed_documents"], corpus["bom_removed_documents"], corpus["ftfy_fixed_documents"])
        stats = {}
        for split in SPLITS:
            stats[split] = _write_split(split, metas, in_val, cache, dtype, output_dir, params, pool)
            _write_data_params(output_dir / split, split, text_key, params, enc, fingerprint,
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
    if (split == "val" and params.val_fraction == 0) or len(_packing(doc_lengths, params).starts):
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
    without_eos = params.pack_sequences and params.packing_scheme == "disjoint"
    eos = np.array([EOS_ID], dtype=dtype)
    chosen_docs: dict[str, list[np.ndarray]] = {key: [] for key in DOCUMENT_SIZES}
    stream_bytes = sum(int(np.asarray(m["lengths"], dtype=np.int64)[v == want_val].sum())
                       for m, v in zip(metas, in_val, strict=True)) * dtype.itemsize
    with disk_space(cache, doing=f"staging the {split} split's tokens", needed=stream_bytes,
                    remove=[stream_path]), stream_path.open("wb") as out:
        if params.pack_sequences and params.packing_scheme == "overlap":
            out.write(eos.tobytes())  # the first buffer's EOS
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
                run = tokens[ends[first] - lengths[first]:ends[stop - 1]]
                if without_eos:
                    run = np.delete(run, ends[first:stop] - 1 - (ends[first] - lengths[first]))
                out.write(run.tobytes())
            for key in DOCUMENT_SIZES:
                chosen_docs[key].append(np.asarray(meta[key], dtype=np.int64)[chosen])
        if without_eos:
            out.write(eos.tobytes())  # ends the last document's leftover
    docs = {key: np.concatenate(v) if v else np.zeros(0, np.int64) for key, v in chosen_docs.items()}
    n_docs = len(docs["lengths"])
    packing = _packing(docs["lengths"], params)
    starts, lengths = packing.starts, packing.lengths
    if len(packing.eos_at):
        stream = np.memmap(stream_path, dtype=dtype, mode="r+")
        stream[packing.eos_at] = EOS_ID
        stream.flush()
        del stream

    folder = output_dir / split
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("data-*.h5*"):  # left by an interrupted run (maybe of other parameters)
        stale.unlink()
    spf, msl = params.samples_per_file, params.max_seq_length
    n_files = -(-len(starts) // spf)
    write = partial(_write_h5, stream_path, dtype.str, msl=msl, compression=params.compression,
                    vocab_file=params.vocab_file, encoder_file=params.encoder_file)
    pieces = range(n_files)
    # a failed file removes its own temporary file (_write_h5); files already written are complete
    with disk_space(folder, doing=f"writing the {split} split ({n_files} HDF5 files)",
                    needed=len(starts) * 3 * msl * 4, remove=[stream_path]):
        per_file = list(pool.map(write, [starts[i * spf:(i + 1) * spf] for i in pieces],
                                 [lengths[i * spf:(i + 1) * spf] for i in pieces],
                                 [folder / h5_name(i) for i in pieces]))
    stream_path.unlink()
    log.info("%s: %d sequences from %d documents in %d files", folder, len(starts), n_docs, n_files)

    real = int((lengths - 1).sum())  # positions with a label; the rest is padding
    num_tokens = len(starts) * msl
    stats = {"num_documents": n_docs, "num_sequences": len(starts), "num_tokens": num_tokens,
             # non_pad_tokens as the reference counts it: input ids other than EOS/PAD (it cannot tell them apart)
             **{key: sum(f[key] for f in per_file) for key in ("non_pad_tokens", "detokenized_bytes",
                                                                "detokenized_chars")},
             "loss_valid_tokens": real, "num_pad_tokens": num_tokens - real, "num_files": n_files,
             "discarded_documents": _uncovered_documents(packing)}
    sizes = {f"{key}_count": int(docs[key].sum()) for key in DOCUMENT_SIZES if key != "lengths"}
    return {**stats, **sizes}


def _uncovered_documents(packing: _Packing) -> int:
    """Documents none of whose tokens is in any row (too short for min_sequence_len, or in a dropped
    final window). Windows are sorted by start and so by end, as documents are."""
    if not len(packing.doc_ends):
        return 0
    doc_starts = np.concatenate([[0], packing.doc_ends[:-1]])
    window_ends = packing.starts + packing.lengths
    last = np.searchsorted(packing.starts, packing.doc_ends, side="left") - 1  # last window starting inside or before
    covered = (last >= 0) & (window_ends[np.maximum(last, 0)] > doc_starts)
    return int((~covered).sum())


def _corpus_stats(metas: list[dict]) -> dict:
    keys = ("documents", "empty_documents", "tokens", "bytes", "replaced_chars", *NORMALIZATION_COUNTS)
    return {"files": len(metas), "empty_files": sum(not m["documents"] for m in metas),
            **{key: sum(m[key] for m in metas) for key in keys}}


def _write_data_params(folder: Path, split: str, text_key: str, params: PreprocessParams,
                       enc: tiktoken.Encoding, fingerprint: str, stats: dict, corpus: dict) -> None:
    """The reference's data_params.json, with the keys of both its generations where they agree:
    ``setup`` / ``processing`` / ``dataset`` (create_hdf5_dataset.py 1.9-2.2 and preprocess_data.py
    2.3+), ``features`` (2.4+; its readers name the rows of ``data`` from it), ``post-process`` (file
    counts, n_examples, raw and normalized chars and bytes, token counts, eos/pad ids, vocab size) and
    ``h5_dataset_stats`` (2.0-2.2, detokenized_bytes / detokenized_chars included). Documents stand
    for the reference's "files" (it counts each document read as a processed file).
    It records no location (the reference's ``setup.input_dir``): the corpus is named by its content
    (``fingerprint``), so the same corpus and parameters give the same bytes, and the dataset the same
    hash, wherever it was read from."""
    ids = {"eos_id": enc.eot_token, "pad_id": PAD_ID, "vocab_size": enc.n_vocab}
    documents = stats["num_documents"]
    post_process = {
        "processed_files": documents, "discarded_files": stats["discarded_documents"],
        "successful_files": documents - stats["discarded_documents"], "n_examples": stats["num_sequences"],
        **{key: stats[key] for key in ("raw_chars_count", "raw_bytes_count", "normalized_chars_count",
                                       "normalized_bytes_count", "num_pad_tokens", "non_pad_tokens",
                                       "loss_valid_tokens", "num_tokens")},
        "num_masked_tokens": stats["num_tokens"] - stats["loss_valid_tokens"], **ids,
    }
    doc = {
        "setup": {"fingerprint": fingerprint, "format": "gpt2ops-hdf5/1"},
        "processing": {**params.data_fields(), "files_per_record": params.samples_per_file,
                       "tokenizer_type": "GPT2Tokenizer", **ids, "window_overlap": params.window_overlap},
        "dataset": {"split": split, "jsonl_key": text_key, "corpus": corpus,
                    **{key: getattr(params, key) for key in ("use_ftfy", "ftfy_normalizer", "pack_sequences",
                                                             "min_sequence_len")},
                    "wikitext_detokenize": False, "inverted_mask": False},
        "features": list(FEATURES),
        "post-process": post_process,
        "h5_dataset_stats": stats,
    }
    tmp = folder / (DATA_PARAMS + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder / DATA_PARAMS)
