"""The KFP components: their typed interfaces, and the KFP translation (kfp_io) they call inside the step."""

from __future__ import annotations

import base64
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
import pytest
from kfp import dsl

from components import IMAGE
from components import kfp_io
from components.compile.component import compile_model
from components.download.component import download
from components.evaluate.component import evaluate
from components.pipeline_run.component import end_run, record_results, start_run
from components.preprocess.component import preprocess
from components.promote.component import promote
from components.train.component import train
from components.validate.component import validate
from gpt2core.errors import ConfigError, TrackingError
from gpt2core.platform.results import StageResult
from gpt2core.pipeline_parameters import PipelineParameters
from gpt2core.platform import tracking
from gpt2core.platform.tracking import TAG_KIND, TAG_PIPELINE_RUN

STAGES = (download, preprocess, validate, compile_model, train, evaluate, promote)

# Output artifacts each stage shows in the KFP UI (schema titles).
EXPECTED_OUTPUTS = {
    "download": {"corpus": "system.Dataset", "metrics": "system.Metrics"},
    "preprocess": {"dataset": "system.Dataset", "metrics": "system.Metrics",
                   "stats": "system.Markdown"},
    "validate": {"report": "system.Markdown"},
    "compile-model": {"compile_cache": "system.Artifact"},
    "train": {"model": "system.Model", "checkpoints": "system.Artifact",
              "metrics": "system.Metrics", "loss_curve": "system.HTML"},
    "evaluate": {"metrics": "system.Metrics", "report": "system.Markdown"},
    "promote": {"decision": "system.Markdown"},
}


def container(component) -> dict:
    spec = component.pipeline_spec
    (executor,) = spec.deployment_spec["executors"].values()
    return executor["container"]


@pytest.mark.parametrize("component", STAGES + (start_run, record_results, end_run),
                         ids=lambda c: c.name)
def test_components_run_in_the_project_image_without_installing_anything(component):
    spec = container(component)
    assert spec["image"] == IMAGE
    assert "pip install" not in " ".join(spec["command"])  # the image already has kfp + gpt2ops
    assert component.description and len(component.description) > 40


@pytest.mark.parametrize("component", STAGES, ids=lambda c: c.name)
def test_stage_components_take_run_ids_and_emit_typed_artifacts(component):
    inputs = component.component_spec.inputs
    assert {"pipeline_run_id", "artifact_root", "experiment"} <= set(inputs)
    assert "parent_run_id" not in inputs  # found by tag at run time, so the cache key stays stable
    outputs = {name: spec.type for name, spec in component.component_spec.outputs.items()}
    for name, schema in EXPECTED_OUTPUTS[component.name].items():
        assert outputs[name].startswith(schema), (name, outputs[name])
    string_outputs = [n for n, t in outputs.items() if t == "String"]
    assert string_outputs and all(n.endswith(("_uri", "_json", "_version")) for n in string_outputs)


GOOD = dict(params="gpt2_tiny", source="https://example.org/corpus.tar.gz", target="cpu",
            num_gpus=1, num_nodes=1, gpu_type="H100", max_steps=0,
            artifact_root="s3://bucket/runs")
LOCAL_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "gpt2_tiny.yaml")


def check_form(**values) -> PipelineParameters:
    return PipelineParameters(**values).check()


