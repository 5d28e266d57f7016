"""The validate stage on real data in the real S3 server, tracked in MLflow."""

from __future__ import annotations

import json
import uuid

import pytest
from mlflow.tracking import MlflowClient

from gpt2core.platform import artifacts as storage, tracking
from gpt2core.config import load_params
from gpt2core.errors import ValidationError
from gpt2core.stages import run_stage, validate
from gpt2core.platform.context import RunContext
from gpt2core.validation import estimate_memory, model_facts


@pytest.fixture(scope="module")
def s3_dataset(tiny_dataset, s3_server) -> str:
    uri = f"s3://{s3_server.bucket}/validate-tests/{uuid.uuid4().hex[:8]}/preprocess/dataset"
    storage.upload_dir(tiny_dataset, uri)
    return uri


@pytest.fixture
def ctx(s3_root) -> RunContext:
    return RunContext(pipeline_run_id="run-" + uuid.uuid4().hex[:8], artifact_root=s3_root, experiment="validate-tests")


def _data(uri: str) -> dict:
    return {"train_input.data_dir": f"{uri}/train", "eval_input.data_dir": f"{uri}/val"}


def _stage_run(ctx: RunContext):
    runs = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name(ctx.experiment).experiment_id],
        filter_string=f"tags.`{tracking.TAG_PIPELINE_RUN}` = '{ctx.pipeline_run_id}'")
    assert len(runs) == 1
    return runs[0]


def test_a_sound_job_passes_with_facts_in_report_and_mlflow(ctx, s3_dataset):
    result = run_stage("validate", ctx, validate.Request(params="gpt2_tiny", overrides=_data(s3_dataset), target="cpu"))
    report = json.loads(storage.read_text(f"{result.outputs['report']}/report.json"))
    assert report["ok"] and report["problems"] == []
    facts = model_facts(load_params("gpt2_tiny"))
    assert report["model"]["num_params"] == facts.num_params == result.metrics["validate/num_params"]
    assert result.metrics["validate/flops_per_token"] == facts.flops_per_token
    assert report["datasets"]["eval_input.data_dir"]["num_sequences"] > 0
    assert result.metrics["validate/memory_gb"] > 0
    assert "# Validation report (cpu)" in storage.read_text(f"{result.outputs['report']}/report.md")
    run = _stage_run(ctx)
    assert run.info.status == "FINISHED" and run.data.tags[tracking.TAG_STAGE] == "validate"
    assert run.data.tags[tracking.TAG_DATASET_HASH]
    assert run.data.tags[tracking.TAG_CONFIG_HASH] == load_params("gpt2_tiny", _data(s3_dataset)).config_hash()
    assert run.data.metrics["validate/num_params"] == facts.num_params
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "report")}
    assert artifacts == {"report/report.json", "report/report.md"}


def test_every_problem_is_reported_at_once_and_the_stage_fails(ctx, s3_dataset):
    overrides = {**_data(s3_dataset), "eval_input.data_dir": f"{s3_dataset}/no_such_split",
                 "train_input.max_sequence_length": 1024, "model.max_position_embeddings": 1024,
                 "train_input.batch_size": 512, "model.hidden_size": 1024, "model.num_heads": 16,
                 "model.num_hidden_layers": 24, "model.filter_size": 4096}
    with pytest.raises(ValidationError) as err:
        run_stage("validate", ctx, validate.Request(params="gpt2_tiny", overrides=overrides, target="gpu", num_gpus=3, gpu_type="H100"))
    message = str(err.value)
    assert "problem(s) (report: " in message
    report = json.loads(storage.read_text(f"{ctx.artifact_uri('validate', 'report')}/report.json"))
    problems = "\n".join(report["problems"])
    assert not report["ok"] and len(report["problems"]) >= 4
    assert "eval_input.data_dir" in problems and "no folder no_such_split" in problems  # missing split
    assert "train_input.data_dir" in problems and "1024" in problems  # data was made at 128
    assert "not divisible by 3 device(s)" in problems
    assert "memory: about" in problems and "H100" in problems
    assert all(p in message for p in report["problems"])
    assert _stage_run(ctx).info.status == "FAILED"


