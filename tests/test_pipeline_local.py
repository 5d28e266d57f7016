"""The whole pipeline through kfp.local with the real S3 server (SeaweedFS) and MLflow (sqlite):
a fresh run, a rerun served from the cache, and a run whose stage fails.

Small on purpose: three plays as the corpus, gpt2_tiny, a few training steps (about 4-6 minutes on
2 busy cores, most of it per-step process start-up).
"""

from __future__ import annotations

import time

import pytest
from mlflow.tracking import MlflowClient

from gpt2core.cli import main
from gpt2core.platform.artifacts import artifact_exists, read_manifest
from gpt2core.platform.artifacts.s3 import s3_client
from gpt2core.platform.artifacts.uris import split_s3_uri

pytestmark = pytest.mark.slow

STAGES = ("download", "preprocess", "validate", "compile", "train", "evaluate", "promote")
def run_pipeline(work_dir, plays, s3_root, run_name, max_steps=6, experiment="pipeline-e2e"):
    started = time.monotonic()
    code = main(["run", "--work_dir", str(work_dir), "--params", "gpt2_tiny", "--source", str(plays),
                 "--include", "", "--sha256", "", "--max_steps", str(max_steps),
                 "--artifact_root", s3_root, "--experiment", experiment, "--run_name", run_name])
    return code, time.monotonic() - started


def parent_run(run_name, experiment="pipeline-e2e"):
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id], f"tags.`mlflow.runName` = '{run_name}'")
    children = client.search_runs([exp.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    return run, children


def test_pipeline_runs_end_to_end_then_from_cache_then_fails_cleanly(
        plays, s3_server, s3_root, tmp_path, capsys):
    work_dir = tmp_path / "work"

    # 1. A fresh run: every stage writes its artifact to S3 and logs a child run.
    code, fresh_s = run_pipeline(work_dir, plays, s3_root, "fresh")
    out = capsys.readouterr().out
    assert code == 0, out
    parent, children = parent_run("fresh")
    assert parent.info.status == "FINISHED"
    artifacts = {k.removeprefix("artifact."): v for k, v in parent.data.tags.items()
                 if k.startswith("artifact.")}
    assert set(artifacts) == {"download/corpus", "preprocess/dataset", "validate/report",
                              "compile/compile_cache", "train/model", "train/checkpoints",
                              "evaluate/report"}
    for name, uri in artifacts.items():
        assert uri.startswith(s3_root) and uri.endswith(name), (name, uri)
        assert artifact_exists(uri), uri  # published, manifest last
        assert read_manifest(uri)["files"], uri
    assert len(children) == len(STAGES)
    assert all(c.info.status == "FINISHED" for c in children)
    child_metrics = {k for c in children for k in c.data.metrics}
    assert {"train/loss", "eval/loss", "eval/lm_perplexity", "eval/accuracy"} <= child_metrics
    eval_metrics = parent.data.metrics
    assert 1.0 < eval_metrics["eval/lm_perplexity"] < 60000
    assert 0.0 <= eval_metrics["eval/accuracy"] <= 1.0
    assert parent.data.tags["gpt2ops.promoted"] == "True"  # the first model is the champion
    for shown in ("pipeline run: FINISHED", parent.info.run_id, artifacts["train/model"],
                  "eval/lm_perplexity", "sample:", "promoted to champion", "mlflow ui"):
        assert shown in out, shown

    # 2. The same parameters again: every stage is served from the cache, a new parent run still
    #    records the (earlier) artifacts and metrics.
    code, cached_s = run_pipeline(work_dir, plays, s3_root, "cached")
    assert code == 0
    again, again_children = parent_run("cached")
    assert again.info.status == "FINISHED" and again.info.run_id != parent.info.run_id
    # no stage ran; promote (never cached) found the same model already registered and champion
    assert [c.info.run_name for c in again_children] == ["promote"]
    assert again.data.tags["gpt2ops.model_version"] == parent.data.tags["gpt2ops.model_version"]
    assert {k: v for k, v in again.data.tags.items() if k.startswith("artifact.")} == {
        f"artifact.{k}": v for k, v in artifacts.items()}
    assert again.data.metrics["eval/loss"] == pytest.approx(eval_metrics["eval/loss"])
    assert cached_s < fresh_s

    # 3. The dataset loses its manifest; a run with other training settings reuses download and
    #    preprocess from the cache, and validate (rerun: its inputs changed) fails reading it.
    bucket, key = split_s3_uri(artifacts["preprocess/dataset"])
    s3_client().delete_object(Bucket=bucket, Key=f"{key}/MANIFEST.json")
    code, _ = run_pipeline(work_dir, plays, s3_root, "broken", max_steps=7)
    assert code == 1
    failed, failed_children = parent_run("broken")
    assert failed.info.status == "FAILED"
    assert "gpt2ops.error" in failed.data.tags
    assert [c.info.run_name for c in failed_children if c.info.status == "FINISHED"] == []
    assert artifact_exists(artifacts["download/corpus"])  # earlier artifacts stay
    assert parent_run("fresh")[0].info.status == "FINISHED"
