"""Multi-node training through a Kubeflow Trainer TrainJob (gpt2core/trainjob.py).

No Kubernetes API server runs here, so that one thing is faked, at the outermost edge: a small HTTP
server answering the REST calls the real `kubernetes` client makes (create/get/delete trainjobs, list
pods by label, read a pod's log), reached through a kubeconfig file. It checks each TrainJob against
the Trainer API models, then runs it for real on this machine, as Trainer would on a cluster:
numNodes local processes of the TrainingRuntime's command (rendered from k8s/base) plus the job's
args, with the PET_* torchrun settings Trainer's torch plugin injects and the S3/MLflow environment
the runtime's secrets give, each node in its own working folder. The processes' exit codes set the
Complete/Failed condition, their output is the pod log.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from gpt2core.launch import launch, trainjob
from gpt2core.errors import ConfigError, TrainingError
from gpt2core.platform.settings import reload_settings
from gpt2core.platform.context import RunContext
from test_k8s import K8S, render

NAMESPACE = "gpt2ops-test"
TRAINJOBS = re.compile(rf"^/apis/{trainjob.TRAINER_GROUP}/{trainjob.TRAINER_VERSION}/namespaces/"
                       rf"(?P<ns>[^/]+)/{trainjob.TRAINJOB_PLURAL}(?:/(?P<name>[^/]+))?$")
PODS = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods(?:/(?P<name>[^/]+)/log)?$")
# The smallest model that still trains: seconds per node on 2 CPU cores.
MICRO = {"model.hidden_size": 32, "model.num_hidden_layers": 1, "model.num_heads": 2,
         "model.filter_size": 128, "train_input.max_sequence_length": 64,
         "eval_input.max_sequence_length": 64, "train_input.batch_size": 4,
         "eval_input.batch_size": 4, "runconfig.log_steps": 1, "runconfig.eval_steps": 2,
         "runconfig.checkpoint_steps": 2, "runconfig.torch_compile": False}


def assert_valid_trainjob(body: dict) -> None:
    """A TrainJob that survives a round trip through the Trainer API models unchanged has no
    misspelt, unknown or mistyped field."""
    from kubeflow_trainer_api import models

    assert body["apiVersion"] == f"{trainjob.TRAINER_GROUP}/{trainjob.TRAINER_VERSION}"
    assert body["kind"] == "TrainJob"
    round_trip = models.TrainerV1alpha1TrainJob.from_dict(body).to_dict()
    assert json.loads(json.dumps(round_trip)) == body, "TrainJob changed in a round trip"


@dataclass
class FakeNode:
    """One TrainJob node: a process running the runtime's command, as a pod would."""

    pod: str
    process: subprocess.Popen
    log: Path