def test_a_broken_config_and_an_unknown_gpu_still_give_a_report(ctx):
    with pytest.raises(ValidationError, match=r"gpu_type: 'Z9000' is unknown"):
        run_stage("validate", ctx, validate.Request(
            params="gpt2_tiny", overrides={"train_input.data_dir": "/nonexistent/train",
                                           "eval_input.data_dir": "/nonexistent/val"},
            target="gpu", gpu_type="Z9000"))
    with pytest.raises(ValidationError, match=r"config gpt2_tiny: .*model.num_heads"):
        run_stage("validate", ctx, validate.Request(params="gpt2_tiny", overrides={"model.num_heads": "many"}))
    report = json.loads(storage.read_text(f"{ctx.artifact_uri('validate', 'report')}/report.json"))
    assert not report["ok"] and report["model"] == {}


def test_memory_estimate_of_gpt2_small_matches_the_known_footprint():
    params = load_params("gpt2_small", {"model.mixed_precision": True})
    n = model_facts(params).num_params
    assert 124e6 < n < 125e6  # GPT-2 small, tied head
    one = estimate_memory(params, n, target="gpu", num_devices=1, device_gb=80)
    assert one.weights_gb + one.grads_gb + one.optimizer_gb == pytest.approx(16 * n / 1e9)
    sharded = estimate_memory(load_params("gpt2_small", {"model.mixed_precision": True, "runconfig.parallelism": "fsdp"}),
                              n, target="gpu", num_devices=8, device_gb=80)
    assert sharded.optimizer_gb == pytest.approx(one.optimizer_gb / 8)
    checkpointed = estimate_memory(load_params("gpt2_small", {"runconfig.activation_checkpointing": True,
                                                              "model.mixed_precision": True}),
                                   n, target="gpu", num_devices=1, device_gb=80)
    logits_gb = 2 * one.micro_batch_size * 1024 * 50257 * 4 / 1e9  # kept either way
    assert checkpointed.activations_gb - logits_gb < (one.activations_gb - logits_gb) / 3
    assert not one.fits  # 112 sequences of 1024 tokens in one micro-batch: the logits alone are 46 GB


def test_cli_prints_every_problem_on_one_error_and_exits_2(tmp_path, capsys):
    from gpt2core.cli import main as cli

    code = cli(["validate", "--params", "gpt2_tiny", "--target", "gpu", "--gpu_type", "H100", "--num_gpus", "3",
                "--set", f"train_input.data_dir={tmp_path}/missing/train",
                "--set", f"eval_input.data_dir={tmp_path}/missing/val", "--artifact_root", str(tmp_path / "art"),
                "--pipeline_run_id", "cli1", "--experiment", "validate-cli"])
    err = capsys.readouterr().err
    assert code == 2 and "gpt2ops validate: error: 3 problem(s)" in err
    assert "not divisible by 3 device(s)" in err and f"{tmp_path}/missing/val" in err
    assert (tmp_path / "art" / "cli1" / "validate" / "report" / "report.md").is_file()


def test_keys_with_no_effect_on_the_target_are_listed_once_in_log_and_report(ctx, s3_dataset, caplog):
    overrides = {**_data(s3_dataset), "model.allow_multireplica": False, "model.precision_opt_level": 1}
    with caplog.at_level("INFO", logger="gpt2core.stages.request"):
        result = run_stage("validate", ctx, validate.Request(params="gpt2_tiny", overrides=overrides, target="gpu",
                                                             gpu_type="H100"))
    report = json.loads(storage.read_text(f"{result.outputs['report']}/report.json"))
    expected = ["model.precision_opt_level: accepted, no effect on target gpu (numerics level of the wafer)",
                "model.allow_multireplica: accepted, no effect on target gpu (pipeline-mode replicas of the 1.x "
                "appliance (gone in 2.0))"]
    # (gpt2_tiny also names a data_processor, which the torch targets do not need either)
    assert report["ok"] and [n for n in report["notes"] if n.startswith("model.") and "accepted" in n] == expected
    assert all(f"- {line}" in storage.read_text(f"{result.outputs['report']}/report.md") for line in expected)
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("gpt2_tiny: model.")]
    assert logged == [f"gpt2_tiny: {line}" for line in expected]
