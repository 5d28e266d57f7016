"""Documents out of corpus files: .txt, .jsonl, .json.gz / .jsonl.gz, .jsonl.zst and .parquet.

A .txt file is one document (as in the reference); every other format holds one document per record
under a text key. Bytes that are not UTF-8 are replaced with U+FFFD and counted, never fatal.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gpt2core.errors import DataError

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".json.gz", ".jsonl.gz", ".jsonl.zst", ".parquet")
_REPLACEMENT = "\ufffd"


def corpus_format(path: str | Path) -> str | None:
    """The supported suffix `path` ends with, or None."""
    name = str(path).lower()
    return next((s for s in SUPPORTED_SUFFIXES if name.endswith(s)), None)


@dataclass
class ReadStats:
    documents: int = 0
    bytes: int = 0
    replaced_chars: int = 0  # U+FFFD written for undecodable input bytes


def _decode(data: bytes, stats: ReadStats) -> str:
    stats.bytes += len(data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        stats.replaced_chars += text.count(_REPLACEMENT) - data.count(_REPLACEMENT.encode("utf-8"))
        return text


def _json_lines(stream: io.BufferedIOBase, path: Path, text_key: str, stats: ReadStats) -> Iterator[str]:
    for line_no, raw in enumerate(stream, 1):
        if not raw.strip():
            continue
        line = _decode(raw, stats)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or text_key not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{path}:{line_no}: expected an object with text key {text_key!r}, found {keys} "
                            f"(set --jsonl_key / text_key)")
        text = record[text_key]
        if not isinstance(text, str):
            raise DataError(f"{path}:{line_no}: {text_key!r} must be a string, found {type(text).__name__}")
        yield text


def _parquet(path: Path, text_key: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pfile = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable parquet file ({exc})") from exc
    if text_key not in pfile.schema_arrow.names:
        raise DataError(f"{path}: no column {text_key!r} (columns: {pfile.schema_arrow.names}; "
                        f"set --jsonl_key / text_key)")
    for batch in pfile.iter_batches(columns=[text_key], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


def import_readers(paths: list[Path]) -> None:
    """Import the modules that read the formats of ``paths`` now, in this process: workers forked
    from it then find them loaded. (A forked child must not import a module that another thread of
    its parent was importing at the fork: the module's import lock stays held in the child.)"""
    formats = {corpus_format(p) for p in paths}
    if ".parquet" in formats:
        import pyarrow.parquet  # noqa: F401
    if ".jsonl.zst" in formats:
        import zstandard  # noqa: F401


def iter_documents(path: str | Path, text_key: str = "text", stats: ReadStats | None = None) -> Iterator[str]:
    """Yield the documents of one corpus file in order; `stats` (if given) is updated as it goes."""
    path = Path(path)
    stats = stats if stats is not None else ReadStats()
    fmt = corpus_format(path)
    if fmt is None:
        raise DataError(f"{path}: unsupported file type (expected one of {', '.join(SUPPORTED_SUFFIXES)})")
    try:
        if fmt == ".txt":
            docs: Iterator[str] = iter([_decode(path.read_bytes(), stats)])
        elif fmt == ".parquet":
            docs = _parquet(path, text_key)
        else:
            docs = _json_lines_file(path, fmt, text_key, stats)
        for doc in docs:
            stats.documents += 1
            yield doc
    except OSError as exc:  # missing, unreadable, truncated gzip/zstd
        raise DataError(f"{path}: cannot read ({exc})") from exc


def _json_lines_file(path: Path, fmt: str, text_key: str, stats: ReadStats) -> Iterator[str]:
    if fmt == ".jsonl":
        with path.open("rb") as f:
            yield from _json_lines(f, path, text_key, stats)
    elif fmt == ".jsonl.zst":
        import zstandard

        with path.open("rb") as raw:
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            try:
                yield from _json_lines(io.BufferedReader(reader), path, text_key, stats)
            except zstandard.ZstdError as exc:
                raise DataError(f"{path}: corrupt zstd stream ({exc})") from exc
    else:  # .json.gz / .jsonl.gz: JSON lines, gzipped (as in the Pile and the reference's readers)
        with gzip.open(path, "rb") as f:
            yield from _json_lines(f, path, text_key, stats)
