"""The compile stage: real torch.compile of the trainer's step on CPU, caches through real S3."""

from __future__ import annotations

import json
import uuid

import pytest
from mlflow.tracking import MlflowClient

from gpt2core.platform import artifacts as storage
from gpt2core.compilation import CACHE_FILE, REPORT_FILE, load_compile_cache
from gpt2core.errors import ConfigError, TrainingError
from gpt2core.stages import compile as compile_stage
from gpt2core.stages import run_stage
from gpt2core.stages.inputs import vouched_input
from gpt2core.platform.context import RunContext

# The smallest graph that is still the real training step: compiling is most of this test's time.
SMALL = {"model.num_hidden_layers": 1, "train_input.max_sequence_length": 32,
         "eval_input.max_sequence_length": 32, "train_input.batch_size": 1}


@pytest.fixture
def ctx(s3_root) -> RunContext:
    return RunContext(pipeline_run_id="run-" + uuid.uuid4().hex[:8], artifact_root=s3_root, experiment="compile-tests")


@pytest.mark.slow
def test_compiles_cold_then_warm_and_the_train_stage_can_load_the_caches(ctx, tmp_path, monkeypatch):
    result = run_stage("compile", ctx, compile_stage.Request(params="gpt2_tiny", overrides={**SMALL, "runconfig.torch_compile": True}))
    uri = result.outputs["compile_cache"]
    assert uri == ctx.artifact_uri("compile", "compile_cache")
    report = json.loads(storage.read_text(f"{uri}/{REPORT_FILE}"))
    assert report["compiled"] and report["device"] == "cpu"
    assert report["cache_entries"].get("inductor", 0) >= 1  # forward + backward graphs
    assert report["cold_s"] > 0 and report["warm_s"] > 0
    assert result.metrics["compile/cold_s"] == report["cold_s"]
    assert result.metrics["compile/warm_s"] == report["warm_s"]
    assert storage.read_manifest(uri)["files"][-1]["path"] == CACHE_FILE  # sorted: report, then cache
    run = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("compile-tests").experiment_id],
                                     filter_string=f"tags.`gpt2ops.pipeline_run_id` = '{ctx.pipeline_run_id}'")[0]
    assert run.data.metrics["compile/cold_s"] == report["cold_s"]
    # what the train stage does before compiling: hot-load the caches into this process
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    with vouched_input(uri, "compile_cache") as caches:
        loaded = load_compile_cache(caches, uri)
    assert loaded == report["cache_entries"]


def test_an_eager_config_publishes_a_report_only(ctx):
    result = run_stage("compile", ctx, compile_stage.Request(params="gpt2_tiny", overrides=SMALL))  # runconfig.torch_compile: false
    uri = result.outputs["compile_cache"]
    report = json.loads(storage.read_text(f"{uri}/{REPORT_FILE}"))
    assert report == {"compiled": False, "reason": "runconfig.torch_compile is false: training runs eagerly"}
    assert result.metrics == {}
    with vouched_input(uri, "compile_cache") as caches:
        assert load_compile_cache(caches, uri) == {}


def test_bad_target_and_missing_gpu_fail_clearly(ctx):
    with pytest.raises(ConfigError, match=r"target='tpu': Input should be 'cpu', 'gpu' or 'cerebras'"):
        compile_stage.Request(params="gpt2_tiny", target="tpu")
    with pytest.raises(TrainingError, match="no CUDA device"):
        run_stage("compile", ctx, compile_stage.Request(params="gpt2_tiny", overrides={**SMALL, "runconfig.torch_compile": True}, target="gpu"))
    assert not storage.artifact_exists(ctx.artifact_uri("compile", "compile_cache"))
