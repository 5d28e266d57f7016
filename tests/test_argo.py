"""The Argo rendering of the pipeline: valid Argo objects (Hera's generated models of Argo's API), in
sync with the committed manifests, built from the one definition; and the rendered workflow runs.

No Argo controller runs here: tests/argo_harness.py walks the rendered DAG as the controller does and
runs each task's container command (in this venv, or in the gpt2ops-cpu image with Docker) against
the embedded S3 (SeaweedFS) and MLflow (sqlite): a fresh run, an unchanged rerun that the
memoization keys skip, and a failing run that the exit handler marks FAILED in MLflow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from argo_harness import Controller, DockerPods, HarnessError, LocalPods, evaluate, substitute
from argo_schema import validate_argo_object
from hera.workflows import models as m

from gpt2core.pipeline_parameters import PipelineParameters
from pipelines import argo_workflow
from pipelines.argo_cli import MANIFEST_DIR
from pipelines.definition import (MLFLOW_SECRET, S3_SECRET, STEPS, TARGET_SETTINGS, TARGET_BRANCHES, Form, Output,
                                  step)

REPO = Path(__file__).resolve().parents[1]
@pytest.fixture(scope="module")
def template() -> dict:
    return argo_workflow.manifest(argo_workflow.workflow_template())


def templates_of(template: dict) -> dict[str, dict]:
    return {t["name"]: t for t in template["spec"]["templates"]}


def tasks_of(template: dict) -> dict[str, dict]:
    return {t["name"]: t for t in templates_of(template)[argo_workflow.ENTRYPOINT]["dag"]["tasks"]}


# ---------------------------------------------------------------- the rendered objects

def test_rendered_objects_are_valid_argo_objects(template):
    validate_argo_object(template)
    validate_argo_object(argo_workflow.manifest(argo_workflow.cron_workflow()))
    scheduled = argo_workflow.cron_workflow(schedule="30 1 * * *", timezone="Europe/Berlin",
                                            arguments={"target": "gpu", "num_gpus": 8, "node_selector": {"a": "b"}})
    validate_argo_object(argo_workflow.manifest(scheduled))


def test_the_validation_rejects_broken_objects(template):
    broken = json.loads(json.dumps(template))
    broken["spec"]["templates"][1]["retryStrategy"]["limitt"] = 3
    with pytest.raises(AssertionError, match="round trip"):
        validate_argo_object(broken)
    broken = json.loads(json.dumps(template))
    broken["spec"]["templates"][1]["activeDeadlineSeconds"] = {"hours": 6}
    with pytest.raises(Exception):
        validate_argo_object(broken)


def test_committed_manifests_are_in_sync_with_the_renderer(tmp_path):
    """Regenerate with: gpt2ops argo render (with no GPT2OPS_IMAGE_* set and no local build
    record, so the images are the default tags)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPT2OPS_IMAGE")}
    env["GPT2OPS_IMAGES_FILE"] = str(tmp_path / "no-build-record.json")
    subprocess.run([sys.executable, "-m", "gpt2core.cli", "argo", "render", "--output", str(tmp_path)],
                   check=True, env=env, capture_output=True, cwd=REPO)
    for name in argo_workflow.RENDERED:
        assert yaml.safe_load((tmp_path / name).read_text()) == yaml.safe_load((MANIFEST_DIR / name).read_text()), (
            f"k8s/components/argo/{name} is stale: run `gpt2ops argo render` and commit it")


def test_the_artifact_repository_holds_the_logs_in_the_same_s3():
    config = yaml.safe_load((MANIFEST_DIR / "artifact-repository.yaml").read_text())
    assert config["metadata"]["name"] == argo_workflow.ARTIFACT_REPOSITORY.config_map
    repository = yaml.safe_load(config["data"][argo_workflow.ARTIFACT_REPOSITORY.key])
    parsed = m.ArtifactRepository.model_validate(repository)
    assert json.loads(parsed.model_dump_json(by_alias=True, exclude_none=True)) == repository
    assert repository["archiveLogs"] is True
    s3 = repository["s3"]
    assert s3["bucket"] == PipelineParameters().artifact_root.removeprefix("s3://").split("/")[0]
    assert {s3["accessKeySecret"]["name"], s3["secretKeySecret"]["name"]} == {S3_SECRET}
    assert "://" not in s3["endpoint"]