@dataclass
class FakeJob:
    body: dict
    nodes: list[FakeNode] = field(default_factory=list)

    def conditions(self) -> list[dict]:
        codes = [node.process.poll() for node in self.nodes]
        failed = [(node.pod, code) for node, code in zip(self.nodes, codes) if code not in (None, 0)]
        if failed:
            # JobSet's failure policy: one failed node fails the job and stops the others.
            for node in self.nodes:
                if node.process.poll() is None:
                    node.process.kill()
            return [{"type": "Failed", "status": "True", "reason": "FailedJobs",
                     "message": "jobset failed: " + ", ".join(f"{pod} exited with code {code}"
                                                              for pod, code in failed)}]
        if all(code == 0 for code in codes):
            return [{"type": "Complete", "status": "True", "reason": "JobsCompleted",
                     "message": "jobset completed"}]
        return [{"type": "Created", "status": "True", "reason": "JobsCreated", "message": ""}]

    def stop(self) -> None:
        for node in self.nodes:
            if node.process.poll() is None:
                node.process.kill()
            node.process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeCluster(ThreadingHTTPServer):
    def __init__(self, work_dir: Path):
        super().__init__(("127.0.0.1", 0), FakeKubernetesApi)
        self.work_dir = work_dir
        self.jobs: dict[str, FakeJob] = {}
        self.created: list[str] = []  # names of the jobs actually started
        self.requests: list[tuple[str, str]] = []
        runtime_object = next(o for o in render(K8S / "base")
                              if o["kind"] == "TrainingRuntime"
                              and o["metadata"]["name"] == trainjob.RUNTIME_NAME)
        pod = runtime_object["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"][
            "template"]["spec"]
        self.container = next(c for c in pod["containers"] if c["name"] == trainjob.NODE_CONTAINER)

    def start(self, body: dict) -> FakeJob:
        """Run the TrainJob's nodes as local processes, with what Trainer's torch plugin sets."""
        name, trainer = body["metadata"]["name"], body["spec"]["trainer"]
        job = FakeJob(body)
        port = free_port()
        venv_bin = str(Path(sys.executable).parent)  # torchrun and gpt2ops, as on the image's PATH
        for rank in range(trainer["numNodes"]):
            pod = f"{name}-node-0-{rank}-fake"
            # each node its own disk; a job made again under the same name gets fresh ones
            folder = self.work_dir / f"{name}-{len(self.created)}" / f"node-{rank}"
            folder.mkdir(parents=True)
            env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
                   "PET_NNODES": str(trainer["numNodes"]),
                   "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
                   "PET_NODE_RANK": str(rank), "PET_MASTER_ADDR": "127.0.0.1",
                   "PET_MASTER_PORT": str(port)}
            log = folder / "pod.log"
            with log.open("wb") as out:
                process = subprocess.Popen([*self.container["command"], *trainer["args"]], cwd=folder,
                                           env=env, stdout=out, stderr=subprocess.STDOUT)
            job.nodes.append(FakeNode(pod, process, log))
        self.created.append(name)
        return job

    def pods(self, name: str) -> list[dict]:
        job = self.jobs.get(name)
        phases = {None: "Running", 0: "Succeeded"}
        return [{"metadata": {"name": node.pod, "namespace": NAMESPACE,
                              "labels": {trainjob.JOBSET_NAME_LABEL: name}},
                 "status": {"phase": phases.get(node.process.poll(), "Failed")}}
                for node in (job.nodes if job else [])]

    def stop_all(self) -> None:
        for job in self.jobs.values():
            job.stop()


