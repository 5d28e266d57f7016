"""Plumbing shared by the component functions, imported inside them at run time.

A component receives the pipeline run id (KFP's job id), the artifact root (an S3 prefix) and the
MLflow experiment; the MLflow parent run that `start_run` opened is found by its pipeline-run-id tag.
The parent run id is deliberately not a component input: task caching keys on the inputs, and a new
parent run per pipeline run would make every cache lookup miss.

Stage outputs stay in S3 (the stage writes them there, manifest last). The KFP artifacts a
component emits are small pointers to those S3 folders, plus Metrics and Markdown/HTML reports for
the KFP UI.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from html import escape
from pathlib import Path

from gpt2core.stages.common import RunContext, StageResult


def stage_context(pipeline_run_id: str, artifact_root: str, experiment: str) -> RunContext:
    """The RunContext a stage runs in, with its MLflow parent run looked up."""
    from gpt2core.platform.tracking import find_parent_run

    return RunContext(pipeline_run_id=pipeline_run_id, artifact_root=artifact_root,
                      experiment=experiment,
                      parent_run_id=find_parent_run(pipeline_run_id, experiment))


def point_to(artifact, uri: str) -> None:
    """Make a KFP artifact stand for the S3 folder at `uri`: the UI shows the URI, the file holds it.

    The artifact keeps its own KFP-managed location (kfp.local's cache treats a missing local file as
    a miss, and an s3:// URI in the KFP store would bypass our manifest check).
    """
    artifact.metadata["uri"] = uri
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(json.dumps({"uri": uri}) + "\n")


def log_metrics(metrics_artifact, metrics: Mapping[str, float]) -> None:
    """Metrics for the KFP UI (artifact metadata), also written to the artifact's file: kfp.local's
    cache treats an output artifact without a file as missing, and would never hit."""
    for name, value in sorted(metrics.items()):
        if isinstance(value, (int, float)) and math.isfinite(value):
            metrics_artifact.log_metric(name, float(value))
    write_text(metrics_artifact, json.dumps(metrics_artifact.metadata, indent=1, sort_keys=True))


def publish(result: StageResult, pointers: Mapping[str, object], metrics_artifact=None) -> None:
    """Point each KFP artifact at the stage output of the same name and copy the stage's metrics."""
    for name, artifact in pointers.items():
        point_to(artifact, result.outputs[name])
    if metrics_artifact is not None:
        log_metrics(metrics_artifact, result.metrics)


def write_text(artifact, text: str) -> None:
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(text)


def markdown_table(rows: Mapping[str, object], header: tuple[str, str] = ("name", "value")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    for key, value in rows.items():
        shown = f"{value:.6g}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | {shown.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def report_markdown(uri: str, title: str) -> str:
    """A stage's report folder as Markdown: its .md files verbatim, or else its .json files as
    tables."""
    from gpt2core.platform.artifacts import MANIFEST, local_input

    parts = [f"# {title}\n", f"`{uri}`\n"]
    with local_input(uri) as folder:
        files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != MANIFEST)
        markdown = [p for p in files if p.suffix == ".md"]
        for path in markdown or [p for p in files if p.suffix == ".json"]:
            if path.suffix == ".md":
                parts.append(path.read_text())
                continue
            data = json.loads(path.read_text())
            parts.append(f"## {path.name}\n")
            parts.append(markdown_table(_flatten(data)) if isinstance(data, dict)
                         else f"```json\n{json.dumps(data, indent=1)[:20000]}\n```\n")
    return "\n".join(parts)


def _flatten(data: Mapping, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, tuple)) else value
    return flat


def png_img(png: bytes, alt: str) -> str:
    """An HTML ``<img>`` holding the PNG itself (a base64 data URI): the KFP UI shows HTML
    artifacts in a sandboxed iframe that loads nothing from elsewhere."""
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"/>'