def test_the_run_form_is_the_templates_parameters(template):
    parameters = {p["name"]: p for p in template["spec"]["arguments"]["parameters"]}
    assert list(parameters) == [*PipelineParameters.model_fields, argo_workflow.MEMOIZE]
    defaults = PipelineParameters()
    for name, field in PipelineParameters.model_fields.items():
        assert parameters[name]["description"] == field.description, name
        assert parameters[name]["value"] == argo_workflow.parameter_text(getattr(defaults, name)), name
    assert parameters["target"]["enum"] == ["cpu", "gpu", "cerebras"]
    assert json.loads(parameters["gpu_tolerations"]["value"]) == defaults.gpu_tolerations


def test_every_step_of_the_definition_is_a_task_running_its_stage(template):
    tasks, templates = tasks_of(template), templates_of(template)
    assert list(tasks) == [argo_workflow.START_TASK, *(s.name for s in STEPS), argo_workflow.RECORD_TASK]
    assert template["spec"]["onExit"] == argo_workflow.END_TASK
    for s in STEPS:
        container = templates[s.name]["container"]
        assert container["command"] == ["gpt2ops"] and container["args"][0] == s.stage, s.name
        assert "--result_file" in container["args"], s.name
        assert templates[s.name]["outputs"]["parameters"] == [
            {"name": "result", "valueFrom": {"path": argo_workflow.RESULT_FILE}}], s.name
        assert templates[s.name]["activeDeadlineSeconds"] == s.settings.timeout_s, s.name
        assert container["resources"]["requests"] == dict(s.settings.resources.requests), s.name
        for name, value in s.inputs.items():  # wired as the definition says
            argument = next(a["value"] for a in tasks[s.name]["arguments"]["parameters"] if a["name"] == name)
            if isinstance(value, Form):
                assert argument == f"{{{{workflow.parameters.{value.name}}}}}"
            elif isinstance(value, Output):
                assert f"tasks['{value.stage}" in argument and "outputs.parameters.result" in argument
            else:
                assert argument == value
    for target in TARGET_BRANCHES:
        for stage in ("compile", "train"):
            name = step(stage, target).name
            assert tasks[name]["when"] == f"'{{{{workflow.parameters.target}}}}' == '{target}'"
            image = templates[name]["container"]["image"]
            assert image.split(":")[0] == {"gpu": "gpt2ops-cuda", "cerebras": "gpt2ops-cerebras",
                                           "cpu": "gpt2ops-cpu"}[target], name
    # After the branches a task reads the chosen branch's result.
    evaluate_args = {a["name"]: a["value"] for a in tasks["evaluate"]["arguments"]["parameters"]}
    assert "tasks['train-' + workflow.parameters.target]" in evaluate_args["model_uri"]
    assert set(tasks["evaluate"]["depends"].split(" && ")) >= {f"train-{t}" for t in TARGET_BRANCHES}


def test_credentials_come_only_from_the_two_secrets(template):
    for name, t in templates_of(template).items():
        if "container" not in t:
            continue
        for variable in t["container"]["env"]:
            if "valueFrom" in variable:
                assert variable["valueFrom"]["secretKeyRef"]["name"] in (S3_SECRET, MLFLOW_SECRET), name
            else:  # the one literal: which image a TrainJob runs
                assert variable["name"] == "GPT2OPS_TRAINER_IMAGE" and name == "train-gpu", (name, variable)
        secrets = {v["name"] for v in t["container"]["env"] if "valueFrom" in v}
        assert {"AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI"} <= secrets, name


