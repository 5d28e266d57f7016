"""Crash safety: a stage killed between publishing its model and registering it leaves no registry
version pointing at a missing model; a pipeline run killed anywhere (SIGKILL of its whole process
group, at every stage boundary and inside every long stage) continues with `gpt2ops run --resume`
under its pipeline run id: finished steps reused, training from its newest uploaded checkpoint,
one MLflow parent run, no run left RUNNING, no artifact that reads as complete without being so.

The kills come from tests/kill_points (a sitecustomize every Python of the run imports): real
SIGKILLs at exact points, no mocks. Real S3 (SeaweedFS), MLflow (sqlite), kfp.local.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from gpt2core.config import load_params
from gpt2core.platform import tracking
from gpt2core.platform.artifacts import artifact_exists, download_dir, read_manifest
from gpt2core.platform.artifacts.s3 import list_keys
from gpt2core.platform.artifacts.uris import split_s3_uri
from gpt2core.platform.work_folder import WorkFolder

ROOT = Path(__file__).resolve().parents[1]
KILL_POINTS = Path(__file__).with_name("kill_points")
GPT2OPS = str(Path(sys.executable).with_name("gpt2ops"))
PLAYS = ("hamlet_gut.txt", "macbeth_gut.txt")


def gpt2ops(args: list[str], *, cwd: Path, kill_at: str | None = None, log: Path) -> int:
    """`gpt2ops ARGS` in a session of its own (its process group is what a kill point kills);
    returns its exit status (-9: killed)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(KILL_POINTS), str(ROOT)])}
    env.pop("GPT2OPS_TEST_KILL_AT", None)
    if kill_at:
        env["GPT2OPS_TEST_KILL_AT"] = kill_at
    with open(log, "w") as out:
        return subprocess.run([GPT2OPS, *args], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, start_new_session=True).returncode


@pytest.fixture(scope="module")
def small_config(tmp_path_factory) -> Path:
    """gpt2_tiny for 6 steps, a checkpoint every 2, the loss logged every step, a short evaluation."""
    path = tmp_path_factory.mktemp("config") / "tiny6.yaml"
    path.write_text(load_params("gpt2_tiny", {
        "runconfig.max_steps": 6, "runconfig.checkpoint_steps": 2, "runconfig.log_steps": 1,
        "runconfig.eval_steps": 2, "runconfig.sample_max_new_tokens": 4}).to_yaml())
    return path


