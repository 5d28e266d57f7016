"""The Cerebras target: the real cstorch flow in the SDK's own venv (torch 2.4), driven from here.

No appliance exists here, so:
- training runs through the SDK's CPU backend (``cstorch.backend("CPU")``: the same compile, trace,
  DataLoader, DataExecutor, step/checkpoint closures and cstorch.save/load as on CSX);
- the CSX backend traces and lowers the step to MLIR locally, up to the appliance boundary;
- cluster settings (no address, unreachable address, options CSX cannot run) fail with errors that
  name the setting.
The settings and Model Zoo export tests need no SDK. The others need ``.venv-cerebras`` (CI builds
it from requirements/cerebras.txt) and are skipped, saying so, only where it does not exist.
"""

from __future__ import annotations

import math
import socket
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from gpt2core import cerebras
from gpt2core.cerebras.modelzoo import MODELZOO_PARAMS_FILE, modelzoo_params, write_modelzoo_params
from gpt2core.cerebras.settings import resolve_settings
from gpt2core.config import load_params, params_from_dict
from gpt2core.errors import ConfigError, DataError
from gpt2core.platform.settings import reload_settings
from gpt2core.platform.context import RunContext

SCHEDULE = [
    {"scheduler": "Linear", "initial_learning_rate": 0.0, "end_learning_rate": 3.0e-3, "total_iters": 3},
    {"scheduler": "CosineDecay", "initial_learning_rate": 3.0e-3, "end_learning_rate": 3.0e-4, "total_iters": 9},
]
TRAIN_STEPS = 12


def tiny(**overrides: object):
    return load_params("gpt2_tiny", overrides)


def csx_tiny(**overrides: object):
    """The tiny model as the wafer trains it: mixed precision with cbfloat16 and dynamic loss scaling."""
    return tiny(**{"model.mixed_precision": True, "model.fp16_type": "cbfloat16",
                   "optimizer.loss_scaling_factor": "dynamic", **overrides})


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sdk() -> str:
    try:
        return cerebras.sdk_python()
    except ConfigError as exc:
        pytest.skip(f"the Cerebras SDK venv does not exist ({exc})")


# ----------------------------------------------------------------------------- settings (no SDK)


def test_csx_without_appliance_address_names_the_setting():
    with pytest.raises(ConfigError, match=r"runconfig\.mgmt_address: not set"):
        resolve_settings(csx_tiny(), "CSX", need_appliance=True)
    # Validation lowers locally and needs no appliance; the CPU backend never does.
    assert resolve_settings(csx_tiny(), "CSX", need_appliance=False).mgmt_address is None
    assert not resolve_settings(tiny(), "CPU", need_appliance=True).is_csx


def test_unreachable_or_malformed_appliance_address_names_the_setting():
    address = f"127.0.0.1:{closed_port()}"
    with pytest.raises(ConfigError, match=rf"runconfig\.mgmt_address: cannot reach .*{address}"):
        resolve_settings(csx_tiny(**{"runconfig.mgmt_address": address}), "CSX", need_appliance=True)
    with pytest.raises(ConfigError, match=r"runconfig\.mgmt_address: expected '<host>:<port>', got 'cluster'"):
        resolve_settings(csx_tiny(**{"runconfig.mgmt_address": "cluster"}), "CSX", need_appliance=True)


def test_reachable_appliance_address_passes_the_preflight():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        address = f"127.0.0.1:{server.getsockname()[1]}"
        settings = resolve_settings(csx_tiny(**{"runconfig.mgmt_address": address, "runconfig.num_csx": 2}),
                                    "CSX", need_appliance=True)
    assert (settings.mgmt_address, settings.num_csx, settings.half_dtype) == (address, 2, "cbfloat16")
    assert settings.uses_grad_scaler
    # Appliance workers import gpt2core for the dataloader: its folder is on their PYTHONPATH.
    assert str(Path(cerebras.__file__).resolve().parents[2]) in settings.python_paths


