"""The one way a stage hands back what it did: a ``StageResult``, written as ``result.json``.

Every stage run writes ``<artifact_root>/<pipeline_run_id>/<stage>/result.json`` after its artifacts
are published (``gpt2core.stages.run_stage``); every launcher (in process, torchrun, TrainJob, the
Cerebras SDK environment, a KFP or Argo step) and every child process that reports back (the compile
stage's timing child) reads results from such a file only, with ``read_result``. A failed run writes
``status: failed`` with the error's class name and its message, and ``read_result`` raises
that same ``gpt2core.errors`` class again in the reader's process.

Format (JSON): ``{"stage": str, "status": "succeeded" | "failed", "outputs": {artifact: uri},
"metrics": {name: float}, "mlflow_run_id": str | null, "details": {...}, "error": {"type": str,
"message": str} | null}``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from gpt2core import errors
from gpt2core.errors import Gpt2opsError, StorageError

RESULT_FILE = "result.json"


class StageError(BaseModel):
    """Why a stage failed: the error class (a ``gpt2core.errors`` name when a user can fix it) and its
    message (one line, except a list of problems such as the validate stage's)."""

    type: str
    message: str


class StageResult(BaseModel):
    """What a stage returns: artifact name -> URI, headline metrics (floats; units in their names or
    the stage's docs), the stage's MLflow run, and on failure the error."""

    model_config = ConfigDict(ser_json_inf_nan="constants")

    stage: str = ""
    status: Literal["succeeded", "failed"] = "succeeded"
    outputs: dict[str, str] = {}
    metrics: dict[str, float] = {}
    mlflow_run_id: str | None = None
    details: dict[str, Any] = {}  # what a child process reports beyond metrics (a report, versions)
    error: StageError | None = None

    @classmethod
    def failure(cls, stage: str, exc: BaseException) -> StageResult:
        """The result of a stage that raised ``exc``: its class name and message."""
        message = (str(exc) or type(exc).__name__)[:20000]
        return cls(stage=stage, status="failed", error=StageError(type=type(exc).__name__, message=message))

    def raise_if_failed(self) -> StageResult:
        """This result when it succeeded; else the error it records, raised again as its own
        ``gpt2core.errors`` class (a Gpt2opsError for any other class: the message says what)."""
        if self.status == "succeeded":
            return self
        error = self.error or StageError(type="Gpt2opsError", message="failed without an error message")
        error_class = getattr(errors, error.type, None)
        if not (isinstance(error_class, type) and issubclass(error_class, Gpt2opsError)):
            raise Gpt2opsError(f"stage {self.stage or '?'} failed: {error.type}: {error.message}")
        raise error_class(error.message)


def write_result(uri: str, result: StageResult) -> None:
    """Write ``result`` as JSON to ``uri`` (a local path or s3:// URI); readers see all of it or none."""
    from gpt2core.platform.artifacts import put_file

    with tempfile.TemporaryDirectory(prefix="gpt2ops-result-") as scratch:
        local = Path(scratch) / RESULT_FILE
        local.write_text(result.model_dump_json(indent=1) + "\n")
        put_file(local, uri)


def read_result(uri: str) -> StageResult:
    """The StageResult at ``uri``; StorageError when there is none or it is not a result file. It is
    returned as written: call ``raise_if_failed`` to turn a failure into its error."""
    from pydantic import ValidationError

    from gpt2core.platform.artifacts import read_text

    text = read_text(uri)
    try:
        return StageResult.model_validate_json(text)
    except ValidationError as exc:
        raise StorageError(f"{uri}: not a stage result file ({exc.errors()[0]['msg']})") from None
