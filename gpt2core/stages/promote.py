"""Promote stage: register the trained model and make it the champion only if it beats the current
one (`gpt2ops promote --params CFG [--model_dir MODEL] [--dataset DATA] [--eval_loss L]`).

The model is registered in the MLflow model registry as ``<experiment>-gpt2`` with the
``challenger`` alias; the ``champion`` alias moves to it only when its ``eval/loss`` is lower than the
champion's on the same eval set (the dataset's ``val/`` split, compared by content hash). The
champion's score is the one tagged on it when it was measured on this eval set; otherwise the
champion is evaluated on it now. Without flags the model, dataset and eval/loss are this pipeline
run's (``<run>/train/model``, ``<run>/preprocess/dataset``, the evaluate stage's result.json).
Output: the ``decision`` artifact (``decision.json``, ``decision.md``).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile

from pydantic import Field

from gpt2core.errors import ConfigError
from gpt2core.platform import tracking
from gpt2core.platform.artifacts import NotFound, local_input, local_output, manifest_digest, read_manifest
from gpt2core.platform.context import RunContext
from gpt2core.platform.results import StageResult, read_result
from gpt2core.stages.inputs import require_input, split_use
from gpt2core.stages.request import ModelRequest

STAGE = "promote"


class Request(ModelRequest):
    """The model to register, the eval set it was scored on, and its score."""

    model_dir: str | None = Field(None, description="the train stage's model artifact (default: this "
                                                    "pipeline run's <run>/train/model)")
    eval_loss: float | None = Field(None, ge=0, allow_inf_nan=False,
                                    description="the model's eval/loss on the dataset's val/ split (default: "
                                                "from this pipeline run's evaluate result.json)")


def run(ctx: RunContext, request: Request) -> StageResult:
    """Register the model; move ``champion`` to it only if it scores better on the same eval set."""
    from gpt2core.stages import run_stage

    require_input("--model_dir", request.model_dir)  # before any work
    require_input("--dataset", request.dataset)
    model_uri = request.model_dir or ctx.artifact_uri("train", "model")
    dataset_uri = request.dataset or ctx.artifact_uri("preprocess", "dataset")
    eval_loss = request.eval_loss
    if eval_loss is None:
        try:
            evaluated = read_result(ctx.result_uri("evaluate"))
        except NotFound:
            raise ConfigError(f"--eval_loss: not given, and pipeline run {ctx.pipeline_run_id!r} has no evaluate "
                              f"result ({ctx.result_uri('evaluate')}); run evaluate first or pass --eval_loss") from None
        evaluated.raise_if_failed()
        _require_whole_split(evaluated)
        eval_loss = evaluated.metrics["eval/loss"]
    name = tracking.default_model_name(ctx)
    dataset_hash = manifest_digest(read_manifest(dataset_uri))
    decision_uri = ctx.artifact_uri(STAGE, "decision")
    with tracking.stage_run(STAGE, ctx, params={"model_uri": model_uri, "model_name": name},
                            tags={tracking.TAG_DATASET_HASH: dataset_hash}) as tracked:
        tracked.log_datasets([split_use(f"{dataset_uri.rstrip('/')}/val", tracking.DATASET_EVALUATION)])
        version = tracking.find_model_version(name, model_uri)
        if version is None:
            with local_input(model_uri) as folder:
                version = tracked.log_model(folder, registered_model_name=name, model_uri=model_uri)
        else:
            tracked.log_model_input(model_uri)
        champion = tracking.champion_version(name)
        champion_score = None
        if champion is not None and champion != version:
            champion_score = tracking.tagged_score(name, champion, dataset_hash=dataset_hash)
            if champion_score is None:
                with tempfile.TemporaryDirectory(prefix="gpt2ops-champion-") as scratch:
                    folder = tracking.download_model_version(name, champion, scratch)
                    rescored = run_stage("evaluate", dataclasses.replace(
                        ctx, pipeline_run_id=f"{ctx.pipeline_run_id}/champion-v{champion}"),
                        _evaluate_request(request, model_dir=str(folder), dataset=dataset_uri))
                champion_score = rescored.metrics["eval/loss"]
        # Compare at the precision scores are tagged with (6 digits), so a rerun that scores the
        # same does not look better by rounding.
        promoted = tracking.promote_if_better(name, version, score=float(f"{eval_loss:.6g}"),
                                              champion_score=champion_score, dataset_hash=dataset_hash)
        decision = {"model_name": name, "version": version, "promoted": promoted, "eval/loss": eval_loss,
                    "champion_version": champion, "champion_eval/loss": champion_score}
        tracked.set_tags({tracking.TAG_PROMOTED: str(promoted), tracking.TAG_MODEL_VERSION: version})
        with local_output(decision_uri) as out:
            (out / "decision.json").write_text(json.dumps(decision, indent=1) + "\n")
            verdict = "promoted to champion" if promoted else "champion kept"
            rows = "\n".join(f"| {k} | {v} |" for k, v in decision.items())
            (out / "decision.md").write_text(f"# Model registry: {verdict}\n\n| key | value |\n|---|---|\n{rows}\n")
    metrics = {"promote/promoted": float(promoted), "promote/version": float(version)}
    return StageResult(outputs={"decision": decision_uri}, metrics=metrics, mlflow_run_id=tracked.run_id)


def _require_whole_split(evaluated: StageResult) -> None:
    """Scores compare only over the same tokens: the champion is (re)scored on the whole val split,
    so the challenger's score must be too; ConfigError when the evaluate stage was capped."""
    scored, split = evaluated.details.get("eval_batches"), evaluated.details.get("split_batches")
    if scored is not None and scored != split:
        raise ConfigError(f"the evaluate stage scored {scored} of the val split's {split} batches "
                          f"(--eval_steps); promotion compares scores on the whole split: evaluate without "
                          f"--eval_steps, or give --eval_loss")


def _evaluate_request(request: Request, *, model_dir: str, dataset: str):  # noqa: ANN202 - evaluate.Request
    from gpt2core.stages import evaluate

    return evaluate.Request(params=request.params, overrides=request.overrides, dataset=dataset,
                            model_dir=model_dir)
