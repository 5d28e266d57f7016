"""The compiled pipeline: the committed YAML matches the code, and carries the cluster settings."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from pipelines.cli import PACKAGE_PATH
from pipelines.kubernetes import MLFLOW_SECRET, S3_SECRET

HEAVY = ("validate", "compile-model", "train", "evaluate", "promote")


@pytest.fixture(scope="module")
def compiled() -> tuple[dict, dict]:
    spec, platform = yaml.safe_load_all(PACKAGE_PATH.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def tasks(spec: dict) -> dict[str, dict]:
    """Every task of every DAG, by task name."""
    found = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        found.update(component.get("dag", {}).get("tasks", {}))
    return found


def executor(spec: dict, task: dict) -> dict:
    label = spec["components"][task["componentRef"]["name"]]["executorLabel"]
    return spec["deploymentSpec"]["executors"][label]["container"]


def test_committed_yaml_is_in_sync_with_the_code(tmp_path):
    """Regenerate with: gpt2ops pipeline compile (with no GPT2OPS_IMAGE_* set and no local build
    record, so the images are the default tags)."""
    out = tmp_path / "gpt2_pipeline.yaml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPT2OPS_IMAGE")}
    env["GPT2OPS_IMAGES_FILE"] = str(tmp_path / "no-build-record.json")
    subprocess.run([sys.executable, "-m", "gpt2core.cli", "pipeline", "compile", "--output",
                    str(out)], check=True, env=env, capture_output=True)
    # Compared as YAML documents: KFP's header comment prints dict-valued defaults (the GPU
    # tolerations) in protobuf map order, which changes from one process to the next.
    assert list(yaml.safe_load_all(out.read_text())) == list(yaml.safe_load_all(
        PACKAGE_PATH.read_text())), (
        "pipelines/gpt2_pipeline.yaml is stale: run `gpt2ops pipeline compile` and commit it")


def test_every_run_form_parameter_has_a_default_and_a_description(compiled):
    spec, _ = compiled
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert {"params", "source", "target", "num_gpus", "gpu_type", "node_selector", "tolerations",
            "max_steps", "experiment", "artifact_root"} <= set(parameters)
    for name, parameter in parameters.items():
        assert "defaultValue" in parameter, name
        assert len(parameter.get("description", "")) > 10, name
    assert parameters["params"]["defaultValue"] == "gpt2_tiny"
    assert parameters["target"]["defaultValue"] == "cpu"
    assert parameters["source"]["defaultValue"].startswith("https://")


def test_heavy_steps_carry_node_pool_secrets_shm_and_timeouts(compiled):
    spec, k8s = compiled
    heavy = [name for name in k8s if name.removeprefix("exec-").rstrip("-23") in HEAVY]
    assert len(heavy) == 9  # validate, evaluate, promote, compile + train in each of 3 branches
    for name in heavy:
        settings = k8s[name]
        assert settings["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"].endswith(
            "node_selector"), name
        assert settings["tolerations"][0]["tolerationJson"]["componentInputParameter"].endswith(
            "tolerations"), name
        assert {"mountPath": "/dev/shm", "medium": "Memory", "volumeName": "dshm",
                "sizeLimit": "16Gi"} in settings["emptyDirMounts"], name
        assert int(settings["activeDeadlineSeconds"]) >= 1800, name
    for name, settings in k8s.items():  # every step, heavy or not, gets its credentials from Secrets
        secrets = {s["secretName"]: [k["envVar"] for k in s["keyToEnv"]]
                   for s in settings["secretAsEnv"] if not s["optional"]}
        assert "AWS_SECRET_ACCESS_KEY" in secrets[S3_SECRET], name
        assert "MLFLOW_TRACKING_URI" in secrets[MLFLOW_SECRET], name


def test_gpu_branch_asks_for_gpus_and_cerebras_branch_uses_its_image(compiled):
    spec, _ = compiled
    by_image: dict[str, set[str]] = {}
    for name, task in tasks(spec).items():
        if "componentRef" in task and "executorLabel" in spec["components"][task["componentRef"]["name"]]:
            container = executor(spec, task)
            by_image.setdefault(container["image"].split(":")[0], set()).add(name)
            accelerator = container.get("resources", {}).get("accelerator")
            if container["image"].startswith("gpt2ops-cuda"):
                assert accelerator["resourceType"] == "nvidia.com/gpu", name
                assert "num_gpus" in accelerator["resourceCount"], name
            else:
                assert accelerator is None, name
    assert by_image["gpt2ops-cuda"] == {"compile-model", "train"}
    assert by_image["gpt2ops-cerebras"] == {"compile-model-2", "train-2"}
    conditions = [t["triggerPolicy"]["condition"] for t in tasks(spec).values()
                  if "condition" in t.get("triggerPolicy", {})]
    assert any("== 'gpu'" in c and "!" not in c for c in conditions)
    assert any(c.endswith("== 'cerebras'") for c in conditions)


def test_exit_handler_closes_the_run_and_bookkeeping_is_never_cached(compiled):
    spec, _ = compiled
    all_tasks = tasks(spec)
    end = all_tasks["end-run"]
    assert end["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert end["dependentTasks"] == ["exit-handler-1"]
    for name in ("start-run", "promote", "record-results", "end-run"):
        assert not all_tasks[name]["cachingOptions"].get("enableCache"), name
    for name in ("download", "preprocess", "validate", "compile-model", "train", "evaluate"):
        assert all_tasks[name]["cachingOptions"]["enableCache"], name
        assert all_tasks[name]["retryPolicy"]["maxRetryCount"] >= 2, name
    assert "retryPolicy" not in all_tasks["start-run"]  # bad run-form values fail at once


def test_stage_inputs_leave_out_the_mlflow_parent_run(compiled):
    """Caching keys on inputs: a per-run parent id among them would defeat the cache."""
    spec, _ = compiled
    for name in ("download", "preprocess", "validate", "compile-model", "train", "evaluate"):
        inputs = tasks(spec)[name]["inputs"]["parameters"]
        assert "parent_run_id" not in inputs
        assert inputs["pipeline_run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"


def test_gpu_branch_lands_on_the_gpu_pool_by_default(compiled):
    """The gpu branch's compile and train take gpu_node_selector (in place of node_selector) and
    gpu_tolerations (on top of tolerations), whose defaults are the GPU pool's label and taint; the
    train step tells the TrainJob it may launch which image to run."""
    from gpt2core.launch.trainjob import ENV_TRAINER_IMAGE, GPU_NODE_SELECTOR, GPU_TOLERATIONS

    spec, k8s = compiled
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert parameters["gpu_node_selector"]["defaultValue"] == GPU_NODE_SELECTOR
    assert parameters["gpu_tolerations"]["defaultValue"] == GPU_TOLERATIONS
    assert parameters["num_nodes"]["defaultValue"] == 1
    for name in ("exec-compile-model", "exec-train"):  # the gpu branch (cuda image)
        settings = k8s[name]
        assert settings["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"].endswith(
            "--gpu_node_selector"), name
        assert [t["tolerationJson"]["componentInputParameter"].split("--")[-1]
                for t in settings["tolerations"]] == ["tolerations", "gpu_tolerations"], name
    train_env = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["env"]
    assert {"name": ENV_TRAINER_IMAGE,
            "value": spec["deploymentSpec"]["executors"]["exec-train"]["container"]["image"]} in train_env
    for name in ("exec-train-2", "exec-train-3", "exec-validate", "exec-evaluate"):
        assert k8s[name]["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"].endswith(
            "--node_selector"), name


def test_each_step_of_the_definition_is_its_components_call():
    """One definition: a step's inputs are its KFP component's parameters (besides the run ids), and
    its outputs are among the component's."""
    import inspect

    from pipelines.definition import STEPS
    from pipelines.gpt2_pipeline import COMPONENTS

    run_ids = {"pipeline_run_id", "artifact_root", "experiment"}
    for step in STEPS:
        component = COMPONENTS[step.stage]
        parameters = set(inspect.signature(component.python_func).parameters)
        outputs = set(component.component_spec.outputs or {})
        assert set(step.inputs) | run_ids == {p for p in parameters if p not in outputs}, step.name
        assert set(step.outputs) <= outputs, step.name