def test_placement_retries_and_multi_node_training(template):
    templates = templates_of(template)
    train = templates["train-gpu"]
    patch = train["podSpecPatch"]
    assert "{{workflow.parameters.gpu_node_selector}}" in patch
    assert "concat(fromJSON(workflow.parameters.tolerations), fromJSON(workflow.parameters.gpu_tolerations))" in patch
    assert '"nvidia.com/gpu": "{{workflow.parameters.num_gpus}}"' in patch
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in train["volumes"]
    args = train["container"]["args"]
    assert args[args.index("--nproc_per_node") + 1] == "{{inputs.parameters.num_gpus}}"
    assert args[args.index("--num_nodes") + 1] == "{{inputs.parameters.num_nodes}}"
    # A lost or preempted pod (Error) is retried with backoff; a user-fixable failure (exit 2) is not.
    retry = train["retryStrategy"]
    settings = TARGET_SETTINGS["gpu"].retry
    assert retry["retryPolicy"] == "Always" and retry["limit"] == settings.limit
    assert retry["backoff"] == {"duration": f"{settings.backoff_s}s", "factor": 2, "cap": f"{settings.max_backoff_s}s"}
    assert evaluate(retry["expression"], {"lastRetry.status": "Error", "lastRetry.exitCode": "-1"}) is True
    assert evaluate(retry["expression"], {"lastRetry.status": "Failed", "lastRetry.exitCode": "137"}) is True
    assert evaluate(retry["expression"], {"lastRetry.status": "Failed", "lastRetry.exitCode": "2"}) is False
    assert "retryStrategy" not in templates[argo_workflow.START_TASK]  # bad run-form values fail at once
    assert "podSpecPatch" not in templates["download"]  # data steps run anywhere
    gpu = {"workflow.parameters.gpu_node_selector": '{"pool": "h100"}', "workflow.parameters.num_gpus": "8",
           "workflow.parameters.tolerations": '[{"key": "a", "operator": "Exists"}]',
           "workflow.parameters.gpu_tolerations": '[{"key": "b", "operator": "Exists"}]'}
    assert json.loads(substitute(patch, gpu)) == {
        "nodeSelector": {"pool": "h100"},
        "tolerations": [{"key": "a", "operator": "Exists"}, {"key": "b", "operator": "Exists"}],
        "containers": [{"name": "main", "resources": {"limits": {"nvidia.com/gpu": "8"}}}]}


def test_memoization_keys_on_the_stage_inputs_only(template):
    """A key changes with an input, not with the pipeline run or its MLflow parent run; memoize=false
    makes it the run's own; the never-cached promote has none."""
    train = templates_of(template)["train-cpu"]
    assert train["memoize"]["cache"]["configMap"]["name"] == argo_workflow.MEMO_CACHE
    inputs = {f"inputs.parameters.{p['name']}": f"value-{p['name']}" for p in train["inputs"]["parameters"]}
    run = {"workflow.uid": "uid-1", "workflow.parameters.memoize": "true", **inputs}

    def key(**changes: str) -> str:
        return substitute(train["memoize"]["key"], {**run, **changes})

    assert key().startswith("train-cpu-") and key() == key(**{"workflow.uid": "uid-2"})
    assert key() == key(**{"inputs.parameters.pipeline_run_id": "other", "inputs.parameters.parent_run_id": "x"})
    assert key() != key(**{"inputs.parameters.dataset_uri": "s3://b/other"})
    assert key(**{"workflow.parameters.memoize": "false"}) != key(
        **{"workflow.parameters.memoize": "false", "workflow.uid": "uid-2"})
    assert "memoize" not in templates_of(template)["promote"]
    cron = argo_workflow.manifest(argo_workflow.cron_workflow())
    assert {"name": argo_workflow.MEMOIZE, "value": "false"} in cron["spec"]["workflowSpec"]["arguments"]["parameters"]