def stage_overrides(dataset_uri: str, max_steps: int) -> dict[str, object]:
    """Config overrides every model stage gets: the preprocessed data and, when > 0, max_steps."""
    overrides: dict[str, object] = {
        "train_input.data_dir": f"{dataset_uri.rstrip('/')}/train",
        "eval_input.data_dir": f"{dataset_uri.rstrip('/')}/val",
    }
    if max_steps > 0:
        overrides["runconfig.max_steps"] = max_steps
    return overrides


TARGETS = ("cpu", "gpu", "cerebras")


def check_pipeline_parameters(*, config: str, source: str, target: str, num_gpus: int,
                              num_nodes: int, gpu_type: str, max_steps: int,
                              artifact_root: str) -> None:
    """Fail the first step on a bad run-form value, naming the parameter and what was expected."""
    from urllib.parse import urlparse

    from gpt2core.config import load_params
    from gpt2core.errors import ConfigError, Gpt2opsError

    if target not in TARGETS:
        raise ConfigError(f"parameter target: {target!r} is not one of {', '.join(TARGETS)}")
    if target == "gpu" and (num_gpus < 1 or not gpu_type.strip()):
        raise ConfigError(f"parameter num_gpus/gpu_type: target gpu needs num_gpus >= 1 and a "
                          f"gpu_type (got num_gpus={num_gpus}, gpu_type={gpu_type!r})")
    if num_nodes < 1 or (num_nodes > 1 and target != "gpu"):
        raise ConfigError(f"parameter num_nodes: expected 1, or more than 1 with target gpu "
                          f"(training past one node is a Kubeflow Trainer TrainJob on the GPU "
                          f"pool); got num_nodes={num_nodes} with target {target!r}")
    if max_steps < 0:
        raise ConfigError(f"parameter max_steps: expected 0 (use the config's) or a positive "
                          f"number, got {max_steps}")
    if not (artifact_root.startswith("s3://") or artifact_root.startswith("/")):
        raise ConfigError(f"parameter s3_prefix: expected s3://bucket/prefix or an absolute local "
                          f"folder, got {artifact_root!r}")
    scheme, netloc = urlparse(source).scheme, urlparse(source).netloc
    if not source.strip() or scheme not in ("", "file", "http", "https", "s3", "hf") or (
            scheme in ("http", "https", "s3") and not netloc):
        raise ConfigError(f"parameter source: {source!r} is not a corpus location (expected "
                          f"http(s)://host/path, s3://bucket/key, hf://datasets/..., file:// or a "
                          f"local path)")
    try:
        params = load_params(config)
    except Gpt2opsError as exc:
        raise ConfigError(f"parameter config: {exc}") from exc
    if num_nodes > 1:
        from gpt2core.trainjob import require_cluster_reachable

        try:
            require_cluster_reachable(config, artifact_root)
        except ConfigError as exc:
            raise ConfigError(f"parameter config/s3_prefix: {exc}") from None
    if target == "cerebras" and not params.runconfig.mgmt_address:
        raise ConfigError(f"parameter target: cerebras needs the Wafer-Scale Cluster's management "
                          f"server, runconfig.mgmt_address, in config {config!r} (not set)")


