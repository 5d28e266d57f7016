"""MLflow tracking against a real store (sqlite) with artifacts in the real S3 server (SeaweedFS)."""

from __future__ import annotations

import uuid

import pytest
from mlflow.tracking import MlflowClient

from gpt2core.errors import TrackingError
from gpt2core.platform import artifacts as storage, tracking
from gpt2core.platform.artifacts.s3 import list_keys
from gpt2core.platform.artifacts.uris import split_s3_uri
from gpt2core.platform.settings import reload_settings
from gpt2core.platform.context import RunContext


@pytest.fixture
def ctx(s3_root) -> RunContext:
    return RunContext(pipeline_run_id="run-" + uuid.uuid4().hex[:8], artifact_root=s3_root,
                      experiment="exp-" + uuid.uuid4().hex[:8])


def test_parent_and_stage_runs_with_tags_params_metrics_and_s3_artifacts(ctx, tmp_path):
    with tracking.pipeline_run(ctx, params={"config": "gpt2_tiny"}) as child_ctx:
        with tracking.stage_run("train", child_ctx, params={"model.hidden_size": 64, "optimizer.betas": (0.9, 0.95),
                                                              "aws_secret_access_key": "hunter2",
                                                              "runconfig.credentials_path": "/certs/ca.crt"},
                                tags={tracking.TAG_CONFIG_HASH: "c0ffee", tracking.TAG_DATASET_HASH: "d474"}) as run:
            for step, loss in enumerate([4.0, 3.0, 2.5], start=1):
                run.log_metrics({"train/loss": loss, "train/lr": 1e-3}, step=step)
            run.log_metrics({"eval/loss": 2.7}, step=3)
            (tmp_path / "report.md").write_text("# ok\n")
            run.log_artifact(tmp_path / "report.md", "reports")
            run.log_loss_curve()
            stage_run_id = run.run_id
    client = MlflowClient()
    child = client.get_run(stage_run_id)
    parent = client.get_run(child_ctx.parent_run_id)
    assert child.info.status == "FINISHED" and parent.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.tags[tracking.TAG_STAGE] == "train"
    assert child.data.tags[tracking.TAG_PIPELINE_RUN] == parent.data.tags[tracking.TAG_PIPELINE_RUN] == ctx.pipeline_run_id
    assert child.data.tags[tracking.TAG_CONFIG_HASH] == "c0ffee" and child.data.tags[tracking.TAG_DATASET_HASH] == "d474"
    assert len(child.data.tags[tracking.TAG_GIT_SHA]) >= 7
    # no credential; where one is kept (a certificate's path) is no secret
    assert child.data.params == {"model.hidden_size": "64", "optimizer.betas": "(0.9, 0.95)",
                                 "runconfig.credentials_path": "/certs/ca.crt"}
    assert [m.value for m in client.get_metric_history(stage_run_id, "train/loss")] == [4.0, 3.0, 2.5]
    assert parent.data.params == {"config": "gpt2_tiny"}
    # MLflow's artifacts live in the same S3 as the stages' artifacts
    assert child.info.artifact_uri.startswith(f"{ctx.artifact_root}/mlflow/")
    bucket, prefix = split_s3_uri(child.info.artifact_uri)
    keys = list_keys(bucket, prefix)
    assert f"{prefix}/reports/report.md" in keys
    png = storage.read_bytes(f"{child.info.artifact_uri}/{tracking.LOSS_CURVE_FILE}")
    assert png.startswith(b"\x89PNG")
    # the KFP train step finds the stage's run under the parent and shows the very same PNG
    assert tracking.stage_run_id(parent.info.run_id, "train") == stage_run_id
    assert tracking.loss_curve_png(stage_run_id) == png


