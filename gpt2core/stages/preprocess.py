"""Preprocess stage: tokenize a corpus into Cerebras-layout HDF5 (`gpt2ops preprocess`).

Flags keep the reference create_hdf5_dataset.py names (`--input_dir`, `--output_dir`,
`--max_seq_length`, `--files_per_record`, `--jsonl_key`, ...); both directories may be s3:// URIs.
With `--params` the sequence length is the config's (train_input.max_sequence_length), so the data
fits the model it is made for; `--max_seq_length` still overrides it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, wait
from pathlib import Path

from pydantic import Field

from gpt2core.config import load_params
from gpt2core.data.download import cache_root
from gpt2core.data.preprocess import NORMALIZATION_COUNTS, PreprocessParams, preprocess_corpus
from gpt2core.errors import ConfigError
from gpt2core.platform.artifacts import fetch_file, is_s3, local_input, local_output
from gpt2core.platform.context import RunContext
from gpt2core.platform.results import StageResult
from gpt2core.platform.tracking import DATASET_INPUT, DATASET_OUTPUT, DatasetUse, stage_run
from gpt2core.stages.inputs import require_input, split_use
from gpt2core.stages.request import StageRequest

STAGE = "preprocess"


class Request(StageRequest):
    """The corpus, where the dataset goes, and how it is made."""

    input_dir: str = Field(description="corpus folder or s3:// URI (e.g. the download stage's corpus)")
    output_dir: str | None = Field(None, description="dataset folder or s3:// URI "
                                                     "(default: <artifact_root>/<run>/preprocess/dataset)")
    params: str | None = Field(None, description="config (bundled name, YAML path or s3:// URI) the data is "
                                                 "made for: the sequence length is its "
                                                 "train_input.max_sequence_length")
    verify: bool = Field(False, description="check every written file before publishing")
    preprocessing: PreprocessParams = Field(default_factory=PreprocessParams)

    def preprocess_params(self) -> PreprocessParams:
        """The preprocessing settings, with the sequence length from ``params`` unless
        ``--max_seq_length`` was given; a config whose train and eval lengths differ is refused."""
        given = self.preprocessing
        if self.params is None or "max_seq_length" in given.model_fields_set:
            return given
        cfg = load_params(self.params)
        train, val = cfg.train_input.max_sequence_length, cfg.eval_input.max_sequence_length
        if train != val:
            raise ConfigError(f"{self.params}: train_input.max_sequence_length {train} and "
                              f"eval_input.max_sequence_length {val} differ; one dataset serves both: make "
                              f"them equal or give --max_seq_length")
        return given.model_copy(update={"max_seq_length": train})


def run(ctx: RunContext, request: Request) -> StageResult:
    """Tokenize the corpus at ``request.input_dir`` into the dataset artifact (``train/`` and ``val/``).

    The work starts on a thread before the MLflow run is opened, so the seconds MLflow takes to
    import and open its store overlap it instead of delaying it (the run records the work's
    outcome and metrics all the same, and a failure of the work fails the run). The stage never
    returns or raises while the work still runs: a tracking failure is raised once it has ended."""
    params = request.preprocess_params()
    require_input("--input_dir", request.input_dir)  # before any work
    for flag in ("vocab_file", "encoder_file"):
        require_input(f"--{flag}", getattr(params, flag), folder=False)
    uri = request.output_dir or ctx.artifact_uri(STAGE, "dataset")
    with in_background(_make_dataset, request, params, uri) as work, \
            stage_run(STAGE, ctx, params=params.model_dump()) as tracked:
        stats, seconds = work.result()
        train, val, corpus_stats = stats["train"], stats["val"], stats["corpus"]
        metrics = {
            "preprocess/num_sequences": float(train["num_sequences"] + val["num_sequences"]),
            "preprocess/num_tokens": float(train["num_tokens"] + val["num_tokens"]),
            "preprocess/loss_valid_tokens": float(train["loss_valid_tokens"] + val["loss_valid_tokens"]),
            "preprocess/train_sequences": float(train["num_sequences"]),
            "preprocess/val_sequences": float(val["num_sequences"]),
            "preprocess/documents": float(corpus_stats["documents"]),
            "preprocess/replaced_chars": float(corpus_stats["replaced_chars"]),
            **{f"preprocess/{key}": float(corpus_stats[key]) for key in NORMALIZATION_COUNTS},
            "preprocess/seconds": seconds,
            "preprocess/tokens_per_s": corpus_stats["tokens"] / max(seconds, 1e-9),
        }
        tracked.log_metrics(metrics)
        corpus_profile = {key: corpus_stats[key] for key in ("documents", "tokens", "bytes")}
        splits = [split_use(f"{uri.rstrip('/')}/{split}", DATASET_OUTPUT) for split in ("train", "val")]
        tracked.log_datasets([DatasetUse(request.input_dir, DATASET_INPUT, corpus_profile), *splits])
    return StageResult(outputs={"dataset": uri}, metrics=metrics, mlflow_run_id=tracked.run_id)


def _make_dataset(request: Request, params: PreprocessParams, uri: str) -> tuple[dict, float]:
    """The dataset at ``uri``: (preprocess_corpus's stats, seconds it took)."""
    with tempfile.TemporaryDirectory(prefix="gpt2ops-tokenizer-") as scratch:
        local_params = _local_tokenizer_files(params, Path(scratch))
        cache = _token_cache(request.input_dir, params)
        started = time.monotonic()
        with local_input(request.input_dir) as corpus, local_output(uri) as out:
            stats = preprocess_corpus(corpus, out, local_params, cache_dir=cache)
            if request.verify:
                from gpt2core.data.verify import verify_dataset  # imports torch (the loader): only when asked

                verify_dataset(out, max_seq_length=params.max_seq_length)
        shutil.rmtree(cache, ignore_errors=True)
        return stats, time.monotonic() - started


@contextlib.contextmanager
def in_background(fn, *args) -> Iterator[Future]:  # noqa: ANN001
    """``fn(*args)`` on a daemon thread, its outcome in the yielded Future. The block is not left
    while it runs, so nothing is left working after the stage, unless an interrupt (Ctrl-C) ends it."""
    future: Future = Future()

    def target() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
            future.set_exception(exc)

    threading.Thread(target=target, name=f"{STAGE}-work", daemon=True).start()
    try:
        yield future
    except Exception:
        wait([future])
        raise
    wait([future])


def _token_cache(input_uri: str, params: PreprocessParams) -> Path:
    """A stable local folder for the tokenized files, so rerunning a failed stage skips that work."""
    key = json.dumps([input_uri, params.jsonl_key, params.vocab_file, params.encoder_file])
    return cache_root() / "tokens" / hashlib.sha256(key.encode()).hexdigest()[:16]


def _local_tokenizer_files(params: PreprocessParams, scratch: Path) -> PreprocessParams:
    """Tokenizer files may be s3:// URIs: the tokenizer reads local copies."""
    fetched = {name: str(fetch_file(getattr(params, name), scratch / name)) for name in ("vocab_file", "encoder_file")
               if getattr(params, name) and is_s3(getattr(params, name))}
    return params.model_copy(update=fetched)