def test_the_cron_workflow_retrains_from_the_template():
    cron = argo_workflow.manifest(argo_workflow.cron_workflow(arguments={"source": "s3://b/fresh/"}))["spec"]
    assert cron["workflowSpec"]["workflowTemplateRef"] == {"name": argo_workflow.TEMPLATE_NAME}
    assert cron["schedules"] == [argo_workflow.DEFAULT_SCHEDULE] and cron["timezone"] == "UTC"
    assert cron["concurrencyPolicy"] == "Forbid" and cron["startingDeadlineSeconds"] > 0
    assert cron["successfulJobsHistoryLimit"] >= 1 and cron["failedJobsHistoryLimit"] >= 1
    assert {"name": "source", "value": "s3://b/fresh/"} in cron["workflowSpec"]["arguments"]["parameters"]


def test_the_harness_refuses_what_argo_would_not_resolve(template):
    with pytest.raises(HarnessError, match="cannot resolve"):
        substitute("{{workflow.parameters.nope}}", {})
    assert substitute('{{=jsonpath(x, "$.outputs.model")}}', {"x": '{"outputs": {"model": "s3://m"}}'}) == "s3://m"
    assert substitute('{{=jsonpath(x, "$.metrics")}}', {"x": '{"metrics": {"b": 2.0, "a": 0.5}}'}) == '{"a":0.5,"b":2}'
    assert substitute("{{=asInt(a) * asInt(b)}}", {"a": "2", "b": "8"}) == "16"
    controller = Controller(template, secrets={}, pods=LocalPods(), scratch=Path("/tmp"))
    with pytest.raises(HarnessError, match="not one of"):
        controller.submit({"target": "tpu"})


# ---------------------------------------------------------------- the rendered workflow runs

def secrets(s3_server) -> dict[str, dict[str, str]]:
    """The namespace's two Secrets, as k8s/secrets/ describes them, for the embedded services."""
    env = s3_server.env()
    return {S3_SECRET: {k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")},
            MLFLOW_SECRET: {"MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"],
                            "MLFLOW_S3_ENDPOINT_URL": env["MLFLOW_S3_ENDPOINT_URL"]}}


def parent_run(run_name: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id], f"tags.`mlflow.runName` = '{run_name}'")
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    return run, children


def recorded_artifacts(run) -> dict[str, str]:
    return {k.removeprefix("artifact."): v for k, v in run.data.tags.items() if k.startswith("artifact.")}