def test_the_experiment_opens_on_training_runs_which_show_their_datasets(ctx, tmp_path):
    # a dataset artifact (split folders in one artifact) and a plain folder made elsewhere
    (tmp_path / "dataset" / "train").mkdir(parents=True)
    (tmp_path / "dataset" / "train" / "data-00000.h5").write_bytes(b"rows")
    dataset_uri = f"{ctx.artifact_root}/{ctx.pipeline_run_id}/preprocess/dataset"
    manifest = storage.upload_dir(tmp_path / "dataset", dataset_uri)
    (tmp_path / "elsewhere" / "val").mkdir(parents=True)
    with tracking.stage_run("train", ctx) as run:
        run.log_datasets([
            tracking.DatasetUse(f"{dataset_uri}/train", tracking.DATASET_TRAINING, {"num_sequences": 3}),
            tracking.DatasetUse(str(tmp_path / "elsewhere" / "val"), tracking.DATASET_EVALUATION)])
    client = MlflowClient()
    assert client.get_experiment_by_name(ctx.experiment).tags["mlflow.experimentKind"] == "custom_model_development"
    logged = {(d.dataset.name, d.dataset.digest, d.dataset.source_type, d.dataset.source, d.dataset.profile,
               tuple((t.key, t.value) for t in d.tags)) for d in client.get_run(run.run_id).inputs.dataset_inputs}
    assert logged == {
        ("dataset/train", storage.manifest_digest(manifest)[:12], "s3", f'{{"uri": "{dataset_uri}/train"}}',
         '{"num_sequences": 3}', (("mlflow.data.context", "training"),)),
        ("elsewhere/val", "unversioned", "local", f'{{"uri": "{tmp_path}/elsewhere/val"}}', None,
         (("mlflow.data.context", "evaluation"),))}
    # an experiment made before gpt2ops marked its experiments is marked when next used, and a mark
    # a person chose is kept
    for kind in (None, "genai_development"):
        older = RunContext(pipeline_run_id=ctx.pipeline_run_id, artifact_root=ctx.artifact_root,
                           experiment=f"{ctx.experiment}-{kind}")
        experiment_id = client.create_experiment(older.experiment,
                                                 tags={"mlflow.experimentKind": kind} if kind else None)
        with tracking.stage_run("download", older):
            pass
        assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == (kind or "custom_model_development")


def test_failed_stage_marks_its_run_failed_and_the_parent_too(ctx):
    with pytest.raises(ValueError, match="bad batch"):
        with tracking.pipeline_run(ctx) as child_ctx:
            with tracking.stage_run("validate", child_ctx) as run:
                raise ValueError("bad batch")
    client = MlflowClient()
    child = client.get_run(run.run_id)
    assert child.info.status == "FAILED"
    assert child.data.tags[tracking.TAG_ERROR] == "ValueError: bad batch"
    assert client.get_run(child_ctx.parent_run_id).info.status == "FAILED"


def test_a_stage_run_inside_another_nests_under_it(ctx):
    with tracking.pipeline_run(ctx) as child_ctx:
        with tracking.stage_run("promote", child_ctx) as outer:
            with tracking.stage_run("evaluate", child_ctx) as inner:
                pass
    client = MlflowClient()
    assert client.get_run(inner.run_id).data.tags["mlflow.parentRunId"] == outer.run_id
    assert client.get_run(outer.run_id).data.tags["mlflow.parentRunId"] == child_ctx.parent_run_id
    assert client.get_run(inner.run_id).info.status == client.get_run(outer.run_id).info.status == "FINISHED"


def test_end_pipeline_run_by_id_as_the_exit_handler_does(ctx):
    run_id = tracking.start_pipeline_run(ctx, params={"target": "cpu"})
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"
    tracking.end_pipeline_run(run_id, "FAILED")
    assert MlflowClient().get_run(run_id).info.status == "FAILED"
    with pytest.raises(TrackingError, match="'DONE' is not FINISHED"):
        tracking.end_pipeline_run(run_id, "DONE")


def test_unreachable_tracking_server_names_the_uri(ctx, monkeypatch):
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://mlflow-user:p4ssw0rd@127.0.0.1:{port}")
    reload_settings()
    with pytest.raises(TrackingError) as err:
        with tracking.stage_run("train", ctx):
            pass
    message = str(err.value)
    assert f"http://127.0.0.1:{port}" in message and "unreachable" in message
    assert "p4ssw0rd" not in message


