"""Validate stage: `gpt2ops validate --params CFG --target gpu --num_gpus 8 --gpu_type H100`.

The reference's validate_only: checks config, datasets and memory without training, and fails the
pipeline before accelerator time is spent. Every problem is listed at once in the ``report``
artifact (``report.json`` + ``report.md``, also on the MLflow run); the stage raises after writing
it. The cerebras target runs the Cerebras SDK's validate_only (``gpt2core.cerebras``).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

from pydantic import Field, PositiveInt

from gpt2core.config import no_effect_keys
from gpt2core.errors import Gpt2opsError, ValidationError
from gpt2core.platform.artifacts import artifact_digest, local_input, local_output
from gpt2core.platform.context import RunContext
from gpt2core.platform.results import StageResult
from gpt2core.platform.tracking import DATASET_INPUT, TAG_CONFIG_HASH, TAG_DATASET_HASH, stage_run
from gpt2core.stages.inputs import split_use
from gpt2core.stages.request import TrainingRequest
from gpt2core.validation import (GPU_MEMORY_GB, ValidationReport, check_data_volume, check_dataset,
                                 check_job)

STAGE = "validate"


class Request(TrainingRequest):
    """The config and data to check, and the machine they must fit."""

    num_gpus: PositiveInt = Field(1, description="GPUs the training job uses in all (gpu target)")
    gpu_type: str = Field("H100", description="GPU model whose memory the estimate is checked against: "
                                              + ", ".join(GPU_MEMORY_GB))


def run(ctx: RunContext, request: Request) -> StageResult:
    """Check ``request``'s config, datasets and memory for its target; every problem is listed in
    the ``report`` artifact, then a ValidationError names them all."""
    report_uri = ctx.artifact_uri(STAGE, "report")
    target = request.target
    report = ValidationReport(target=target)
    cfg = None
    try:
        cfg = request.load_params()
    except Gpt2opsError as exc:
        report.problems.append(f"config {request.params}: {exc}")
    tags = {TAG_CONFIG_HASH: cfg.config_hash()} if cfg else {}
    run_params = cfg.to_flat_dict() if cfg else {"params": request.params}
    with stage_run(STAGE, ctx, params={**run_params, "validate.target": target,
                                       "validate.num_gpus": request.num_gpus,
                                       "validate.gpu_type": request.gpu_type}, tags=tags) as tracked, \
            contextlib.ExitStack() as inputs:
        if cfg is not None:
            report.config = {"params": request.params, "config_hash": cfg.config_hash(),
                             "max_steps": cfg.runconfig.max_steps, "batch_size": cfg.train_input.batch_size,
                             "max_sequence_length": cfg.train_input.max_sequence_length}
            report.notes.extend(no_effect_keys(cfg, target))
            if target in ("cpu", "gpu"):
                check_job(cfg, report, target=target, num_gpus=request.num_gpus, gpu_type=request.gpu_type)
            local_dirs = {}
            for key, uri in (("train_input.data_dir", cfg.train_input.data_dir),
                             ("eval_input.data_dir", cfg.eval_input.data_dir)):
                try:
                    local_dirs[key] = inputs.enter_context(local_input(uri))
                except Gpt2opsError as exc:
                    report.problems.append(f"{key}: {exc}")
                    continue
                tracked.log_datasets([split_use(uri, DATASET_INPUT)])
                stats = check_dataset(key, uri, local_dirs[key], cfg, report)
                if key.startswith("train") and stats is not None:
                    check_data_volume(cfg, stats, report)
            if "train_input.data_dir" in local_dirs and artifact_digest(cfg.train_input.data_dir):
                tracked.set_tags({TAG_DATASET_HASH: artifact_digest(cfg.train_input.data_dir)})
            if target == "cerebras" and "train_input.data_dir" in local_dirs:
                _validate_cerebras(cfg, local_dirs["train_input.data_dir"], report)
        metrics = _metrics(report)
        with local_output(report_uri) as out:
            (out / "report.json").write_text(json.dumps(report.to_dict(), indent=1, default=str))
            (out / "report.md").write_text(report.to_markdown())
            tracked.log_artifact(out, "report")
        tracked.log_metrics(metrics)
        if report.problems:
            raise ValidationError(f"{len(report.problems)} problem(s) (report: {report_uri}): "
                                  + " | ".join(report.problems))
    return StageResult(outputs={"report": report_uri}, metrics=metrics, mlflow_run_id=tracked.run_id)


def _validate_cerebras(cfg, train_dir: Path, report: ValidationReport) -> None:  # noqa: ANN001 - Params
    from gpt2core import cerebras

    with tempfile.TemporaryDirectory(prefix="gpt2ops-cerebras-validate-") as work_dir:
        try:
            report.model["cerebras"] = cerebras.validate(cfg, data_dir=train_dir, work_dir=work_dir)
        except Gpt2opsError as exc:
            report.problems.append(f"cerebras validate_only: {exc}")


def _metrics(report: ValidationReport) -> dict[str, float]:
    metrics = {"validate/problems": float(len(report.problems)), "validate/ok": float(report.ok)}
    for key in ("num_params", "num_params_non_embedding", "flops_per_token"):
        if key in report.model:
            metrics[f"validate/{key}"] = float(report.model[key])
    if report.memory:
        metrics["validate/memory_gb"] = report.memory["total_gb"]
        metrics["validate/device_memory_gb"] = report.memory["device_gb"]
        metrics["validate/activations_gb"] = report.memory["activations_gb"]
    for key, name in (("train_input.data_dir", "train"), ("eval_input.data_dir", "eval")):
        if key in report.datasets:
            metrics[f"validate/{name}_sequences"] = float(report.datasets[key].get("num_sequences", 0))
    return metrics