@pytest.mark.slow
def test_the_rendered_workflow_runs_then_reruns_from_memo_then_fails_cleanly(
        template, plays, s3_server, s3_root, tmp_path):
    from gpt2core.platform.artifacts import artifact_exists
    from gpt2core.platform.artifacts.s3 import s3_client
    from gpt2core.platform.artifacts.uris import split_s3_uri

    controller = Controller(template, secrets=secrets(s3_server), pods=LocalPods(), scratch=tmp_path)
    experiment = "argo-e2e"
    form = {"params": "gpt2_tiny", "source": str(plays), "source_include": "", "source_sha256": "",
            "max_steps": "6", "artifact_root": s3_root, "experiment": experiment}

    # 1. A fresh run: every stage of the cpu branch runs, the others are skipped.
    fresh = controller.submit({**form, "run_name": "argo-fresh"})
    assert fresh.status == "Succeeded", fresh.phases()
    assert fresh.ran() == ["start-run", "download", "preprocess", "validate", "compile-cpu", "train-cpu",
                           "evaluate", "promote", "record-results"]
    assert {fresh.nodes[f"{s}-{t}"].phase for s in ("compile", "train") for t in ("gpu", "cerebras")} == {"Skipped"}
    assert fresh.exit_node.phase == "Succeeded"
    parent, children = parent_run("argo-fresh", experiment)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["gpt2ops.pipeline_run_id"] == fresh.uid
    artifacts = recorded_artifacts(parent)
    assert set(artifacts) == {"download/corpus", "preprocess/dataset", "validate/report", "compile/compile_cache",
                              "train/model", "train/checkpoints", "evaluate/report"}
    for name, uri in artifacts.items():
        assert uri == f"{s3_root}/{fresh.uid}/{name}" and artifact_exists(uri), (name, uri)
    assert sorted(c.info.run_name for c in children) == sorted(
        ["download", "preprocess", "validate", "compile", "train", "evaluate", "promote"])
    assert all(c.info.status == "FINISHED" for c in children)
    assert 1.0 < parent.data.metrics["eval/lm_perplexity"] < 60000
    assert parent.data.tags["gpt2ops.promoted"] == "True"  # the first model is the champion

    # 2. The same parameters again: the memoization keys match, every cached stage is skipped and
    #    served its earlier result; promote (never cached) finds the model registered and champion.
    again = controller.submit({**form, "run_name": "argo-again"})
    assert again.status == "Succeeded", again.phases()
    assert again.ran() == ["start-run", "promote", "record-results"]
    assert all(again.nodes[name].memoized for name in ("download", "preprocess", "validate", "compile-cpu",
                                                        "train-cpu", "evaluate"))
    second, second_children = parent_run("argo-again", experiment)
    assert second.info.status == "FINISHED" and second.info.run_id != parent.info.run_id
    assert [c.info.run_name for c in second_children] == ["promote"]
    assert recorded_artifacts(second) == artifacts  # the earlier run's artifacts, recorded again
    assert second.data.tags["gpt2ops.model_version"] == parent.data.tags["gpt2ops.model_version"]

    # 3. The dataset loses its manifest; a run with another step count reuses download and
    #    preprocess from the cache, validate (its inputs changed) fails reading it, exits 2 (not
    #    retried), nothing after it runs, and the exit handler marks the parent run FAILED.
    bucket, key = split_s3_uri(artifacts["preprocess/dataset"])
    s3_client().delete_object(Bucket=bucket, Key=f"{key}/MANIFEST.json")
    broken = controller.submit({**form, "max_steps": "7", "run_name": "argo-broken"})
    assert broken.status == "Failed"
    assert broken.nodes["download"].memoized and broken.nodes["preprocess"].memoized
    assert broken.nodes["validate"].phase == "Failed" and broken.nodes["validate"].attempts == 1
    assert broken.nodes["train-cpu"].phase == "Omitted" and broken.nodes["record-results"].phase == "Omitted"
    assert broken.exit_node.phase == "Succeeded"
    failed, failed_children = parent_run("argo-broken", experiment)
    assert failed.info.status == "FAILED"
    assert "validate" in failed.data.tags["gpt2ops.error"]
    assert [c.info.status for c in failed_children if c.info.run_name == "validate"] == ["FAILED"]
    assert parent_run("argo-fresh", experiment)[0].info.status == "FINISHED"


@pytest.mark.docker
@pytest.mark.slow
def test_the_rendered_workflow_runs_in_the_cpu_image(plays, s3_server, s3_root, tmp_path):
    """The same walk with each task in its container: the gpt2ops-cpu image (built here when missing
    or stale), as a cluster would run it."""
    from gpt2core.images import ImageError, docker_client, image_for, require_image

    try:
        client = docker_client()
    except ImageError as exc:
        if os.environ.get("GPT2OPS_REQUIRE_DOCKER") == "1":
            pytest.fail(f"GPT2OPS_REQUIRE_DOCKER=1 but {exc}")
        pytest.skip(str(exc))
    try:
        require_image(image_for("cpu"), "cpu", client=client, current=True)
    except ImageError:
        subprocess.run([sys.executable, "-m", "containers.build", "cpu"], cwd=REPO, check=True)
    template = argo_workflow.manifest(argo_workflow.workflow_template())  # this checkout's image tags
    mlflow_folder = Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")).parent
    corpus = tmp_path / "corpus"  # mounted at the same path: the source is a local folder
    shutil.copytree(plays, corpus)
    controller = Controller(template, secrets=secrets(s3_server), scratch=tmp_path,
                            pods=DockerPods(mounts=[mlflow_folder, corpus]))
    run = controller.submit({"params": "gpt2_tiny", "source": str(corpus), "source_include": "",
                             "source_sha256": "", "max_steps": "2", "artifact_root": s3_root,
                             "experiment": "argo-docker", "run_name": "argo-docker"})
    assert run.status == "Succeeded", run.phases()
    assert run.ran()[-1] == "record-results" and run.exit_node.phase == "Succeeded"
    parent, _ = parent_run("argo-docker", "argo-docker")
    assert parent.info.status == "FINISHED" and recorded_artifacts(parent)["train/model"].startswith(s3_root)