@pytest.mark.parametrize("change, parameter", [
    ({"params": "gpt2_huge"}, "parameter params"),
    ({"params": "/nonexistent/config.yaml"}, "parameter params"),
    ({"source": "ftp://example.org/x.txt"}, "parameter source"),
    ({"source": "https:///no-host"}, "parameter source"),
    ({"source": ""}, "parameter source"),
    ({"target": "tpu"}, "parameter target"),
    ({"target": "gpu", "num_gpus": 0}, "parameter num_gpus"),
    ({"target": "gpu", "gpu_type": " "}, "gpu_type"),
    ({"target": "cerebras"}, "parameter target: cerebras needs .*runconfig.mgmt_address"),
    ({"max_steps": -1}, "parameter max_steps"),
    ({"num_nodes": 0}, "parameter num_nodes"),
    ({"num_nodes": 2}, "parameter num_nodes: .*target gpu"),
    ({"target": "gpu", "num_nodes": 2, "params": LOCAL_CONFIG},
     "parameter params/artifact_root: .*cannot read a file of this machine"),
    ({"artifact_root": "bucket/runs"}, "parameter artifact_root"),
])
def test_bad_run_form_values_name_the_parameter(change, parameter):
    with pytest.raises(ConfigError, match=parameter):
        check_form(**{**GOOD, **change})


def test_good_run_form_values_pass():
    check_form(**GOOD)
    check_form(**{**GOOD, "target": "gpu", "num_gpus": 8, "source": "hf://datasets/org/name", "max_steps": 10})
    check_form(**{**GOOD, "target": "gpu", "num_gpus": 8, "num_nodes": 4})


def test_parent_run_is_found_by_its_pipeline_run_tag():
    mlflow.set_experiment("components-test")
    with mlflow.start_run(tags={TAG_PIPELINE_RUN: "kfp-123", TAG_KIND: "pipeline"}) as run:
        # stage runs carry the same pipeline run id; only the parent is a "pipeline" run
        with mlflow.start_run(nested=True, tags={TAG_PIPELINE_RUN: "kfp-123", TAG_KIND: "stage"}):
            pass
    assert tracking.find_parent_run("kfp-123", "components-test") == run.info.run_id
    ctx = kfp_io.stage_context("kfp-123", "s3://b/p", "components-test")
    assert ctx.parent_run_id == run.info.run_id
    assert ctx.artifact_uri("train", "model") == "s3://b/p/kfp-123/train/model"
    with pytest.raises(TrackingError, match="kfp-999"):
        tracking.find_parent_run("kfp-999", "components-test")


def test_loss_curve_html_embeds_the_runs_loss_png():
    mlflow.set_experiment("components-history")
    with mlflow.start_run() as run:
        for step, loss in enumerate([9.0, 7.5, 6.0]):
            mlflow.log_metric("train/loss", loss, step=step * 10)
    page = kfp_io.loss_curve_html(StageResult(outputs={"model": "s3://b/m"}, mlflow_run_id=run.info.run_id))
    png = base64.b64decode(page.split("data:image/png;base64,")[1].split('"')[0])
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 2000
    assert png == tracking.loss_curve_png(run.info.run_id)  # the same picture MLflow gets
    with mlflow.start_run() as empty:
        pass
    assert "no logged loss values" in kfp_io.loss_curve_html(
        StageResult(outputs={"model": "s3://b/m"}, mlflow_run_id=empty.info.run_id))


def test_the_stage_child_run_and_its_metric_history_are_found():
    mlflow.set_experiment("components-history")
    with mlflow.start_run() as parent:
        with mlflow.start_run(run_name="train", nested=True) as child:
            for step, loss in enumerate([9.0, 7.5, 6.0]):
                mlflow.log_metric("train/loss", loss, step=step * 10)
    run_id = tracking.stage_run_id(parent.info.run_id, "train")
    assert run_id == child.info.run_id
    assert tracking.metric_histories(run_id, ["train/loss", "eval/loss"]) == {
        "train/loss": ([0, 10, 20], [9.0, 7.5, 6.0])}
    assert tracking.stage_run_id(parent.info.run_id, "evaluate") is None


