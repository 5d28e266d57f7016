"""Download stage: fetch a raw text corpus into the ``corpus`` artifact (`gpt2ops download [SOURCE]`)."""

from __future__ import annotations

import time
from typing import Annotated

from pydantic import Field, field_validator

from gpt2core.data.download import QUICKSTART_SOURCE, CorpusSource, check_source, download_source
from gpt2core.platform.artifacts import local_output
from gpt2core.platform.context import RunContext
from gpt2core.platform.results import StageResult
from gpt2core.platform.tracking import DATASET_OUTPUT, DatasetUse, stage_run
from gpt2core.flags import Cli
from gpt2core.stages.request import StageRequest

STAGE = "download"


class Request(StageRequest):
    """What to download. Without a source: the quickstart corpus, with its checksum, file selection
    and text key unless given here."""

    source: Annotated[str | None, Cli(positional=True)] = Field(
        None, description="local path, file://, http(s)://, s3:// or hf://datasets/<org>/<name>[@rev] "
                          f"(default: the quickstart corpus, {QUICKSTART_SOURCE.description})")
    include: list[str] = Field(default_factory=list, description="keep only files whose path in the "
                               "archive/folder matches this glob (repeatable or comma-separated)")
    text_key: str | None = Field(None, description="JSON/parquet field holding the text (default: text)")
    sha256: str | None = Field(None, pattern=r"^([0-9a-fA-F]{64})?$",
                               description="expected sha256 of the downloaded file (64 hex digits; empty: "
                                           "not checked, as the run form's source_sha256)")
    output_dir: str | None = Field(None, description="folder or s3:// URI for the corpus "
                                                     "(default: <artifact_root>/<run>/download/corpus)")

    @field_validator("include", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        items = [value] if isinstance(value, str) else value
        if isinstance(items, (list, tuple)):
            return [p.strip() for item in items for p in str(item).split(",") if p.strip()]
        return value

    def corpus_source(self) -> CorpusSource:
        """The source to fetch: this request's, or the quickstart corpus with its defaults."""
        default = QUICKSTART_SOURCE if self.source is None else CorpusSource(url=self.source)
        return CorpusSource(url=default.url, include=tuple(self.include) or default.include,
                            text_key=self.text_key or default.text_key, sha256=self.sha256 or default.sha256)


def run(ctx: RunContext, request: Request) -> StageResult:
    """Fetch the source (path, file://, http(s)://, s3://, hf://datasets/...) into the corpus artifact."""
    source = request.corpus_source()
    check_source(source.url)  # before any work: a source that cannot be fetched fails here
    uri = request.output_dir or ctx.artifact_uri(STAGE, "corpus")
    params = {"source": source.url, "include": ",".join(source.include), "text_key": source.text_key,
              "sha256": source.sha256 or ""}
    with stage_run(STAGE, ctx, params=params) as tracked:
        started = time.monotonic()
        with local_output(uri) as folder:
            info = download_source(source.url, folder, include=source.include, text_key=source.text_key,
                                   sha256=source.sha256)
        metrics = {"download/files": float(info["files"]), "download/bytes": float(info["bytes"]),
                   "download/seconds": time.monotonic() - started}
        tracked.log_metrics(metrics)
        tracked.log_datasets([DatasetUse(uri, DATASET_OUTPUT, {"source": source.url, "files": info["files"],
                                                                "bytes": info["bytes"]})])
    return StageResult(outputs={"corpus": uri}, metrics=metrics, mlflow_run_id=tracked.run_id)
