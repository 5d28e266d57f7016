"""Download stage: fetch a raw text corpus into the `corpus` artifact (`gpt2ops download`)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

from gpt2core.data.download import QUICKSTART_SOURCE, CorpusSource, download_source
from gpt2core.stages.common import RunContext, StageResult, add_context_arguments, context_from_args
from gpt2core.platform.artifacts import local_output
from gpt2core.platform.tracking import stage_run

STAGE = "download"


def run(source: str, *, ctx: RunContext, include: Sequence[str] = (), text_key: str = "text",
        sha256: str | None = None, output_uri: str | None = None) -> StageResult:
    """Fetch `source` (path, file://, http(s)://, s3://, hf://datasets/...) into the corpus artifact."""
    uri = output_uri or ctx.artifact_uri(STAGE, "corpus")
    params = {"source": source, "include": ",".join(include), "text_key": text_key, "sha256": sha256 or ""}
    with stage_run(STAGE, ctx, params=params) as tracked:
        started = time.monotonic()
        with local_output(uri) as folder:
            info = download_source(source, folder, include=include, text_key=text_key, sha256=sha256)
        metrics = {"download/files": float(info["files"]), "download/bytes": float(info["bytes"]),
                   "download/seconds": time.monotonic() - started}
        tracked.log_metrics(metrics)
    return StageResult(outputs={"corpus": uri}, metrics=metrics)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="?", default=None,
                        help="local path, file://, http(s)://, s3:// or hf://datasets/<org>/<name>[@rev] "
                             f"(default: the quickstart corpus, {QUICKSTART_SOURCE.description})")
    parser.add_argument("--include", action="append", default=None, metavar="GLOB",
                        help="keep only files whose path in the archive/folder matches (repeatable or comma-separated)")
    parser.add_argument("--text_key", default=None, help="JSON/parquet field holding the text (default: text)")
    parser.add_argument("--sha256", default=None, help="expected sha256 of the downloaded file")
    parser.add_argument("--output_dir", default=None,
                        help="folder or s3:// URI for the corpus (default: <artifact_root>/<run>/download/corpus)")
    add_context_arguments(parser)


def main(args: argparse.Namespace) -> int:
    include = tuple(p.strip() for value in args.include or () for p in value.split(",") if p.strip())
    # No source: the quickstart corpus, with its checksum, selection and text key unless overridden.
    default = QUICKSTART_SOURCE if args.source is None else CorpusSource(url=args.source)
    result = run(default.url, ctx=context_from_args(args), include=include or default.include,
                 text_key=args.text_key or default.text_key, sha256=args.sha256 or default.sha256,
                 output_uri=args.output_dir)
    print(json.dumps({"outputs": result.outputs, "metrics": result.metrics}, indent=2))
    return 0
