"""Translation between KFP and the stages, imported inside the component functions at run time.

A component turns its parameters into the stage's request, runs it through ``gpt2core.launch``, and
turns the StageResult into KFP outputs: small pointer artifacts to the stage's S3 folders (the
stage wrote them there, manifest last), Metrics, and Markdown/HTML reports for the KFP UI.

A component receives the pipeline run id (KFP's job id), the artifact root and the MLflow
experiment; the MLflow parent run that `start_run` opened is found by its pipeline-run-id tag. The
parent run id is deliberately not a component input: task caching keys on the inputs, and a new
parent run per pipeline run would make every cache lookup miss. For the same reason a local run
pins its own pipeline run id through the environment (``GPT2OPS_PIPELINE_RUN_ID``, see
``pipeline_run_id``), not through an input: `gpt2ops run --resume` continues a run under its id and
still finds its finished steps in the task cache.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from html import escape
from pathlib import Path

from gpt2core.platform.context import RunContext
from gpt2core.platform.results import StageResult


def pipeline_run_id(job_id: str) -> str:
    """The pipeline run id a step works under: the one `gpt2ops run` pinned in the environment
    (``GPT2OPS_PIPELINE_RUN_ID``: its own id, kept by ``--resume``), else KFP's job id (a cluster;
    a retried step there keeps the job id, and so its earlier attempt's checkpoints)."""
    from gpt2core.platform.settings import settings

    return settings().pipeline_run_id or job_id


def stage_context(job_id: str, artifact_root: str, experiment: str) -> RunContext:
    """The RunContext a stage runs in, with the MLflow parent run that start_run opened."""
    from gpt2core.platform import tracking

    run_id = pipeline_run_id(job_id)
    return RunContext(pipeline_run_id=run_id, artifact_root=artifact_root, experiment=experiment,
                      parent_run_id=tracking.find_parent_run(run_id, experiment))


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


def loss_curve_html(result: StageResult) -> str:
    """The train stage's loss curves as an HTML page for the KFP UI: the same PNG MLflow holds as
    ``plots/loss_curve.png``, embedded (the UI renders HTML artifacts in a sandboxed iframe)."""
    from gpt2core.platform import tracking

    png = tracking.loss_curve_png(result.mlflow_run_id) if result.mlflow_run_id else None
    chart = png_img(png, "training loss") if png else "<p>no logged loss values</p>"
    return (f"<html><body><h2>Training loss</h2>{chart}"
            f"<p>model: <code>{escape(result.outputs.get('model', ''))}</code></p></body></html>")


def png_img(png: bytes, alt: str) -> str:
    """An HTML ``<img>`` holding the PNG itself (a base64 data URI): the KFP UI shows HTML
    artifacts in a sandboxed iframe that loads nothing from elsewhere."""
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"/>'