@pytest.mark.parametrize("overrides, key", [
    ({"runconfig.torch_compile": True}, "runconfig.torch_compile"),
    ({"runconfig.parallelism": "fsdp"}, "runconfig.parallelism"),
    ({"runconfig.activation_checkpointing": True}, "runconfig.activation_checkpointing"),
    ({"optimizer.grad_accum_steps": 2}, "optimizer.grad_accum_steps"),
    ({"runconfig.eval_frequency": 100}, "runconfig.eval_frequency"),
    ({"model.mixed_precision": False}, "model.mixed_precision"),
    ({"optimizer.loss_scaling_factor": 128.0}, "optimizer.loss_scaling_factor"),
    ({"runconfig.num_csx": 3}, "train_input.batch_size"),
    ({"runconfig.credentials_path": "/nonexistent/tls.crt"}, "runconfig.credentials_path"),
    ({"runconfig.mount_dirs": ["/nonexistent/data"]}, r"runconfig\.mount_dirs\.0"),
    ({"runconfig.job_priority": "urgent"}, "runconfig.job_priority"),
    ({"runconfig.job_labels": ["team"]}, r"runconfig\.job_labels\.0"),
])
def test_options_the_csx_backend_cannot_run_name_the_setting(overrides, key):
    with pytest.raises(ConfigError, match=key):
        resolve_settings(csx_tiny(**overrides), "CSX", need_appliance=False)


def test_cpu_backend_refuses_half_types_it_cannot_autocast():
    with pytest.raises(ConfigError, match=r"model\.fp16_type: the CPU backend autocasts to bfloat16 only"):
        resolve_settings(tiny(**{"model.mixed_precision": True, "model.fp16_type": "float16"}), "CPU",
                         need_appliance=True)
    assert resolve_settings(tiny(**{"model.mixed_precision": True, "model.fp16_type": "bfloat16"}), "CPU",
                            need_appliance=True).half_dtype == "bfloat16"
    with pytest.raises(ConfigError, match="expected one of CSX, CPU"):
        resolve_settings(tiny(), "GPU", need_appliance=True)


# ----------------------------------------------------------------------------- Model Zoo export (no SDK)


def test_modelzoo_export_of_gpt2_small_matches_the_reference_layout(tmp_path: Path):
    params = load_params("gpt2_small")
    path = write_modelzoo_params(params, tmp_path / MODELZOO_PARAMS_FILE, train_data_dir="/data/train",
                                 eval_data_dir="/data/val")
    exported = yaml.safe_load(path.read_text())
    assert set(exported["trainer"]) == {"init", "fit", "validate", "validate_all"}
    init, fit = exported["trainer"]["init"], exported["trainer"]["fit"]
    assert init["backend"] == {"backend_type": "CSX", "cluster_config": {"num_csx": 1}}
    model = init["model"]
    assert model["name"] == "gpt2"
    assert {k: model[k] for k in ("hidden_size", "num_hidden_layers", "num_heads", "filter_size", "vocab_size")} == {
        "hidden_size": 768, "num_hidden_layers": 12, "num_heads": 12, "filter_size": 3072, "vocab_size": 50257}
    assert model["share_embedding_weights"] is True and model["use_bias_in_output"] is False
    m, o = params.model, params.optimizer
    assert init["optimizer"] == {"adamw": {"betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
                                           "correct_bias": True}}
    assert init["precision"]["fp16_type"] == m.fp16_type
    assert init["precision"]["loss_scaling_factor"] == o.loss_scaling_factor
    assert init["loop"]["max_steps"] == params.runconfig.max_steps
    # The HDF5 folders are ours, read by the Model Zoo's map-style GPT processor as they are.
    assert fit["train_dataloader"]["data_processor"] == "GptHDF5MapDataProcessor"
    assert fit["train_dataloader"]["data_dir"] == "/data/train"
    assert fit["train_dataloader"]["batch_size"] == params.train_input.batch_size
    assert fit["val_dataloader"]["data_dir"] == "/data/val"
    assert exported["trainer"]["validate"]["val_dataloader"] == fit["val_dataloader"]


def test_modelzoo_export_maps_every_schedule_kind():
    params = tiny(**{"optimizer.learning_rate": [
        {"scheduler": "Linear", "initial_learning_rate": 0.0, "end_learning_rate": 1e-3, "total_iters": 10},
        {"scheduler": "Constant", "learning_rate": 1e-3, "total_iters": 5},
        {"scheduler": "Exponential", "initial_learning_rate": 1e-3, "decay_rate": 0.5, "total_iters": 20},
        {"scheduler": "CosineDecay", "initial_learning_rate": 1e-3, "end_learning_rate": 1e-5, "total_iters": 40},
    ]})
    (sequential,) = modelzoo_params(params, backend="CPU")["trainer"]["init"]["schedulers"]
    assert [next(iter(s)) for s in sequential["SequentialLR"]["schedulers"]] == [
        "LinearLR", "ConstantLR", "ExponentialLR", "CosineDecayLR"]
    assert sequential["SequentialLR"]["schedulers"][2]["ExponentialLR"] == {
        "initial_learning_rate": 1e-3, "decay_rate": 0.5, "staircase": False, "total_iters": 20}
    assert modelzoo_params(tiny(**{"optimizer.learning_rate": 2e-4}))["trainer"]["init"]["schedulers"] == [
        {"ConstantLR": {"learning_rate": 2e-4}}]