def test_unwritable_sqlite_store_names_the_uri(ctx, monkeypatch, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    uri = f"sqlite:///{tmp_path}/a_file/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    reload_settings()
    with pytest.raises(TrackingError, match=f"MLflow at {uri}: could not"):
        tracking.start_pipeline_run(ctx)


def test_model_registered_and_champion_moves_only_when_better(ctx, tmp_path):
    import mlflow
    import torch

    from gpt2core.config import load_params
    from gpt2core.hf_checkpoint import WEIGHTS_FILE, load_pretrained, save_pretrained
    from gpt2core.model import GPT2

    params = load_params("gpt2_tiny", {"runconfig.sample_max_new_tokens": 4})
    torch.manual_seed(0)
    save_pretrained(GPT2(params.model), params, tmp_path / "model")
    name = tracking.default_model_name(ctx)
    versions, runs = [], []
    for i in range(2):
        with tracking.stage_run("train", ctx) as run:
            versions.append(run.log_model(tmp_path / "model", model_uri=f"{ctx.artifact_root}/m{i}"))
        runs.append(run.run_id)
    v1, v2 = versions
    assert tracking.find_model_version(name, f"{ctx.artifact_root}/m1") == v2
    # a stage that uses a registered model records it as its run's input; an unregistered one: nothing
    with tracking.stage_run("evaluate", ctx) as evaluation:
        evaluation.log_model_input(f"{ctx.artifact_root}/m0")
        evaluation.log_model_input(f"{ctx.artifact_root}/elsewhere")
    (logged,) = MlflowClient().get_run(runs[0]).outputs.model_outputs  # what the first train run logged
    assert [m.model_id for m in MlflowClient().get_run(evaluation.run_id).inputs.model_inputs] == [logged.model_id]
    assert tracking.champion_version(name) is None
    assert tracking.promote_if_better(name, v1, score=3.0, champion_score=None, dataset_hash="d1")
    assert not tracking.promote_if_better(name, v2, score=3.5, champion_score=3.0)  # worse: kept
    client = MlflowClient()
    assert tracking.champion_version(name) == v1
    assert str(client.get_model_version_by_alias(name, tracking.CHALLENGER).version) == v2
    assert tracking.promote_if_better(name, v2, score=2.9, champion_score=3.0)  # better: promoted
    assert tracking.champion_version(name) == v2
    assert client.get_model_version(name, v1).tags["eval/loss"] == "3"
    # the registered artifact is the saved model, and it serves text
    folder = tracking.download_model_version(name, v1, tmp_path / "dl")
    assert (folder / WEIGHTS_FILE).read_bytes() == (tmp_path / "model" / WEIGHTS_FILE).read_bytes()
    assert load_pretrained(folder).num_params() == GPT2(params.model).num_params()
    served = mlflow.pyfunc.load_model(f"models:/{name}@{tracking.CHAMPION}")
    texts = served.predict(["The meaning of life is"])
    assert len(texts) == 1 and isinstance(texts[0], str)


@pytest.mark.slow
def test_a_real_tracking_server_over_http_with_artifacts_in_s3(ctx, tmp_path, monkeypatch):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--default-artifact-root",
         f"{ctx.artifact_root}/server-artifacts"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # its workers in its group
    try:
        uri = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"{uri}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(1)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        reload_settings()
        with tracking.stage_run("train", ctx, params={"model.hidden_size": 64}) as run:
            run.log_metrics({"train/loss": 3.0}, step=1)
            (tmp_path / "r.md").write_text("ok")
            run.log_artifact(tmp_path / "r.md")
        remote = MlflowClient(uri).get_run(run.run_id)
        assert remote.info.status == "FINISHED" and remote.data.metrics["train/loss"] == 3.0
        assert remote.info.artifact_uri.startswith(f"{ctx.artifact_root}/mlflow/")  # the experiment's S3 root
        assert storage.read_text(f"{remote.info.artifact_uri}/r.md") == "ok"
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # the server and the workers it started
        server.wait(30)


def test_a_new_sqlite_store_is_a_copy_of_the_one_mlflow_builds(ctx, monkeypatch, tmp_path):
    import sqlite3

    import mlflow

    def schema(path) -> list:
        # Alembic's batch migrations rebuild tables with their constraints in set order, which
        # differs between processes: two stores MLflow builds itself differ in line order only.
        with sqlite3.connect(path) as db:
            objects = db.execute("SELECT type, name, sql FROM sqlite_master").fetchall()
            version = db.execute("SELECT version_num FROM alembic_version").fetchall()
        return sorted((kind, name, sorted((sql or "").replace(", \n", "\n").split("\n")))
                      for kind, name, sql in objects) + version

    monkeypatch.setenv("GPT2OPS_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("first", "second"):  # the first builds the template, the second is a copy of it
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/{name}/mlflow.db")
        reload_settings()
        run_id = tracking.start_pipeline_run(ctx)
        assert MlflowClient().get_run(run_id).info.status == "RUNNING"
    assert (tmp_path / "cache" / "mlflow" / f"empty-store-{mlflow.__version__}.db").is_file()
    MlflowClient(f"sqlite:///{tmp_path}/by_mlflow.db").search_experiments()  # MLflow's own, migrations run
    assert schema(tmp_path / "second" / "mlflow.db") == schema(tmp_path / "by_mlflow.db")
