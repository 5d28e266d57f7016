"""Preprocess stage: tokenize the corpus into Cerebras-layout HDF5 (`gpt2ops preprocess`).

Flags keep the reference create_hdf5_dataset.py names (`--input_dir`, `--output_dir`,
`--max_seq_length`, `--files_per_record`, `--jsonl_key`, ...); both directories may be s3:// URIs.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

from gpt2core.data.download import cache_root
from gpt2core.data.preprocess import PreprocessParams, preprocess_corpus
from gpt2core.data.verify import verify_dataset
from gpt2core.errors import ConfigError
from gpt2core.stages.common import RunContext, StageResult, add_context_arguments, context_from_args
from gpt2core.platform.artifacts import fetch_file, is_s3, local_input, local_output
from gpt2core.platform.tracking import stage_run

STAGE = "preprocess"


def _token_cache(input_uri: str, params: PreprocessParams) -> Path:
    """A stable local folder for the tokenized files, so rerunning a failed stage skips that work."""
    key = json.dumps([input_uri, params.jsonl_key, params.vocab_file, params.encoder_file])
    return cache_root() / "tokens" / hashlib.sha256(key.encode()).hexdigest()[:16]


def run(input_uri: str, *, ctx: RunContext, params: PreprocessParams, output_uri: str | None = None,
        verify: bool = False) -> StageResult:
    """Tokenize the corpus at `input_uri` into the dataset artifact (`train/` and `val/`)."""
    uri = output_uri or ctx.artifact_uri(STAGE, "dataset")
    with stage_run(STAGE, ctx, params=dataclasses.asdict(params)) as tracked, \
            tempfile.TemporaryDirectory(prefix="gpt2ops-tokenizer-") as scratch:
        local_params = _local_tokenizer_files(params, Path(scratch))
        cache = _token_cache(input_uri, params)
        started = time.monotonic()
        with local_input(input_uri) as corpus, local_output(uri) as out:
            stats = preprocess_corpus(corpus, out, local_params, cache_dir=cache)
            if verify:
                verify_dataset(out, max_seq_length=params.max_seq_length)
        shutil.rmtree(cache, ignore_errors=True)
        seconds = time.monotonic() - started
        train, val, corpus_stats = stats["train"], stats["val"], stats["corpus"]
        metrics = {
            "preprocess/num_sequences": float(train["num_sequences"] + val["num_sequences"]),
            "preprocess/num_tokens": float(train["num_tokens"] + val["num_tokens"]),
            "preprocess/loss_valid_tokens": float(train["loss_valid_tokens"] + val["loss_valid_tokens"]),
            "preprocess/train_sequences": float(train["num_sequences"]),
            "preprocess/val_sequences": float(val["num_sequences"]),
            "preprocess/documents": float(corpus_stats["documents"]),
            "preprocess/replaced_chars": float(corpus_stats["replaced_chars"]),
            "preprocess/seconds": seconds,
            "preprocess/tokens_per_s": corpus_stats["tokens"] / max(seconds, 1e-9),
        }
        tracked.log_metrics(metrics)
    return StageResult(outputs={"dataset": uri}, metrics=metrics)


def _local_tokenizer_files(params: PreprocessParams, scratch: Path) -> PreprocessParams:
    """Tokenizer files may be s3:// URIs: the tokenizer reads local copies."""
    fetched = {name: str(fetch_file(getattr(params, name), scratch / name)) for name in ("vocab_file", "encoder_file")
               if getattr(params, name) and is_s3(getattr(params, name))}
    return dataclasses.replace(params, **fetched)


def _bool(value: str) -> bool:
    lowered = str(value).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = PreprocessParams()
    parser.add_argument("--input_dir", required=True,
                        help="corpus folder or s3:// URI (e.g. the download stage's corpus)")
    parser.add_argument("--output_dir", default=None,
                        help="dataset folder or s3:// URI (default: <artifact_root>/<run>/preprocess/dataset)")
    parser.add_argument("--max_seq_length", type=int, default=d.max_seq_length)
    parser.add_argument("--pack_sequences", type=_bool, nargs="?", const=True, default=d.pack_sequences,
                        help="pack documents into full windows (default: true)")
    parser.add_argument("--packing_scheme", choices=("carry_over", "overlap"), default=d.packing_scheme,
                        help="carry_over: Model Zoo 2.x (stride = max_seq_length); overlap: 1.x")
    parser.add_argument("--overlap_size", type=int, default=None, help="overlap scheme only (default max_seq_length/4)")
    parser.add_argument("--min_sequence_len", type=int, default=d.min_sequence_len)
    parser.add_argument("--files_per_record", "--samples_per_file", dest="samples_per_file", type=int,
                        default=d.samples_per_file, help="sequences per HDF5 file")
    parser.add_argument("--compression", choices=("none", "gzip", "lzf"), default=d.compression)
    parser.add_argument("--val_fraction", type=float, default=d.val_fraction,
                        help="fraction of documents for val/ (chosen by --seed)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--processes", type=int, default=d.processes, help="worker processes (0: all cores)")
    parser.add_argument("--jsonl_key", default=None, help="JSON/parquet text field (default: the corpus's, else text)")
    parser.add_argument("--vocab_file", default=None, help="BPE merges (vocab.bpe); default: GPT-2's")
    parser.add_argument("--encoder_file", default=None, help="token -> id map (encoder.json); default: GPT-2's")
    parser.add_argument("--verify", action="store_true", help="check every written file before publishing")
    add_context_arguments(parser)


def params_from_args(args: argparse.Namespace) -> PreprocessParams:
    names = [f.name for f in dataclasses.fields(PreprocessParams)]
    try:
        return PreprocessParams(**{name: getattr(args, name) for name in names})
    except ConfigError:
        raise
    except TypeError as exc:
        raise ConfigError(f"preprocess flags: {exc}") from exc


def main(args: argparse.Namespace) -> int:
    result = run(args.input_dir, ctx=context_from_args(args), params=params_from_args(args),
                 output_uri=args.output_dir, verify=args.verify)
    print(json.dumps({"outputs": result.outputs, "metrics": result.metrics}, indent=2))
    return 0