# ---------------------------------------------------------------- what the tasks run

def test_a_stage_hands_its_result_to_the_orchestrator_in_a_file(plays, tmp_path):
    """`gpt2ops <stage> --result_file PATH`: the task's output parameter is the stage's result.json,
    a failure included (then the command exits 2)."""
    from gpt2core.cli import main
    from gpt2core.platform.results import StageResult, read_result

    root = tmp_path / "artifacts"
    common = ["--artifact_root", str(root), "--pipeline_run_id", "argo-run", "--experiment", "argo-result-file"]
    assert main(["download", str(plays), *common, "--result_file", str(tmp_path / "ok.json")]) == 0
    written = StageResult.model_validate_json((tmp_path / "ok.json").read_text())
    assert written == read_result(str(root / "argo-run" / "download" / "result.json"))
    assert written.status == "succeeded" and written.outputs["corpus"].endswith("argo-run/download/corpus")

    assert main(["download", str(tmp_path / "missing"), *common, "--result_file", str(tmp_path / "bad.json")]) == 2
    failed = StageResult.model_validate_json((tmp_path / "bad.json").read_text())
    assert failed.status == "failed" and failed.error.type == "DataError" and "missing" in failed.error.message


def test_pipeline_run_bookkeeping_commands(tmp_path, capsys):
    """start opens the parent run then checks the form (a bad value: exit 2, recorded); end closes it
    FAILED with the failed nodes Argo lists, or FINISHED."""
    from mlflow.tracking import MlflowClient

    from gpt2core.cli import main
    from gpt2core.platform import tracking

    run_id_file = tmp_path / "parent"
    assert main(["pipeline-run", "start", "--pipeline_run_id", "wf-ok", "--experiment", "argo-bookkeeping",
                 "--artifact_root", str(tmp_path), "--run_name", "named", "--output_file", str(run_id_file)]) == 0
    parent = run_id_file.read_text()
    assert parent == tracking.find_parent_run("wf-ok", "argo-bookkeeping")
    assert main(["pipeline-run", "end", "--pipeline_run_id", "wf-ok", "--experiment", "argo-bookkeeping",
                 "--status", "Succeeded", "--failures", "null"]) == 0
    assert MlflowClient().get_run(parent).info.status == "FINISHED"

    assert main(["pipeline-run", "start", "--pipeline_run_id", "wf-bad", "--experiment", "argo-bookkeeping",
                 "--artifact_root", "relative/path"]) == 2
    assert "parameter artifact_root" in capsys.readouterr().err
    failures = json.dumps([{"displayName": "start-run", "message": "Error (exit code 2)", "phase": "Failed"}])
    assert main(["pipeline-run", "end", "--pipeline_run_id", "wf-bad", "--experiment", "argo-bookkeeping",
                 "--status", "Failed", "--failures", failures]) == 0
    bad = MlflowClient().get_run(tracking.find_parent_run("wf-bad", "argo-bookkeeping"))
    assert bad.info.status == "FAILED" and bad.data.tags["gpt2ops.error"] == "start-run: Error (exit code 2)"
    # a run whose start never opened a parent run: nothing to close, no error
    assert main(["pipeline-run", "end", "--pipeline_run_id", "wf-none", "--experiment", "argo-bookkeeping",
                 "--status", "Error"]) == 0


def test_max_steps_zero_keeps_the_configs_as_in_the_run_form():
    """An orchestrator passes the run form's max_steps through as the stage's flag: 0 means the
    config's runconfig.max_steps there too."""
    from gpt2core.stages import train

    assert "runconfig.max_steps" not in train.Request(params="gpt2_tiny", max_steps=0).config_overrides()
    assert train.Request(params="gpt2_tiny", max_steps=5).config_overrides()["runconfig.max_steps"] == 5