def test_modelzoo_export_by_hand_needs_no_sdk(tmp_path: Path):
    import subprocess
    import sys

    out = tmp_path / "params.yaml"
    done = subprocess.run([sys.executable, "-m", "gpt2core.cerebras", "modelzoo", "--params", "gpt2_tiny",
                           "--out", str(out), "--train_data_dir", "/data/train"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(out.read_text())["trainer"]["fit"]["train_dataloader"]["data_dir"] == "/data/train"
    bad = subprocess.run([sys.executable, "-m", "gpt2core.cerebras", "modelzoo", "--params", "gpt2_nope",
                          "--out", str(out)], capture_output=True, text=True)
    assert bad.returncode == 2 and "gpt2_nope: no such config file" in bad.stderr


# ----------------------------------------------------------------------------- the cstorch flow (SDK venv)


def stage_metric(pipeline_run_id: str, stage: str, name: str) -> list[tuple[int, float]]:
    """(step, value) history of a metric of a stage's MLflow run, one value per step: the stage's
    closing summary repeats the last value (at the final step, or with no step: MLflow's step 0)."""
    import mlflow
    from mlflow import MlflowClient

    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list", filter_string=(
        f"tags.`gpt2ops.pipeline_run_id` = '{pipeline_run_id}' and tags.`gpt2ops.stage` = '{stage}'"))
    by_step = {m.step: m.value for m in MlflowClient().get_metric_history(run.info.run_id, name) if m.step > 0}
    return sorted(by_step.items())


