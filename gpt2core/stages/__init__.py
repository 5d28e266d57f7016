"""The pipeline stages and their one contract.

Every stage is a module ``gpt2core.stages.<stage>`` that defines

- ``Request``: the stage's typed request (a ``gpt2core.stages.request.StageRequest``), and
- ``run(ctx: RunContext, request) -> StageResult``: the stage itself. It publishes its artifacts under
  ``ctx.artifact_uri(<stage>, <artifact>)`` (manifest last) inside an MLflow child run of the
  pipeline's parent run, and returns their URIs and its headline metrics.

A stage module holds only the stage's I/O wiring (artifact URIs, tracking); the work itself lives in
the library (gpt2core.data, gpt2core.model, gpt2core.training, ...). Nothing calls a stage's ``run``
directly but ``run_stage``, which also writes the stage's ``result.json``; the launchers
(``gpt2core.launch``) call ``run_stage`` in this process or start ``gpt2ops <stage>`` elsewhere.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from types import ModuleType

from gpt2core.platform import tracking
from gpt2core.platform.artifacts import manifest_digest, read_manifest
from gpt2core.platform.artifacts import is_s3
from gpt2core.platform.artifacts.uris import local_path
from gpt2core.platform.context import RunContext, process_rank
from gpt2core.platform.disk import disk_space
from gpt2core.platform.results import StageResult, write_result
from gpt2core.stages.inputs import working_folder
from gpt2core.stages.request import StageRequest

log = logging.getLogger(__name__)

# In pipeline order. `gpt2ops <stage>` exists for each.
STAGES: dict[str, str] = {
    "download": "fetch a raw text corpus into an artifact",
    "preprocess": "tokenize a corpus into Cerebras-layout HDF5",
    "validate": "check config, data and memory before training (validate_only)",
    "compile": "compile the training step and save compiler caches (compile_only)",
    "train": "train a GPT-2 model",
    "evaluate": "evaluate a model on the validation split and sample text",
    "promote": "register the model; make it the champion only if it beats the current one",
}


def stage_module(stage: str) -> ModuleType:
    """The module of ``stage`` (imported on first use: a stage may import torch or the SDK)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    return importlib.import_module(f"gpt2core.stages.{stage}")


def run_stage(stage: str, ctx: RunContext, request: StageRequest) -> StageResult:
    """Run ``stage`` in this process and write its ``result.json`` (rank 0 only): the result after
    the stage published its artifacts, or, when it raised, the error's class and one-line message
    (the error is raised again). A full disk the stage did not word itself becomes a DiskFullError
    naming the file's folder."""
    module = stage_module(stage)
    if not isinstance(request, module.Request):
        raise TypeError(f"stage {stage} takes a {module.Request.__name__}, got {type(request).__name__}")
    if not is_s3(ctx.artifact_root):  # before the stage's work: its folder must be one that can be made
        working_folder("--artifact_root", local_path(ctx.result_uri(stage)).parent)
    try:
        # a full disk that no writer inside worded: named by the file the system names, if it does
        with disk_space(Path.cwd(), doing=f"in the {stage} stage"):
            result = module.run(ctx, request)
    except BaseException as exc:
        if process_rank() == 0:
            _record(ctx, StageResult.failure(stage, exc))
        raise
    result = result.model_copy(update={"stage": stage})
    if process_rank() == 0:
        _record_published(result)
        write_result(ctx.result_uri(stage), result)
    return result


def _record_published(result: StageResult) -> None:
    """Put each published artifact's manifest digest on the stage's MLflow run: what a later stage
    that unpickles the artifact's files checks them against (``gpt2core.stages.inputs``)."""
    if not result.mlflow_run_id or not result.outputs:
        return
    tracking.record_published(result.mlflow_run_id, {
        name: (uri, manifest_digest(read_manifest(uri))) for name, uri in result.outputs.items()})


def _record(ctx: RunContext, failure: StageResult) -> None:
    """Write a failure's result file; a storage error then must not hide the stage's own error."""
    try:
        write_result(ctx.result_uri(failure.stage), failure)
    except Exception as exc:  # noqa: BLE001 - the stage's error is what the caller needs to see
        log.warning("could not write %s (%s)", ctx.result_uri(failure.stage), exc)
