"""The whole pipeline through kfp.local with the real S3 server (SeaweedFS) and MLflow (sqlite):
a fresh run, a rerun served from the cache, and a run whose stage fails.

Small on purpose: three plays as the corpus, gpt2_tiny, a few training steps (about 4-6 minutes on
2 busy cores, most of it per-step process start-up).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from gpt2core.cli import main
from gpt2core.platform.artifacts import artifact_exists, read_manifest
from gpt2core.platform.artifacts.s3 import s3_client
from gpt2core.platform.artifacts.uris import split_s3_uri

pytestmark = pytest.mark.slow

STAGES = ("download", "preprocess", "validate", "compile", "train", "evaluate", "promote")
PLAYS = ("hamlet_gut.txt", "macbeth_gut.txt", "othello_gut.txt")


@pytest.fixture(scope="module")
def plays(english_text_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("plays")
    for name in PLAYS:
        shutil.copy(english_text_dir / name, folder / name)
    return folder


@dataclasses.dataclass
class FreshRun:
    work_dir: Path
    s3_root: str
    code: int
    seconds: float
    out: str  # what `gpt2ops run` printed


@pytest.fixture(scope="module")
def fresh_run(plays, s3_server, tmp_path_factory) -> FreshRun:
    """One fresh pipeline run of the plays, shared by the tests of this module."""
    work_dir = tmp_path_factory.mktemp("pipeline") / "work"
    s3_root = f"s3://{s3_server.bucket}/tests/pipeline-{uuid.uuid4().hex[:8]}"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code, seconds = run_pipeline(work_dir, plays, s3_root, "fresh")
    sys.stdout.write(printed.getvalue())
    return FreshRun(work_dir, s3_root, code, seconds, printed.getvalue())


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


def test_pipeline_runs_end_to_end_then_from_cache_then_fails_cleanly(fresh_run, plays):
    work_dir, s3_root = fresh_run.work_dir, fresh_run.s3_root

    # 1. A fresh run: every stage writes its artifact to S3 and logs a child run.
    code, fresh_s, out = fresh_run.code, fresh_run.seconds, fresh_run.out
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


# ----------------------------------------------------------------- the MLflow UI, as a person opens it

ENV_REQUIRE_BROWSER = "GPT2OPS_REQUIRE_BROWSER"  # scripts/test.sh sets it once it installed chromium
ENV_TEST_OUTPUT = "GPT2OPS_TEST_OUTPUT"  # where screenshots go (default: the test's tmp_path)
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1600,1000")


@contextlib.contextmanager
def mlflow_ui(tracking_uri: str, tmp_path: Path):
    """`mlflow ui` on the store, as the run's summary tells a person to start it; yields its URL."""
    import socket
    import subprocess
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "mlflow-ui.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):  # it takes a while to start on busy cores
            assert server.poll() is None, (tmp_path / "mlflow-ui.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5)
                break
            except OSError:
                time.sleep(1)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()


def rendered_text(url: str, screenshot: Path, profile: Path, expected: tuple[str, ...]) -> str:
    """The text headless Chromium shows at url once every expected string is on the page (MLflow's
    UI is a React app that renders what it fetches: load it again with more virtual time until it
    is there); the page's screenshot goes to ``screenshot``."""
    import html
    import subprocess

    text = ""
    for budget_s in (20, 40, 80, 120, 160):
        dom = subprocess.run(["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                              f"--virtual-time-budget={budget_s * 1000}", f"--screenshot={screenshot}",
                              "--dump-dom", url], capture_output=True, text=True, timeout=600).stdout
        visible = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
        text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", visible)))
        if all(item in text for item in expected):
            return text
    missing = [item for item in expected if item not in text]
    raise AssertionError(f"{url}: {missing} not shown (screenshot {screenshot}); the page shows: {text[:3000]}")


def test_the_mlflow_ui_shows_the_stage_runs_their_datasets_and_the_loss_chart(fresh_run, tmp_path):
    if shutil.which("chromium") is None:
        if os.environ.get(ENV_REQUIRE_BROWSER):
            pytest.fail("chromium is not installed (scripts/test.sh installs Debian's chromium as root)")
        pytest.skip("no chromium: install Debian's chromium package to check the MLflow UI in a browser")
    out = fresh_run.out
    assert fresh_run.code == 0, out
    # the summary shows the loss curve, a PNG kept in the work folder, and how to open the UI
    png = Path(re.search(r"^loss curve: (\S+)", out, re.M).group(1))
    assert png.is_relative_to(fresh_run.work_dir) and png.read_bytes().startswith(b"\x89PNG")
    tracking_uri, page = re.search(r"^MLflow UI: mlflow ui --backend-store-uri (\S+) +then open "
                                   r"http://127\.0\.0\.1:5000/(\S+)$", out, re.M).groups()
    experiment_id = re.match(r"#/experiments/(\d+)/runs\?", page).group(1)
    train_run, evaluate_run = (re.search(rf"^  {stage} +(\w+)$", out, re.M).group(1)
                               for stage in ("train", "evaluate"))
    shots = Path(os.environ.get(ENV_TEST_OUTPUT) or tmp_path) / "mlflow-ui"
    shots.mkdir(parents=True, exist_ok=True)
    print(f"MLflow UI screenshots: {shots}")

    with mlflow_ui(tracking_uri, tmp_path) as url:
        # the printed page: this run's stage runs, opened as model training (not the GenAI overview),
        # each with the datasets it read and wrote and the model: dataset -> model -> evaluation
        runs = rendered_text(f"{url}/{page}", shots / "runs.png", tmp_path / "chromium",
                             ("Model training", "download", "preprocess", "train", "evaluate", "promote",
                              "dataset/train", "training", "dataset/val", "evaluation", "pipeline-e2e-gpt2"))
        assert "No data available" not in runs  # the GenAI overview's empty charts
        # a train run's charts: train/loss among them
        rendered_text(f"{url}/#/experiments/{experiment_id}/runs/{train_run}/model-metrics?workflowType="
                      "machine_learning", shots / "train-metrics.png", tmp_path / "chromium",
                      ("train", "Model metrics", "train/loss"))
        # the evaluation's page: the data and the model it scored
        rendered_text(f"{url}/#/experiments/{experiment_id}/runs/{evaluate_run}?workflowType=machine_learning",
                      shots / "evaluate.png", tmp_path / "chromium",
                      ("evaluate", "dataset/val", "Registered models", "pipeline-e2e-gpt2", "eval/lm_perplexity"))
    for name in ("runs", "train-metrics", "evaluate"):
        assert (shots / f"{name}.png").read_bytes().startswith(b"\x89PNG")