@pytest.fixture(scope="module")
def cpu_run(sdk: str, tiny_dataset: Path, s3_server, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The train stage, target cerebras on the SDK's CPU backend: gpt2_tiny for TRAIN_STEPS, metrics
    to MLflow, model and cstorch checkpoints to S3 (SeaweedFS), exactly as the pipeline runs it."""
    from gpt2core.stages import run_stage
    from gpt2core.stages import train as train_stage

    root = tmp_path_factory.mktemp("cerebras_cpu")
    overrides = {"train_input.data_dir": str(tiny_dataset / "train"), "eval_input.data_dir": str(tiny_dataset / "val"),
                 "runconfig.max_steps": TRAIN_STEPS, "runconfig.log_steps": 2, "runconfig.checkpoint_steps": 5,
                 "runconfig.keep_last_checkpoints": 2, "runconfig.eval_steps": 4, "runconfig.sample_max_new_tokens": 4,
                 "optimizer.learning_rate": SCHEDULE}
    ctx = RunContext(pipeline_run_id=f"cerebras-{uuid.uuid4().hex[:8]}",
                     artifact_root=f"s3://{s3_server.bucket}/tests/cerebras-{uuid.uuid4().hex[:8]}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(cerebras.ENV_BACKEND, "CPU")
        reload_settings()
        result = run_stage("train", ctx, train_stage.Request(params="gpt2_tiny", overrides=overrides,
                                                             model_dir=str(root / "work"), target="cerebras"))
    return {"params": load_params("gpt2_tiny", overrides), "overrides": overrides, "ctx": ctx, "result": result,
            "root": root, "losses": stage_metric(ctx.pipeline_run_id, "train", "train/loss")}


def test_cpu_backend_trains_with_falling_loss_logged_to_mlflow(cpu_run: dict):
    losses = cpu_run["losses"]
    assert [step for step, _ in losses] == list(range(2, TRAIN_STEPS + 1, 2))
    values = [value for _, value in losses]
    assert math.isclose(values[0], math.log(50257), abs_tol=0.5)  # near-uniform start
    assert values[-1] < values[0] - 1.0, values
    metrics = cpu_run["result"].metrics
    assert metrics["train/steps"] == TRAIN_STEPS and metrics["train/loss"] == values[-1]
    assert metrics["train/tokens_per_s"] > 0


def test_cpu_backend_follows_the_torch_trainers_schedule(cpu_run: dict):
    from gpt2core.training.schedule import build_lr_scheduler

    reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = build_lr_scheduler(reference, cpu_run["params"].optimizer.learning_rate)
    expected = {}
    for step in range(1, TRAIN_STEPS + 1):  # the lr a step trains with, as the torch trainer sets it
        expected[step] = reference.param_groups[0]["lr"]
        reference.step()
        scheduler.step()
    logged = stage_metric(cpu_run["ctx"].pipeline_run_id, "train", "train/lr")
    assert [step for step, _ in logged] == list(range(2, TRAIN_STEPS + 1, 2))
    for step, lr in logged:
        assert math.isclose(lr, expected[step], rel_tol=1e-5, abs_tol=1e-9), step


def test_cpu_checkpoints_and_model_land_in_s3_and_evaluate_on_the_standard_path(cpu_run: dict, tiny_dataset: Path):
    from gpt2core.evaluation import eval_dataloader, evaluate_pass
    from gpt2core.model import GPT2
    from gpt2core.stages import evaluate as evaluate_stage
    from gpt2core.stages import run_stage
    from gpt2core.platform.artifacts import local_input

    outputs, params = cpu_run["result"].outputs, cpu_run["params"]
    # checkpoint_steps 5 over 12 steps: 5, 10 and the final 12; the last two are kept and published.
    with local_input(outputs["checkpoints"]) as folder:
        assert sorted(p.name for p in folder.iterdir() if p.suffix == ".mdl") == [
            "checkpoint_10.mdl", f"checkpoint_{TRAIN_STEPS}.mdl"]
    with local_input(outputs["model"]) as folder:
        assert {p.name for p in folder.iterdir()} >= {"model.safetensors", "config.json", "params.yaml",
                                                      MODELZOO_PARAMS_FILE}
        exported = yaml.safe_load((folder / MODELZOO_PARAMS_FILE).read_text())["trainer"]
        assert exported["init"]["loop"]["max_steps"] == TRAIN_STEPS
        assert exported["fit"]["train_dataloader"]["data_dir"] == str(tiny_dataset / "train")

    # The evaluate stage (torch 2.13) loads what cstorch (torch 2.4) trained, like any model artifact.
    evaluated = run_stage("evaluate", cpu_run["ctx"], evaluate_stage.Request(
        params="gpt2_tiny", model_dir=outputs["model"], overrides=cpu_run["overrides"])).metrics
    torch.manual_seed(params.runconfig.seed)
    untrained = evaluate_pass(GPT2(params.model), params, eval_dataloader(params, tiny_dataset / "val"),
                              device=torch.device("cpu"), eval_steps=None)  # the whole split, as the stage
    assert evaluated["eval/tokens"] == untrained["eval/tokens"]
    assert evaluated["eval/loss"] < untrained["eval/loss"] - 0.5, (untrained, evaluated)


def test_resume_from_the_published_checkpoints_continues_at_their_step(cpu_run: dict, tmp_path: Path):
    from gpt2core.stages import run_stage
    from gpt2core.stages import train as train_stage

    ctx = RunContext(pipeline_run_id=f"cerebras-resume-{uuid.uuid4().hex[:8]}",
                     artifact_root=cpu_run["ctx"].artifact_root)
    overrides = {**cpu_run["overrides"], "runconfig.max_steps": TRAIN_STEPS + 2, "runconfig.log_steps": 1}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(cerebras.ENV_BACKEND, "CPU")
        reload_settings()
        result = run_stage("train", ctx, train_stage.Request(
            params="gpt2_tiny", overrides=overrides, model_dir=str(tmp_path),
            checkpoint_path=cpu_run["result"].outputs["checkpoints"], target="cerebras"))
    resumed = stage_metric(ctx.pipeline_run_id, "train", "train/loss")
    assert [step for step, _ in resumed] == [TRAIN_STEPS + 1, TRAIN_STEPS + 2]
    # Trained weights and optimizer state came back: the loss goes on from where it was.
    assert resumed[0][1] < cpu_run["losses"][-1][1] + 0.5
    assert result.metrics["train/steps"] == TRAIN_STEPS + 2


def test_converting_a_bad_or_mismatched_checkpoint_is_a_data_error(cpu_run: dict, tmp_path: Path):
    from gpt2core.platform.artifacts import local_input, sha256_file

    bogus = tmp_path / "checkpoint_5.mdl"
    bogus.write_bytes(b"not an hdf5 file")
    with pytest.raises(DataError, match="not a readable cstorch checkpoint"):
        cerebras.convert_checkpoint(bogus, cpu_run["params"], tmp_path / "out", sha256=sha256_file(bogus))
    wider = cpu_run["params"].to_dict()
    wider["model"]["hidden_size"] *= 2
    with local_input(cpu_run["result"].outputs["checkpoints"]) as folder:
        checkpoint = folder / f"checkpoint_{TRAIN_STEPS}.mdl"
        with pytest.raises(DataError, match=r"do not fit the model config .*transformer\..* is \("):
            cerebras.convert_checkpoint(checkpoint, params_from_dict(wider), tmp_path / "out",
                                        sha256=sha256_file(checkpoint))
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_that_would_run_code_is_refused_unless_vouched_for_and_never_unpickled(sdk: str,
                                                                                          tmp_path: Path):
    marker = tmp_path / "code-ran"

    class RunsCode:  # what a tampered checkpoint holds: unpickling it runs a shell command
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    evil = tmp_path / "checkpoint_100.mdl"
    torch.save({"model": RunsCode()}, evil)  # the SDK loads a file that is not its H5 with torch.load
    from gpt2core.platform.artifacts import sha256_file

    with pytest.raises(DataError, match=r"refused to load a Cerebras checkpoint nobody vouched for"):
        cerebras.convert_checkpoint(evil, tiny(), tmp_path / "out", sha256=None)
    with pytest.raises(DataError, match=r"refused to load: its sha256 [0-9a-f]{16}\.\.\. is not the 0{16}"):
        cerebras.convert_checkpoint(evil, tiny(), tmp_path / "out", sha256="0" * 64)
    # Even a file someone vouched for loads through torch's safe unpickler only.
    with pytest.raises(DataError, match="not a readable cstorch checkpoint"):
        cerebras.convert_checkpoint(evil, tiny(), tmp_path / "out", sha256=sha256_file(evil))
    assert not marker.exists()


def test_csx_validate_traces_and_lowers_the_step_locally(sdk: str, tiny_dataset: Path, tmp_path: Path):
    params = csx_tiny(**{"model.num_hidden_layers": 1})
    report = cerebras.validate(params, data_dir=tiny_dataset / "train", work_dir=tmp_path, backend="CSX")
    assert (report["backend"], report["result"], report["half_dtype"]) == ("CSX", "validated locally", "cbfloat16")
    assert report["loss_scaling"] == "dynamic"  # the traced step went through cstorch.amp's GradScaler
    # The SDK wrote the traced step's MLIR, before and after lowering to its own dialect.
    assert report["lowered"]["torch.mlir"] > 10_000 and report["lowered"]["cirh.mlir"] > 10_000
    # The appliance's workers would mount the data and import gpt2core's loader.
    assert str((tiny_dataset / "train").resolve()) in report["mount_dirs"]
    assert str(Path(cerebras.__file__).resolve().parents[2]) in report["python_paths"]


def test_csx_compile_lowers_then_stops_at_the_appliance_naming_the_setting(sdk: str, tiny_dataset: Path,
                                                                           tmp_path: Path):
    params = csx_tiny(**{"model.num_hidden_layers": 1})
    with pytest.raises(ConfigError) as caught:
        cerebras.compile(params, data_dir=tiny_dataset / "train", work_dir=tmp_path, backend="CSX")
    message = str(caught.value)
    assert message.startswith("runconfig.mgmt_address: not set; the step was traced and lowered to MLIR here")
    assert "cirh.mlir" in message and "cluster management server" in message
    assert list((tmp_path / "cerebras_logs" / "executors").glob("*/cirh.mlir"))


def test_csx_training_needs_a_reachable_appliance(tiny_dataset: Path, tmp_path: Path):
    train = dict(data_dir=tiny_dataset / "train", model_dir=tmp_path / "m", checkpoint_dir=tmp_path / "c",
                 work_dir=tmp_path / "w")
    with pytest.raises(ConfigError, match=r"runconfig\.mgmt_address: not set; training on the CSX backend"):
        cerebras.train(csx_tiny(), **train)
    unreachable = csx_tiny(**{"runconfig.mgmt_address": f"127.0.0.1:{closed_port()}"})
    with pytest.raises(ConfigError, match=r"runconfig\.mgmt_address: cannot reach"):
        cerebras.train(unreachable, **train)


def test_modelzoo_export_refuses_a_padded_vocabulary():
    params = load_params("gpt2_tiny", {"model.padded_vocab_size": 50304})
    with pytest.raises(ConfigError, match=r"model.padded_vocab_size: 50304: the Model Zoo's GPT-2 has no padded"):
        modelzoo_params(params)