@pytest.fixture(scope="module")
def plays(english_text_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("plays")
    for name in PLAYS:
        (folder / name).write_bytes((english_text_dir / name).read_bytes())
    return folder


def versions_of(model_uri: str) -> list:
    return MlflowClient().search_model_versions(f"tags.`gpt2ops.model_uri` = '{model_uri}'")


@pytest.mark.slow
def test_a_model_is_registered_only_after_it_is_published(small_config, tiny_dataset, s3_root, tmp_path):
    run_id = f"publish-{uuid.uuid4().hex[:8]}"
    args = ["train", "--params", str(small_config), "--dataset", str(tiny_dataset), "--set",
            "runconfig.eval_frequency=0", "--artifact_root", s3_root, "--pipeline_run_id", run_id,
            "--experiment", "resume-tests"]
    model_uri = f"{s3_root}/{run_id}/train/model"
    # Killed the moment the model's manifest is written, before anything else happens.
    code = gpt2ops([*args, "--model_dir", str(tmp_path / "a")], cwd=tmp_path, kill_at="published:train/model",
                   log=tmp_path / "killed.log")
    assert code == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert artifact_exists(model_uri)
    assert versions_of(model_uri) == []  # nothing in the registry points at it yet

    # The step again (a retry, on another machine: an empty working folder): it resumes from the
    # checkpoint the killed attempt uploaded, publishes, and registers one version.
    code = gpt2ops([*args, "--model_dir", str(tmp_path / "b")], cwd=tmp_path, log=tmp_path / "retry.log")
    log = (tmp_path / "retry.log").read_text()
    assert code == 0, log[-3000:]
    assert f"resuming from {s3_root}/{run_id}/train/progress/checkpoint_00000006.pt" in log
    (version,) = versions_of(model_uri)
    assert version.status == "READY"


KILLS = (
    # (where, kill point)
    ("boundary", "start:download"),
    ("inside", "uploading:download/corpus"),
    ("boundary", "start:preprocess"),
    ("inside", "uploading:preprocess/dataset"),
    ("boundary", "start:validate"),
    ("boundary", "start:compile"),
    ("boundary", "start:train"),
    ("inside", "checkpoint:2"),
    ("boundary", "start:evaluate"),
    ("inside", "uploading:evaluate/report"),
    ("boundary", "start:promote"),
    ("inside", "uploading:promote/decision"),
)


def assert_artifacts_whole(prefix: str, scratch: Path) -> int:
    """Every folder under prefix with a MANIFEST.json holds exactly the files it lists, which download
    with their checksums; returns how many there are."""
    bucket, key = split_s3_uri(prefix)
    keys = list_keys(bucket, f"{key}/")
    folders = [k.removesuffix("/MANIFEST.json") for k in keys if k.endswith("/MANIFEST.json")]
    for i, folder in enumerate(folders):
        uri = f"s3://{bucket}/{folder}"
        present = {k[len(folder) + 1:] for k in keys if k.startswith(f"{folder}/")} - {"MANIFEST.json"}
        assert present == {f["path"] for f in read_manifest(uri)["files"]}, uri
        download_dir(uri, scratch / str(i))
    return len(folders)


@pytest.mark.slow
def test_a_run_killed_anywhere_resumes_to_the_end(small_config, plays, s3_root, tmp_path):
    work = tmp_path / "work"
    experiment = f"kill-anywhere-{uuid.uuid4().hex[:6]}"
    start = ["run", "--work_dir", str(work), "--params", str(small_config), "--source", str(plays),
             "--include", "", "--sha256", "", "--artifact_root", s3_root, "--experiment", experiment,
             "--run_name", "killed-anywhere"]
    for attempt, (where, point) in enumerate(KILLS):
        args = start if attempt == 0 else ["run", "--work_dir", str(work), "--resume"]
        log = tmp_path / f"{attempt:02d}-{point.replace(':', '-').replace('/', '-')}.log"
        code = gpt2ops(args, cwd=tmp_path, kill_at=point, log=log)
        assert code == -signal.SIGKILL, f"{where} {point}: exit {code}:\n{log.read_text()[-3000:]}"
    log = tmp_path / "final.log"
    code = gpt2ops(["run", "--work_dir", str(work), "--resume"], cwd=tmp_path, log=log)
    output = log.read_text()
    assert code == 0, output[-5000:]
    assert "pipeline run: FINISHED" in output

    (record,) = WorkFolder(work).records()
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert {r.data.tags["gpt2ops.pipeline_run_id"].split("/")[0] for r in runs} == {record.run_id}
    parents = [r for r in runs if r.data.tags.get("gpt2ops.kind") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # one parent run, all along
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert killed and all("died before it ended" in r.data.tags["gpt2ops.error"] for r in killed)

    # Training resumed: the attempt that finished logged losses from step 3 on only.
    (trained,) = [r for r in runs if r.info.run_name == "train" and r.info.status == "FINISHED"]
    steps = [m.step for m in client.get_metric_history(trained.info.run_id, "train/loss")]
    assert min(steps) == 3, steps

    # Everything that reads as complete is; the run's artifacts are all there; the one registered
    # version is this run's model.
    assert assert_artifacts_whole(f"{s3_root}/{record.run_id}", tmp_path / "check") >= 7
    outcome = tracking.find_pipeline_run(record.run_id, experiment)
    assert all(artifact_exists(uri) for uri in outcome.artifacts.values()) and len(outcome.artifacts) == 7
    (version,) = versions_of(outcome.artifacts["train/model"])
    assert str(version.version) == outcome.model_version