def test_publish_points_kfp_artifacts_at_the_stage_outputs(tmp_path):
    dataset = dsl.Dataset(name="dataset", uri=str(tmp_path / "kfp" / "dataset"))
    metrics = dsl.Metrics(name="metrics", uri=str(tmp_path / "kfp" / "metrics"))
    result = StageResult(outputs={"dataset": "s3://b/run/preprocess/dataset"},
                         metrics={"data/n_examples": 120, "data/bad": float("nan")})
    kfp_io.publish(result, {"dataset": dataset}, metrics)
    assert dataset.metadata["uri"] == "s3://b/run/preprocess/dataset"
    assert json.loads((tmp_path / "kfp" / "dataset").read_text()) == {
        "uri": "s3://b/run/preprocess/dataset"}
    assert metrics.metadata == {"data/n_examples": 120.0}  # non-finite values are left out
    # Every output artifact has a file: kfp.local's cache counts a missing one as a miss.
    assert json.loads((tmp_path / "kfp" / "metrics").read_text()) == {"data/n_examples": 120.0}


def test_report_markdown_prefers_the_markdown_files_else_renders_the_json(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"memory": {"peak_gb": 1.5}, "ok": True}))
    text = kfp_io.report_markdown(str(tmp_path), "Validation report")
    assert text.startswith("# Validation report")
    assert "| memory.peak_gb | 1.5 |" in text and "| ok | True |" in text
    (tmp_path / "summary.md").write_text("all checks passed\n")
    text = kfp_io.report_markdown(str(tmp_path), "Validation report")
    assert "all checks passed" in text and "peak_gb" not in text


def test_the_loss_curve_html_embeds_the_png_itself():
    png = tracking.curves_png({"train/loss": ([0, 10, 20], [10.8, 8.0, 6.5])}, title="loss <train>")
    assert png.startswith(b"\x89PNG")
    img = kfp_io.png_img(png, "loss <train>")
    element = ET.fromstring(img)  # well-formed
    assert element.tag == "img" and element.get("alt") == "loss <train>"
    assert "loss &lt;train&gt;" in img
    scheme, _, data = element.get("src").partition(",")
    assert scheme == "data:image/png;base64" and base64.b64decode(data) == png


def test_a_dataset_request_points_at_its_splits():
    from gpt2core.stages import train

    request = train.Request(params="gpt2_tiny", dataset="s3://b/r/preprocess/dataset/", max_steps=25)
    assert request.config_overrides() == {"train_input.data_dir": "s3://b/r/preprocess/dataset/train",
                                          "eval_input.data_dir": "s3://b/r/preprocess/dataset/val",
                                          "runconfig.max_steps": 25}
    explicit = train.Request(params="gpt2_tiny", dataset="s3://b/d", overrides={"eval_input.data_dir": "/v"})
    assert explicit.config_overrides()["eval_input.data_dir"] == "/v"  # --set wins over --dataset


@pytest.mark.slow
def test_train_runs_on_several_processes_under_torchrun(tiny_dataset, tmp_path):
    """The gpu branch trains with one process per GPU; the same launcher runs here on 2 CPU
    processes (gloo), and rank 0's published model and metrics come back."""
    mlflow.set_experiment("components-torchrun")
    with mlflow.start_run(tags={TAG_PIPELINE_RUN: "kfp-ddp", TAG_KIND: "pipeline"}) as parent:
        pass
    from gpt2core.launch import launch
    from gpt2core.stages import train

    ctx = kfp_io.stage_context("kfp-ddp", str(tmp_path / "artifacts"), "components-torchrun")
    assert ctx.parent_run_id == parent.info.run_id
    result = launch("train", ctx, train.Request(params="gpt2_tiny", dataset=str(tiny_dataset), max_steps=2,
                                                model_dir=str(tmp_path / "work")), nproc_per_node=2)
    assert result.outputs["model"] == ctx.artifact_uri("train", "model")
    assert (tmp_path / "artifacts" / "kfp-ddp" / "train" / "model" / "MANIFEST.json").exists()
    assert 0 < result.metrics["train/loss"] < 12
    (child,) = MlflowClient().search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert child.info.run_name == "train" and child.info.status == "FINISHED"
