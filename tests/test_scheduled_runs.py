"""Scheduled retraining repeats: runs without the cache (as a schedule makes them) read the same
corpus into the same dataset, byte for byte, so the champion's score is reused; a changed corpus
makes a new eval set, on which the champion is scored again (its model downloaded from wherever
MLflow stored it) before the new model may take its place. Real S3, MLflow and kfp.local."""

from __future__ import annotations

import json
import shutil

import pytest
from mlflow.tracking import MlflowClient

from gpt2core.cli import main
from gpt2core.config import load_params
from gpt2core.data.preprocess import PreprocessParams, preprocess_corpus
from gpt2core.platform import tracking
from gpt2core.platform.artifacts import local_input, manifest_digest, read_manifest, upload_dir
from gpt2core.platform.context import RunContext

PLAYS = ("hamlet_gut.txt", "macbeth_gut.txt")
ANOTHER_PLAY = "othello_gut.txt"


def test_the_same_corpus_read_from_anywhere_makes_the_same_dataset(english_text_dir, s3_root, tmp_path):
    """data_params.json names no folder: the corpus downloaded into two scratch folders (as two runs
    do) gives the same bytes, so the same dataset hash."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in PLAYS:
        shutil.copy(english_text_dir / name, corpus / name)
    upload_dir(corpus, f"{s3_root}/corpus")
    params = PreprocessParams(max_seq_length=64, processes=1)
    digests = []
    for attempt in ("first", "second"):
        with local_input(f"{s3_root}/corpus") as scratch:  # a fresh random scratch folder each time
            out = tmp_path / attempt
            preprocess_corpus(scratch, out, params, cache_dir=tmp_path / f"tokens-{attempt}")
        upload_dir(out, f"{s3_root}/{attempt}/dataset")
        digests.append(manifest_digest(read_manifest(f"{s3_root}/{attempt}/dataset")))
        assert str(scratch) not in (out / "train" / "data_params.json").read_text()
    assert digests[0] == digests[1]


def test_a_registered_model_downloads_wherever_mlflow_stored_it(s3_root, tmp_path):
    """The logged model keeps the name of the folder it was logged from (a random staging folder in
    the train stage): the download follows the MLmodel file, not a fixed path."""
    import torch

    from gpt2core.hf_checkpoint import WEIGHTS_FILE, save_pretrained
    from gpt2core.model import GPT2

    params = load_params("gpt2_tiny")
    torch.manual_seed(0)
    staged = save_pretrained(GPT2(params.model), params, tmp_path / "gpt2ops-out-k3x9q")
    ctx = RunContext(pipeline_run_id="registry-folder", artifact_root=s3_root, experiment="scheduled-tests")
    with tracking.stage_run("train", ctx) as run:
        version = run.log_model(staged, model_uri=f"{s3_root}/m")
    folder = tracking.download_model_version(tracking.default_model_name(ctx), version, tmp_path / "dl")
    assert folder.name == "gpt2ops-out-k3x9q"
    assert (folder / WEIGHTS_FILE).read_bytes() == (staged / WEIGHTS_FILE).read_bytes()


def run_scheduled(work, source, config, s3_root, name, experiment) -> dict:
    code = main(["run", "--work_dir", str(work), "--no_cache", "--params", str(config),
                 "--source", str(source), "--include", "", "--sha256", "", "--artifact_root", s3_root,
                 "--experiment", experiment, "--run_name", name])
    assert code == 0, name
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    (parent,) = client.search_runs([exp.experiment_id], f"tags.`mlflow.runName` = '{name}'")
    run_id = parent.data.tags["gpt2ops.pipeline_run_id"]
    artifacts = {k.removeprefix("artifact."): v for k, v in parent.data.tags.items()
                 if k.startswith("artifact.")}
    with local_input(f"{s3_root}/{run_id}/promote/decision") as folder:
        decision = json.loads((folder / "decision.json").read_text())
    rescored = client.search_runs([exp.experiment_id],
                                  f"tags.`gpt2ops.pipeline_run_id` LIKE '{run_id}/champion-%'")
    return {"run_id": run_id, "artifacts": artifacts, "decision": decision, "rescored": rescored,
            "corpus": manifest_digest(read_manifest(artifacts["download/corpus"])),
            "dataset": manifest_digest(read_manifest(artifacts["preprocess/dataset"]))}


@pytest.mark.slow
def test_scheduled_runs_reuse_the_champions_score_until_the_corpus_changes(english_text_dir, s3_root,
                                                                           tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in PLAYS:
        shutil.copy(english_text_dir / name, corpus / name)
    config = tmp_path / "tiny.yaml"
    config.write_text(load_params("gpt2_tiny", {"runconfig.max_steps": 4, "runconfig.eval_steps": 4,
                                                "runconfig.sample_max_new_tokens": 4}).to_yaml())
    work, experiment = tmp_path / "work", "scheduled-runs"

    first = run_scheduled(work, corpus, config, s3_root, "first", experiment)
    assert first["decision"]["promoted"] and first["decision"]["champion_version"] is None

    # The schedule fires again on the same corpus: everything is redone, and comes out the same.
    second = run_scheduled(work, corpus, config, s3_root, "second", experiment)
    assert second["run_id"] != first["run_id"]
    assert (second["corpus"], second["dataset"]) == (first["corpus"], first["dataset"])
    assert second["rescored"] == []  # the champion's score on this eval set was known
    assert second["decision"]["champion_version"] == first["decision"]["version"]
    assert second["decision"]["champion_eval/loss"] == pytest.approx(first["decision"]["eval/loss"], rel=1e-5)
    assert not second["decision"]["promoted"]  # the same training scores the same: not better

    # Fresh data: a new eval set, so the champion is scored again on it (its registered model
    # downloaded), and a model trained longer on the new corpus takes its place.
    shutil.copy(english_text_dir / ANOTHER_PLAY, corpus / ANOTHER_PLAY)
    config.write_text(load_params("gpt2_tiny", {"runconfig.max_steps": 40, "runconfig.eval_steps": 4,
                                                "runconfig.sample_max_new_tokens": 4}).to_yaml())
    third = run_scheduled(work, corpus, config, s3_root, "third", experiment)
    assert third["dataset"] != first["dataset"]
    assert [r.info.status for r in third["rescored"]] == ["FINISHED"]
    decision = third["decision"]
    assert decision["champion_version"] == first["decision"]["version"]
    assert decision["champion_eval/loss"] == pytest.approx(third["rescored"][0].data.metrics["eval/loss"],
                                                           rel=1e-5)
    assert decision["promoted"] and decision["eval/loss"] < decision["champion_eval/loss"]
    assert tracking.champion_version(decision["model_name"]) == decision["version"]