class FakeKubernetesApi(BaseHTTPRequestHandler):
    server: FakeCluster

    def _send(self, code: int, body: dict | str) -> None:
        data = (json.dumps(body) if isinstance(body, dict) else body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json" if isinstance(body, dict) else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str) -> None:
        self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                          "reason": reason, "message": message, "code": code})

    def _route(self) -> tuple[str, re.Match | None, re.Match | None]:
        url = urlparse(self.path)
        self.server.requests.append((self.command, url.path))
        return url.query, TRAINJOBS.match(url.path), PODS.match(url.path)

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        _, jobs, _ = self._route()
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not jobs or jobs["name"]:
            return self._status(404, "NotFound", self.path)
        try:
            assert_valid_trainjob(body)
        except (AssertionError, ValueError) as exc:
            return self._status(422, "Invalid", f"TrainJob is invalid: {exc}")
        name = body["metadata"]["name"]
        if name in self.server.jobs:
            return self._status(409, "AlreadyExists", f'trainjobs.trainer.kubeflow.org "{name}" '
                                                      f"already exists")
        self.server.jobs[name] = self.server.start(body)
        self._send(201, body)

    def do_GET(self) -> None:  # noqa: N802
        query, jobs, pods = self._route()
        if jobs and jobs["name"]:
            job = self.server.jobs.get(jobs["name"])
            if job is None:
                return self._status(404, "NotFound", f"trainjob {jobs['name']} not found")
            return self._send(200, {**job.body, "status": {"conditions": job.conditions()}})
        if pods and pods["name"]:  # a pod's log
            tail = int(parse_qs(query).get("tailLines", ["1000000"])[0])
            for job in self.server.jobs.values():
                for node in job.nodes:
                    if node.pod == pods["name"]:
                        lines = node.log.read_text(errors="replace").splitlines()[-tail:]
                        return self._send(200, "\n".join(lines) + "\n")
            return self._status(404, "NotFound", f"pod {pods['name']} not found")
        if pods:
            selector = parse_qs(query)["labelSelector"][0]
            key, _, value = selector.partition("=")
            assert key == trainjob.JOBSET_NAME_LABEL, selector
            return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {},
                                    "items": self.server.pods(value)})
        self._status(404, "NotFound", self.path)

    def do_DELETE(self) -> None:  # noqa: N802
        _, jobs, _ = self._route()
        job = self.server.jobs.pop(jobs["name"], None) if jobs and jobs["name"] else None
        if job is None:
            return self._status(404, "NotFound", self.path)
        job.stop()
        self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """The fake API server, and a kubeconfig pointing the real client at it (not in a cluster)."""
    server = FakeCluster(tmp_path / "nodes")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
        "users": [{"name": "fake", "user": {"token": "not-a-secret"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake",
                                                  "namespace": NAMESPACE}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # so not "in cluster"
    monkeypatch.delenv(trainjob.ENV_NAMESPACE, raising=False)
    reload_settings()
    yield server
    server.shutdown()
    server.server_close()
    server.stop_all()


def micro_request(dataset_uri: str, max_steps: int, params: str = "gpt2_tiny", target: str = "cpu"):  # noqa: ANN201
    from gpt2core.stages import train

    return train.Request(params=params, dataset=dataset_uri, max_steps=max_steps, overrides=MICRO, target=target)


@pytest.fixture
def s3_dataset(tiny_dataset_64, s3_root) -> str:
    from gpt2core.platform.artifacts import upload_dir

    uri = f"{s3_root}/dataset"
    upload_dir(tiny_dataset_64, uri)
    return uri


@pytest.mark.slow
def test_two_node_trainjob_trains_publishes_and_reattaches(cluster, s3_dataset, s3_root,
                                                           monkeypatch):
    """2 nodes x 1 process on CPU (gloo): rank 0 of the job publishes the model and checkpoints
    and logs to MLflow; the step's function returns them. A retried step re-attaches to the job."""
    from mlflow.tracking import MlflowClient

    from gpt2core.platform import tracking
    from gpt2core.platform.artifacts import read_manifest

    monkeypatch.setenv(trainjob.ENV_TRAINER_IMAGE, "registry.example/gpt2ops-cuda:test")
    reload_settings()
    ctx = RunContext(pipeline_run_id="kfp-run-2nodes", artifact_root=s3_root,
                     experiment="trainjob-test")
    ctx = dataclasses.replace(ctx, parent_run_id=tracking.start_pipeline_run(ctx))
    on_two_nodes = dict(nproc_per_node=1, num_nodes=2, poll_s=0.2)

    result = launch("train", ctx, micro_request(s3_dataset, 4), **on_two_nodes)

    name = trainjob.trainjob_name(ctx.pipeline_run_id)
    assert cluster.created == [name]
    job = cluster.jobs[name]
    assert [node.process.returncode for node in job.nodes] == [0, 0]
    trainer = job.body["spec"]["trainer"]
    assert trainer["numNodes"] == 2 and trainer["image"] == "registry.example/gpt2ops-cuda:test"
    assert job.body["metadata"]["labels"][trainjob.PIPELINE_RUN_LABEL] == ctx.pipeline_run_id
    assert result.outputs == {"model": ctx.artifact_uri("train", "model"),
                              "checkpoints": ctx.artifact_uri("train", "checkpoints")}
    def files(uri: str) -> set[str]:
        return {entry["path"] for entry in read_manifest(uri)["files"]}

    assert "model.safetensors" in files(result.outputs["model"])
    assert "checkpoint_00000004.pt" in files(result.outputs["checkpoints"])
    assert result.metrics["train/steps"] == 4 and 0 < result.metrics["train/loss"] < 12
    client = MlflowClient()
    (child,) = client.search_runs(
        [client.get_run(ctx.parent_run_id).info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{ctx.parent_run_id}'")
    assert child.info.run_name == "train" and child.info.status == "FINISHED"
    assert len(client.get_metric_history(child.info.run_id, "train/loss")) >= 4
    # each node trained in its own folder (no shared disk); only rank 0's tracked and published
    logs = [node.log.read_text() for node in job.nodes]
    assert '"outputs"' in logs[0] and '"outputs"' not in logs[1]

    again = launch("train", ctx, micro_request(s3_dataset, 4), **on_two_nodes)  # the step, retried
    assert cluster.created == [name]  # no second job: 409, then followed to its end
    assert [m for m, p in cluster.requests if m == "POST"] == ["POST", "POST"]
    assert again == result


def test_a_failed_job_is_reported_then_replaced_by_a_retry_and_a_timeout_deletes_it(cluster):
    """A failed job: an error naming it, with its pods' log tails and the kubectl commands; the
    job is kept for its logs until a retried step replaces it. A job that overruns is deleted."""
    from gpt2core.launch.trainjob import TrainJobLauncher, TrainJobSpec, cluster_connection

    api_client, namespace = cluster_connection()
    assert namespace == NAMESPACE
    name = trainjob.trainjob_name("kfp-run-fails")
    spec = TrainJobSpec(name=name, namespace=namespace, pipeline_run_id="kfp-run-fails",
                        num_nodes=1, procs_per_node=1, gpus_per_node=0,
                        args=("--params", "gpt2_tiny", "--set", "runconfig.max_steps=many"))
    launcher = TrainJobLauncher(api_client, poll_s=0.1)
    launcher.start(spec)
    with pytest.raises(TrainingError) as caught:
        launcher.wait(spec, timeout_s=600)
    message = str(caught.value)
    assert f"TrainJob {NAMESPACE}/{name} failed: FailedJobs: jobset failed" in message
    assert "runconfig.max_steps" in message  # the pod's own error, from its log tail
    assert f"kubectl -n {NAMESPACE} logs {name}-node-0-0-fake -c node" in message
    assert f"kubectl -n {NAMESPACE} logs -l {trainjob.JOBSET_NAME_LABEL}={name}" in message
    assert name in cluster.jobs  # kept for its logs

    launcher.start(spec)  # the retried step: 409, the job failed, so a new one
    assert cluster.created == [name, name]
    with pytest.raises(TrainingError, match="did not finish within 0m00s: deleted it"):
        launcher.wait(spec, timeout_s=0)
    assert name not in cluster.jobs


def test_trainjob_body_validates_against_the_trainer_api():
    spec = trainjob.TrainJobSpec(name=trainjob.trainjob_name("6f1c2d3e-aaaa-bbbb-cccc-0123456789ab"),
                                 namespace="gpt2ops", pipeline_run_id="6f1c2d3e-aaaa-bbbb-cccc-0123456789ab",
                                 num_nodes=4, procs_per_node=8, gpus_per_node=8,
                                 args=("--params", "gpt2_xl", "--target", "gpu"),
                                 image="gpt2ops-cuda:0.1.0", deadline_s=3600)
    body = spec.body()
    assert_valid_trainjob(body)
    assert body["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                          "name": "gpt2ops-torchrun"}
    assert body["spec"]["trainer"]["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "8"}
    broken = json.loads(json.dumps(body))
    broken["spec"]["trainer"]["numNode"] = 4
    with pytest.raises(AssertionError, match="round trip"):
        assert_valid_trainjob(broken)


def test_trainjob_names_are_stable_valid_and_short():
    name = trainjob.trainjob_name("Run_With/Odd.Chars-" + "x" * 80)
    assert name == trainjob.trainjob_name("Run_With/Odd.Chars-" + "x" * 80)
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 40
    assert name != trainjob.trainjob_name("Run_With/Odd.Chars-" + "x" * 79)


def test_no_cluster_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    ctx = RunContext(pipeline_run_id="r", artifact_root="s3://bucket/runs")
    with pytest.raises(ConfigError, match="num_nodes > 1 needs a Kubernetes cluster with Kubeflow "
                                          "Trainer v2"):
        launch("train", ctx, micro_request("s3://bucket/data", 1, target="gpu"), nproc_per_node=8, num_nodes=2)


def test_pods_must_be_able_to_read_the_config_and_artifact_root(tmp_path):
    local_config = tmp_path / "mine.yaml"
    local_config.write_text((K8S.parent / "configs" / "gpt2_tiny.yaml").read_text())
    on_nodes = dict(nproc_per_node=8, num_nodes=2)
    with pytest.raises(ConfigError, match=r"mine.yaml.*cannot read a file of this machine.*s3://"):
        launch("train", RunContext("r", "s3://b/runs"), micro_request("s3://b/data", 1, str(local_config), "gpu"),
               **on_nodes)
    with pytest.raises(ConfigError, match=r"artifact root .*: with num_nodes > 1 .*s3://"):
        launch("train", RunContext("r", str(tmp_path)), micro_request("s3://b/data", 1, target="gpu"), **on_nodes)
