"""The gpt2ops-cpu image: a real stage runs in it against real data, and the failure modes a user
meets first (no daemon, no image, no wheels) give messages that say what to do.

Tests marked `docker` need a running daemon. Without one they are skipped, unless
GPT2OPS_REQUIRE_DOCKER=1 (CI sets it), which turns the skip into a failure. The cpu image is the one
`gpt2core.images.image_for("cpu")` names; when it is missing it is built here first
(`python -m containers.build cpu`, several minutes; CI builds it before pytest).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from unittest import mock

import pytest

from gpt2core.images import ImageError, docker_client, image_for, require_image
from gpt2core.platform.artifacts import local_input

REPO = Path(__file__).resolve().parents[1]
PLAYS = ("hamlet_gut.txt", "macbeth_gut.txt", "othello_gut.txt")  # ~0.5 MB of real English


@pytest.fixture(scope="module")
def client():
    try:
        return docker_client()
    except ImageError as exc:
        if os.environ.get("GPT2OPS_REQUIRE_DOCKER") == "1":
            pytest.fail(f"GPT2OPS_REQUIRE_DOCKER=1 but {exc}")
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def cpu_image(client) -> str:
    image = image_for("cpu")
    try:
        require_image(image, "cpu", client=client, current=True)
    except ImageError:  # missing, or built from older sources: (re)build it
        subprocess.run([sys.executable, "-m", "containers.build", "cpu"], cwd=REPO, check=True)
        image = image_for("cpu")
        require_image(image, "cpu", client=client)
    return image


def docker_run(image: str, *args: str, volumes: dict[str, str] = (), env: dict[str, str] = (),
               user: str | None = None, network: str | None = None) -> subprocess.CompletedProcess:
    command = ["docker", "run", "--rm"]
    for host_path, spec in dict(volumes).items():
        command += ["-v", f"{host_path}:{spec}"]
    for key, value in dict(env).items():
        command += ["-e", f"{key}={value}"]
    if user:
        command += ["--user", user]
    if network:
        command += ["--network", network]
    return subprocess.run([*command, image, *args], capture_output=True, text=True, timeout=600)


@pytest.mark.docker
def test_image_runs_gpt2ops_as_non_root(cpu_image, client):
    attrs = client.images.get(cpu_image).attrs
    assert attrs["Config"]["User"].split(":")[0] not in ("", "0", "root")
    assert attrs["Config"]["Labels"]["io.gpt2ops.target"] == "cpu"
    whoami = docker_run(cpu_image, "id", "-u")
    assert whoami.returncode == 0 and whoami.stdout.strip() == "1000", whoami.stderr
    # The entrypoint takes a subcommand with or without the leading `gpt2ops`.
    for args in (("preprocess", "--help"), ("gpt2ops", "preprocess", "--help")):
        shown = docker_run(cpu_image, *args)
        assert shown.returncode == 0 and "--max_seq_length" in shown.stdout, shown.stderr
    # Configs, torch (CPU build) and the components are inside.
    probe = docker_run(cpu_image, "python", "-c",
                       "import torch, components, pipelines; from gpt2core import config; "
                       "print(torch.__version__, config.available_configs()); "
                       "config.load_params('gpt2_tiny')")
    assert probe.returncode == 0, probe.stderr
    assert "+cpu" in probe.stdout and "gpt2_small" in probe.stdout


@pytest.mark.docker
def test_preprocess_stage_in_docker_writes_hdf5_to_s3(cpu_image, english_text_dir, tmp_path):
    """docker run IMAGE gpt2ops preprocess: local corpus in, HDF5 dataset out to S3, run in MLflow."""
    import h5py

    from gpt2core.data.verify import verify_dataset
    from gpt2core.platform.s3server import SeaweedS3Server

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in PLAYS:
        shutil.copy(english_text_dir / name, corpus / name)
    state = tmp_path / "state"  # the container's MLflow store, written as the calling user
    state.mkdir()
    run_id = uuid.uuid4().hex[:12]
    with SeaweedS3Server(tmp_path / "s3") as s3:
        result = docker_run(
            cpu_image, "gpt2ops", "preprocess", "--input_dir", "/data/corpus",
            "--max_seq_length", "128", "--val_fraction", "0.2", "--processes", "1",
            "--artifact_root", "s3://gpt2ops/runs", "--pipeline_run_id", run_id,
            volumes={str(corpus): "/data/corpus:ro", str(state): "/data/state"},
            env={**s3.env(), "MLFLOW_TRACKING_URI": "sqlite:////data/state/mlflow.db"},
            user=f"{os.getuid()}:{os.getgid()}", network="host")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

        # Scoped: the session's s3_server fixture owns the AWS_* variables outside this block.
        with mock.patch.dict(os.environ, s3.env()):
            with local_input(f"s3://gpt2ops/runs/{run_id}/preprocess/dataset") as dataset:
                dataset = Path(dataset)
                stats = verify_dataset(dataset / "train", max_seq_length=128)
                params = json.loads((dataset / "train" / "data_params.json").read_text())
                first = sorted((dataset / "train").glob("*.h5"))[0]
                with h5py.File(first) as f:
                    data = f["data"]
                    assert data.dtype == "int32" and data.shape[1:] == (3, 128)
                    assert f.attrs["n_examples"] == data.shape[0]
                assert sorted((dataset / "val").glob("*.h5"))
    assert params["h5_dataset_stats"]
    assert stats  # verify_dataset raises on any malformed file; it returns its summary
    assert (state / "mlflow.db").stat().st_size > 0  # the stage logged its run


@pytest.mark.docker
def test_missing_image_says_how_to_build_it(client):
    with pytest.raises(ImageError, match=r"python -m containers.build cpu"):
        require_image("gpt2ops-cpu:no-such-version", "cpu", client=client)


def test_unreachable_daemon_says_how_to_start_it(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(ImageError, match="cannot reach the Docker daemon.*dockerd"):
        docker_client()
    built = subprocess.run([sys.executable, "-m", "containers.build", "cpu"], cwd=REPO,
                           capture_output=True, text=True, env={**os.environ})
    assert built.returncode == 2
    assert "cannot reach the Docker daemon" in built.stderr and "Traceback" not in built.stderr


def test_cuda_build_without_its_torch_wheel_says_where_to_get_it():
    """A torch build no index has: the build stops with what to do, no traceback, and the cuda
    wheelhouse collected before (if any) is left as it was."""
    wheelhouse = REPO / ".build" / "containers" / "cuda" / "wheelhouse"
    before = sorted(p.name for p in wheelhouse.glob("*.whl"))
    env = {**os.environ, "PIP_RETRIES": "0", "PIP_TIMEOUT": "5"}
    built = subprocess.run(
        [sys.executable, "-m", "containers.build", "cuda", "--wheelhouse-only", "--rebuild-wheelhouse",
         "--torch-spec", "torch==2.13.0+cu999", "--torch-index-url", "http://127.0.0.1:9/simple"],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert built.returncode == 2, built.stdout[-2000:] + built.stderr[-2000:]
    assert "torch==2.13.0+cu999" in built.stderr and "--find-links" in built.stderr
    assert "Traceback" not in built.stderr
    assert sorted(p.name for p in wheelhouse.glob("*.whl")) == before
    assert not wheelhouse.with_name("wheelhouse.partial").exists()


def test_build_script_rejects_unknown_targets():
    built = subprocess.run([sys.executable, "-m", "containers.build", "tpu"], cwd=REPO,
                           capture_output=True, text=True)
    assert built.returncode == 2 and "unknown target(s) tpu" in built.stderr


@pytest.mark.docker
def test_image_built_from_other_sources_is_refused(cpu_image, client, monkeypatch):
    from gpt2core import images

    require_image(cpu_image, "cpu", client=client, current=True)  # the fixture's image is current
    monkeypatch.setattr(images, "source_digest", lambda: "0" * 16)  # as after an edit
    with pytest.raises(ImageError, match="other sources than this checkout.*containers.build cpu"):
        require_image(cpu_image, "cpu", client=client, current=True)


@pytest.mark.docker
def test_pipeline_run_with_a_missing_image_says_how_to_build_it(client, tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "gpt2core.cli", "run", "--runner", "docker",
         "--image", "gpt2ops-cpu:no-such-version", "--work_dir", str(tmp_path / "work")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert "gpt2ops-cpu:no-such-version" in run.stderr and "python -m containers.build cpu" in run.stderr


@pytest.mark.docker
@pytest.mark.slow
def test_whole_pipeline_runs_in_docker(cpu_image, english_text_dir, tmp_path):
    """gpt2ops run --runner docker: every step in a gpt2ops-cpu container (kfp.local.DockerRunner),
    against the embedded S3 and a sqlite MLflow store in the mounted work folder."""
    import tarfile

    work = tmp_path / "work"
    (work / "corpus").mkdir(parents=True)
    # Inside work_dir: the folder is mounted at the same path, so the step finds the archive there.
    # Two plays: the validation split needs at least two documents.
    source = work / "corpus" / "plays.tar.gz"
    with tarfile.open(source, "w:gz") as tar:
        for name in PLAYS[:2]:
            tar.add(english_text_dir / name, arcname=name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    run = subprocess.run(
        [sys.executable, "-m", "gpt2core.cli", "run", "--runner", "docker", "--image", cpu_image,
         "--work_dir", str(work), "--params", "gpt2_tiny", "--max_steps", "2",
         "--source", str(source), "--run_name", "docker-e2e"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    assert "pipeline run: FINISHED" in run.stdout, output[-6000:]
    stages = ("download", "preprocess", "validate", "compile", "train", "evaluate")
    assert run.stdout.count(f"Found image '{cpu_image}'") >= len(stages), output[-6000:]
    for stage in stages:
        assert "s3://gpt2ops/" in run.stdout and f"  {stage}" in run.stdout, stage
    # The steps ran as the caller: nothing they left in the work folder belongs to someone else.
    foreign = [p for p in work.rglob("*") if p.stat().st_uid != os.getuid()]
    assert not foreign, foreign[:5]


@pytest.mark.docker
def test_image_serves_mlflow_as_the_k8s_deployment_runs_it(cpu_image, tmp_path):
    """k8s/base/mlflow.yaml's command, args and settings, run in the image (read-only root, tmpfs
    /tmp and home as in the pod): the server answers, and artifacts logged through its proxy land
    in S3. Only the backend store differs: sqlite here instead of the Postgres StatefulSet."""
    import socket
    import time
    import urllib.request

    import boto3
    import yaml
    from mlflow.tracking import MlflowClient

    from gpt2core.platform.s3server import SeaweedS3Server

    docs = list(yaml.safe_load_all((REPO / "k8s" / "base" / "mlflow.yaml").read_text()))
    settings = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [f"--port={port}" if a.startswith("--port=") else
            "--backend-store-uri=sqlite:////tmp/mlflow.db" if a.startswith("--backend-store-uri=")
            else a for a in container["args"]]
    for key, value in settings.items():
        args = [a.replace(f"$({key})", value) for a in args]
    name = f"gpt2ops-mlflow-test-{uuid.uuid4().hex[:8]}"
    with SeaweedS3Server(tmp_path / "s3") as s3:
        env = {**settings, "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
               "MLFLOW_S3_ENDPOINT_URL": s3.endpoint}
        command = ["docker", "run", "-d", "--name", name, "--network", "host", "--read-only",
                   "--tmpfs", "/tmp", "--tmpfs", "/home/gpt2ops",
                   "--user", str(pod["securityContext"]["runAsUser"]),
                   "--entrypoint", container["command"][0]]
        for key, value in env.items():
            command += ["-e", f"{key}={value}"]
        subprocess.run([*command, cpu_image, *container["command"][1:], *args], check=True,
                       capture_output=True)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 240
            while True:
                try:
                    with urllib.request.urlopen(url + "/health", timeout=5) as response:
                        assert response.status == 200
                        break
                except OSError:
                    logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True)
                    assert time.monotonic() < deadline, logs.stdout[-3000:] + logs.stderr[-3000:]
                    time.sleep(2)
            client = MlflowClient(tracking_uri=url)
            run = client.create_run(client.create_experiment("k8s-config-check"))
            report = tmp_path / "report.txt"
            report.write_text("served through the artifact proxy\n")
            client.log_artifact(run.info.run_id, str(report))
            assert run.info.artifact_uri.startswith("mlflow-artifacts:")
            keys = [o["Key"] for o in boto3.client("s3", **{
                "endpoint_url": s3.endpoint, "aws_access_key_id": s3.access_key,
                "aws_secret_access_key": s3.secret_key, "region_name": "us-east-1",
            }).list_objects_v2(Bucket="gpt2ops", Prefix="mlflow/").get("Contents", [])]
            assert any(k.endswith(f"{run.info.run_id}/artifacts/report.txt") for k in keys), keys
        finally:
            subprocess.run(["docker", "rm", "-f", name], capture_output=True)


# What the cuda and cerebras images must show beyond the smoke check of their build: the torch build
# each runs (probed in the Python that trains), and a real training run of the train stage inside it.
TARGET_IMAGE_PROBES = {
    "cuda": ("python", "import torch, kfp, components; print(torch.__version__, torch.version.cuda)"),
    "cerebras": ("/opt/cerebras-sdk/bin/python",
                 "import torch, numpy, cerebras.pytorch as cstorch, gpt2core.cerebras; "
                 "print(torch.__version__, numpy.__version__, cstorch.__version__)"),
}


@pytest.mark.docker
@pytest.mark.parametrize("target", ["cuda", "cerebras"])
def test_target_image_trains_gpt2_tiny_from_s3(target, client, tiny_dataset, s3_server, tmp_path):
    """The cuda and cerebras images (several GB, 20-30 min to build: not built by CI; checked when
    present): kfp and the components import in the main venv, the right torch is where training
    runs, and `gpt2ops train` in the image trains from S3 data and publishes the model to S3: the
    cuda image on CPU (no GPU here), the cerebras image through its SDK venv on the SDK's CPU backend."""
    from gpt2core.platform.artifacts import upload_dir

    image = image_for(target)
    try:
        require_image(image, target, client=client)
    except ImageError as exc:
        pytest.skip(f"{exc} (optional: python -m containers.build {target})")
    python, probe_code = TARGET_IMAGE_PROBES[target]
    probe = docker_run(image, python, "-c", probe_code)
    assert probe.returncode == 0, probe.stderr[-3000:]
    if target == "cuda":
        torch_version, cuda_version = probe.stdout.split()
        assert torch_version.startswith("2.13.0") and cuda_version.startswith("13.")
    else:
        torch_version, numpy_version, sdk_version = probe.stdout.split()
        assert (torch_version.startswith("2.4.0"), numpy_version, sdk_version) == (True, "1.25.0", "2.10.0")
        kfp_probe = docker_run(image, "python", "-c", "import kfp, components.train.component")
        assert kfp_probe.returncode == 0, kfp_probe.stderr[-3000:]

    run_id = f"{target}-image-{uuid.uuid4().hex[:8]}"
    data_uri = f"s3://{s3_server.bucket}/tests/{run_id}/data"
    upload_dir(tiny_dataset / "train", f"{data_uri}/train")
    state = tmp_path / "state"
    state.mkdir()
    result = docker_run(
        image, "gpt2ops", "train", "--params", "gpt2_tiny", "--target",
        "cerebras" if target == "cerebras" else "cpu", "--max_steps", "3",
        "--set", f"train_input.data_dir={data_uri}/train",
        "--set", "runconfig.log_steps=1", "--set", "runconfig.checkpoint_steps=3",
        "--artifact_root", f"s3://{s3_server.bucket}/tests", "--pipeline_run_id", run_id,
        volumes={str(state): "/data/state"},
        env={**s3_server.env(), "MLFLOW_TRACKING_URI": "sqlite:////data/state/mlflow.db",
             "GPT2OPS_CEREBRAS_BACKEND": "CPU"},
        user=f"{os.getuid()}:{os.getgid()}", network="host")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout[result.stdout.rfind('{\n  "outputs"'):])
    assert report["metrics"]["train/loss"] > 0
    with local_input(report["outputs"]["model"]) as model:
        assert (Path(model) / "model.safetensors").stat().st_size > 1_000_000