def promote_model(ctx: RunContext, *, config: str, dataset_uri: str, model_uri: str,
                  eval_loss: float) -> dict[str, object]:
    """Register the trained model and make it the `champion` only if it beats the current one on
    this run's eval set. The champion's score is the one tagged on it when it was measured on the
    same eval set (same dataset hash); otherwise the champion is evaluated on this eval set now."""
    import dataclasses
    import tempfile

    from gpt2core.platform import tracking
    from gpt2core.stages import evaluate
    from gpt2core.platform.artifacts import local_input, manifest_digest, read_manifest

    name = tracking.default_model_name(ctx)
    dataset_hash = manifest_digest(read_manifest(dataset_uri))
    with tracking.stage_run("promote", ctx, params={"model_uri": model_uri, "model_name": name},
                            tags={tracking.TAG_DATASET_HASH: dataset_hash}) as tracked:
        version = tracking.find_model_version(name, model_uri)
        if version is None:
            with local_input(model_uri) as folder:
                version = tracked.log_model(folder, registered_model_name=name, model_uri=model_uri)
        champion = tracking.champion_version(name)
        champion_score = None
        if champion is not None and champion != version:
            champion_score = tracking.tagged_score(name, champion, dataset_hash=dataset_hash)
            if champion_score is None:
                with tempfile.TemporaryDirectory(prefix="gpt2ops-champion-") as scratch:
                    folder = tracking.download_model_version(name, champion, scratch)
                    rerun = evaluate.run(
                        config, model_uri=str(folder), overrides=stage_overrides(dataset_uri, 0),
                        ctx=dataclasses.replace(
                            ctx, pipeline_run_id=f"{ctx.pipeline_run_id}/champion-v{champion}"))
                champion_score = rerun.metrics["eval/loss"]
        # Compare at the precision scores are tagged with (6 digits), so a rerun that scores the
        # same does not look better by rounding.
        promoted = tracking.promote_if_better(name, version, score=float(f"{eval_loss:.6g}"),
                                              champion_score=champion_score,
                                              dataset_hash=dataset_hash)
        decision = {"model_name": name, "version": version, "promoted": promoted,
                    "eval/loss": eval_loss, "champion_version": champion,
                    "champion_eval/loss": champion_score}
        tracked.set_tags({tracking.TAG_PROMOTED: str(promoted), tracking.TAG_MODEL_VERSION: version})
    return decision


# Under the gpu train step's 72 h pod deadline (pipelines/gpt2_pipeline.py): the step deletes a
# TrainJob that overruns before Kubernetes stops the step itself.
TRAINJOB_TIMEOUT_S = 71 * 3600


def train_on_processes(config: str, *, ctx: RunContext, overrides: Mapping[str, object],
                       compile_cache_uri: str, target: str, nproc: int, num_nodes: int = 1,
                       poll_s: float = 10.0) -> StageResult:
    """The train stage in a fresh working folder, in this process or, for nproc > 1, on nproc
    local processes under torchrun (one per GPU: DDP / FSDP2; rank 0 tracks and publishes), or,
    for num_nodes > 1, on num_nodes x nproc processes of a Kubeflow Trainer TrainJob that this
    step creates and follows (poll_s: how often it looks).

    The folder is fresh because the stage resumes from checkpoints it finds there, and a folder
    shared between runs (runconfig.model_dir is relative to the cwd) would resume another run."""
    import subprocess
    import sys
    import tempfile

    from gpt2core.errors import TrainingError
    from gpt2core.stages import train as stage

    arguments = stage.cli_arguments(config, ctx=ctx, overrides=dict(overrides),
                                    compile_cache_uri=compile_cache_uri or None, target=target)
    if num_nodes > 1:
        from gpt2core.trainjob import require_cluster_reachable, run_train_job

        require_cluster_reachable(config, ctx.artifact_root)
        # Each pod starts in a fresh container, so runconfig.model_dir is fresh there already.
        run_train_job(arguments, pipeline_run_id=ctx.pipeline_run_id, num_nodes=num_nodes,
                      procs_per_node=nproc, gpus_per_node=nproc if target == "gpu" else 0,
                      timeout_s=TRAINJOB_TIMEOUT_S, poll_s=poll_s)
        return stage.published_result(ctx)
    with tempfile.TemporaryDirectory(prefix="gpt2ops-train-") as model_dir:
        if nproc <= 1:
            return stage.run(config, ctx=ctx, overrides=dict(overrides), model_dir=model_dir,
                             compile_cache_uri=compile_cache_uri or None, target=target)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={nproc}", "-m", "gpt2core.cli", "train",
                   "--model_dir", model_dir, *arguments]
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    print(done.stdout, end="")
    marker = done.stdout.rfind('{\n  "outputs"')  # rank 0's result, printed last
    if done.returncode != 0 or marker < 0:
        raise TrainingError(f"train on {nproc} processes (torchrun) failed with exit code "
                            f"{done.returncode}; the ranks' errors are in the log above")
    report = json.loads(done.stdout[marker:])
    return StageResult(outputs=report["outputs"], metrics=report["metrics"])
