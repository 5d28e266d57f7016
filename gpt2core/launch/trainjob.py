"""Training past one node: a Kubeflow Trainer (v2) TrainJob, created and followed by the train step.

The TrainJob references the TrainingRuntime `gpt2ops-torchrun` (k8s/base/trainer-runtime.yaml):
Trainer starts `numNodes` pods on the GPU pool, each running `torchrun --no-python gpt2ops train
ARGS` with the PET_* settings its torch plugin injects. Rank 0 of the whole job tracks in MLflow and
publishes the model and checkpoints to S3, as a single-node run does, so the step that launched the
job reads its results from there.

The job's name is derived from the pipeline run id: a retried step (its pod was lost) finds the job
its earlier attempt created and follows it instead of starting a second one.

Here, too, is the GPU node pool's placement (label and taint), defined once: the pipeline's defaults,
the Trainer runtime's pod template and docs/kubernetes.md all match it (tests/test_k8s.py checks).
This module uses the official `kubernetes` client and never imports kfp.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from gpt2core.errors import ConfigError, TrainingError
from gpt2core.platform.settings import settings

# The GPU node pool: nodes labelled gpt2ops.io/pool=gpu and tainted nvidia.com/gpu:NoSchedule (the
# taint keeps other pods off the GPUs, the toleration lets GPU steps on).
GPU_POOL_LABEL = ("gpt2ops.io/pool", "gpu")
GPU_NODE_SELECTOR: dict[str, str] = {GPU_POOL_LABEL[0]: GPU_POOL_LABEL[1]}
GPU_TAINT_KEY = "nvidia.com/gpu"
GPU_TOLERATIONS: list[dict[str, str]] = [
    {"key": GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}]
GPU_RESOURCE = "nvidia.com/gpu"

TRAINER_GROUP = "trainer.kubeflow.org"
TRAINER_VERSION = "v1alpha1"
TRAINJOB_PLURAL = "trainjobs"
RUNTIME_NAME = "gpt2ops-torchrun"
NODE_CONTAINER = "node"  # the runtime's container that Trainer drives (command, args, image)
# Trainer runs a TrainJob as a JobSet of the same name; JobSet labels every pod with its name.
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
PIPELINE_RUN_LABEL = "gpt2ops.io/pipeline-run-id"

ENV_TRAINER_IMAGE = "GPT2OPS_TRAINER_IMAGE"
ENV_NAMESPACE = "GPT2OPS_NAMESPACE"
SERVICE_ACCOUNT_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
NO_CLUSTER_HINT = ("num_nodes > 1 needs a Kubernetes cluster with Kubeflow Trainer v2; run the train "
                   "step in the cluster (service account gpt2ops-pipeline-runner, k8s/base/rbac.yaml) "
                   "or point KUBECONFIG at one, or use num_nodes=1")

LOG_TAIL_LINES = 40


def trainjob_name(pipeline_run_id: str) -> str:
    """The TrainJob of a pipeline run: the same for every attempt of its train step, a valid
    Kubernetes name, short enough for the JobSet's pod names and labels derived from it."""
    readable = re.sub(r"[^a-z0-9]+", "-", pipeline_run_id.lower()).strip("-")[:16].strip("-")
    digest = hashlib.sha256(pipeline_run_id.encode()).hexdigest()[:8]
    return "-".join(part for part in ("gpt2ops-train", readable, digest) if part)


def label_value(text: str) -> str:
    """`text` as a Kubernetes label value (<= 63 characters of [A-Za-z0-9._-], alphanumeric ends)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:63].strip("-_.")


def require_cluster_reachable(config: str, artifact_root: str) -> None:
    """The pods of a TrainJob run on other machines: the config and the artifact root must be
    somewhere every node can read, not this machine's disk."""
    from gpt2core.config import available_configs
    from gpt2core.platform.artifacts import is_s3

    if not (is_s3(config) or config.removesuffix(".yaml") in available_configs()):
        raise ConfigError(f"config {config!r}: with num_nodes > 1 the training pods cannot read a "
                          f"file of this machine; use a bundled config name "
                          f"({', '.join(available_configs())}) or upload the YAML to S3 and pass "
                          f"its s3:// URI")
    if not is_s3(artifact_root):
        raise ConfigError(f"artifact root {artifact_root!r}: with num_nodes > 1 the training pods "
                          f"publish to S3; use an s3://bucket/prefix")


@dataclass(frozen=True)
class TrainJobSpec:
    """One multi-node training run, as Kubeflow Trainer's TrainJob (trainer.kubeflow.org/v1alpha1)."""

    name: str
    namespace: str
    pipeline_run_id: str
    num_nodes: int
    procs_per_node: int
    gpus_per_node: int  # nvidia.com/gpu per node; 0 asks for none (CPU training)
    args: tuple[str, ...]  # `gpt2ops train` arguments; the runtime's command runs them under torchrun
    image: str | None = None  # None: the runtime's image
    deadline_s: int | None = None  # Trainer fails the job past this, even if nobody follows it
    runtime: str = RUNTIME_NAME

    def body(self) -> dict:
        trainer: dict[str, object] = {"numNodes": self.num_nodes,
                                      "numProcPerNode": self.procs_per_node, "args": list(self.args)}
        if self.gpus_per_node:
            gpus = {GPU_RESOURCE: str(self.gpus_per_node)}
            trainer["resourcesPerNode"] = {"limits": gpus, "requests": gpus}
        if self.image:
            trainer["image"] = self.image
        spec: dict[str, object] = {
            "runtimeRef": {"apiGroup": TRAINER_GROUP, "kind": "TrainingRuntime", "name": self.runtime},
            "trainer": trainer}
        if self.deadline_s:
            spec["activeDeadlineSeconds"] = self.deadline_s
        return {
            "apiVersion": f"{TRAINER_GROUP}/{TRAINER_VERSION}",
            "kind": "TrainJob",
            "metadata": {"name": self.name, "namespace": self.namespace,
                         "labels": {PIPELINE_RUN_LABEL: label_value(self.pipeline_run_id),
                                    "app.kubernetes.io/part-of": "gpt2ops"}},
            "spec": spec,
        }


def cluster_connection():  # noqa: ANN201 - (kubernetes.client.ApiClient, namespace)
    """An API client and namespace: in-cluster (the step's service account), else the kubeconfig
    ($KUBECONFIG or ~/.kube/config); $GPT2OPS_NAMESPACE overrides the namespace."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
        namespace = SERVICE_ACCOUNT_NAMESPACE_FILE.read_text().strip()
    except config.ConfigException as in_cluster:
        # Read now: the client's own default is $KUBECONFIG as it was when it was imported.
        kubeconfig = os.environ.get("KUBECONFIG") or "~/.kube/config"
        try:
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
            _, active = config.list_kube_config_contexts(config_file=kubeconfig)
            namespace = active["context"].get("namespace", "default")
        except (config.ConfigException, OSError) as exc:
            raise ConfigError(f"{NO_CLUSTER_HINT} (not in a cluster: {in_cluster}; kubeconfig "
                              f"{kubeconfig}: {exc})") from None
    return client.ApiClient(configuration), settings().namespace or namespace


class TrainJobLauncher:
    """Creates (or re-attaches to) a TrainJob and follows it to Complete or Failed."""

    def __init__(self, api_client, *, poll_s: float = 10.0, log_every_s: float = 60.0):  # noqa: ANN001
        from kubernetes import client

        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.poll_s = poll_s
        self.log_every_s = log_every_s

    def run(self, spec: TrainJobSpec, *, timeout_s: float) -> None:
        """Start the job and wait for it; on timeout, Ctrl-C or SIGTERM (the step was cancelled or
        timed out) the job is deleted so its GPUs are freed. A failed job is kept for its logs."""
        self.start(spec)
        with _sigterm_as_keyboard_interrupt():
            try:
                self.wait(spec, timeout_s=timeout_s)
            except KeyboardInterrupt:
                _say(f"interrupted: deleting TrainJob {spec.namespace}/{spec.name}")
                self.delete(spec)
                raise

    def start(self, spec: TrainJobSpec) -> None:
        from kubernetes.client.exceptions import ApiException

        where = f"TrainJob {spec.namespace}/{spec.name}"
        try:
            self._create(spec)
            _say(f"created {where}: {spec.num_nodes} nodes x {spec.procs_per_node} processes, "
                 f"runtime {spec.runtime}")
            return
        except ApiException as exc:
            if exc.status != 409:
                raise TrainingError(f"could not create {where}: HTTP {exc.status} {exc.reason} "
                                    f"{(exc.body or '')[:500]} (is Kubeflow Trainer v2 installed, with "
                                    f"TrainingRuntime {spec.runtime}, and may this service account "
                                    f"create trainjobs? see k8s/base/rbac.yaml)") from None
        existing = self._get(spec)
        owner = (existing or {}).get("metadata", {}).get("labels", {}).get(PIPELINE_RUN_LABEL)
        if existing and owner != label_value(spec.pipeline_run_id):
            raise TrainingError(f"{where} exists but belongs to pipeline run {owner!r}, not "
                                f"{spec.pipeline_run_id!r}; delete it: kubectl -n {spec.namespace} "
                                f"delete trainjob {spec.name}")
        if existing and _condition(existing, "Failed"):
            # A retried step retries training: the failed job (kept for its logs) makes way.
            _say(f"{where} of an earlier attempt failed: deleting it and starting a new one")
            self.delete(spec)
            self._wait_gone(spec)
            self._create(spec)
            return
        _say(f"{where} already exists (created by an earlier attempt of this step): following it")

    def wait(self, spec: TrainJobSpec, *, timeout_s: float) -> None:
        where = f"TrainJob {spec.namespace}/{spec.name}"
        started = time.monotonic()
        next_report = 0.0
        while True:
            job = self._get(spec)
            if job is None:
                raise TrainingError(f"{where} disappeared while running (deleted by someone else?)")
            if _condition(job, "Complete"):
                _say(f"{where} complete after {_duration(time.monotonic() - started)}")
                return
            failed = _condition(job, "Failed")
            if failed:
                raise TrainingError(self._failure_report(spec, failed))
            elapsed = time.monotonic() - started
            if elapsed >= timeout_s:
                self.delete(spec)
                raise TrainingError(f"{where} did not finish within {_duration(timeout_s)}: deleted "
                                    f"it (training resumes nowhere; raise the step's timeout or "
                                    f"lower max_steps)")
            if elapsed >= next_report:
                _say(f"{where}: running for {_duration(elapsed)}; pods: {self._pod_phases(spec)}")
                next_report += self.log_every_s
            time.sleep(self.poll_s)

    def delete(self, spec: TrainJobSpec) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.custom.delete_namespaced_custom_object(
                TRAINER_GROUP, TRAINER_VERSION, spec.namespace, TRAINJOB_PLURAL, spec.name,
                propagation_policy="Foreground")
        except ApiException as exc:
            if exc.status != 404:
                raise TrainingError(f"could not delete TrainJob {spec.namespace}/{spec.name}: HTTP "
                                    f"{exc.status} {exc.reason}; delete it by hand: kubectl -n "
                                    f"{spec.namespace} delete trainjob {spec.name}") from None

    def _create(self, spec: TrainJobSpec) -> None:
        self.custom.create_namespaced_custom_object(TRAINER_GROUP, TRAINER_VERSION, spec.namespace,
                                                    TRAINJOB_PLURAL, spec.body())

    def _get(self, spec: TrainJobSpec) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.custom.get_namespaced_custom_object(
                TRAINER_GROUP, TRAINER_VERSION, spec.namespace, TRAINJOB_PLURAL, spec.name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise TrainingError(f"could not read TrainJob {spec.namespace}/{spec.name}: HTTP "
                                f"{exc.status} {exc.reason}") from None

    def _wait_gone(self, spec: TrainJobSpec, timeout_s: float = 600.0) -> None:
        started = time.monotonic()
        while self._get(spec) is not None:
            if time.monotonic() - started > timeout_s:
                raise TrainingError(f"TrainJob {spec.namespace}/{spec.name} still exists "
                                    f"{_duration(timeout_s)} after deleting it; check its "
                                    f"finalizers: kubectl -n {spec.namespace} get trainjob "
                                    f"{spec.name} -o yaml")
            time.sleep(self.poll_s)

    def _pods(self, spec: TrainJobSpec) -> list:
        return self.core.list_namespaced_pod(
            spec.namespace, label_selector=f"{JOBSET_NAME_LABEL}={spec.name}").items

    def _pod_phases(self, spec: TrainJobSpec) -> str:
        pods = self._pods(spec)
        return ", ".join(f"{p.metadata.name}={p.status.phase if p.status else '?'}"
                         for p in pods) or "none yet"

    def _failure_report(self, spec: TrainJobSpec, condition: dict) -> str:
        from kubernetes.client.exceptions import ApiException

        pods = self._pods(spec)
        failed = [p for p in pods if p.status and p.status.phase == "Failed"] or pods
        parts = [f"TrainJob {spec.namespace}/{spec.name} failed: "
                 f"{condition.get('reason', '')}: {condition.get('message', '')}".rstrip(": ")]
        for pod in failed:
            name = pod.metadata.name
            try:
                tail = self.core.read_namespaced_pod_log(name, spec.namespace, container=NODE_CONTAINER,
                                                         tail_lines=LOG_TAIL_LINES)
            except ApiException as exc:
                tail = f"(log unavailable: HTTP {exc.status} {exc.reason})"
            parts.append(f"--- last {LOG_TAIL_LINES} log lines of pod {name} "
                         f"(kubectl -n {spec.namespace} logs {name} -c {NODE_CONTAINER}):\n"
                         f"{tail.rstrip()}")
        parts.append(f"all nodes' logs: kubectl -n {spec.namespace} logs -l "
                     f"{JOBSET_NAME_LABEL}={spec.name} -c {NODE_CONTAINER} --tail=-1")
        return "\n".join(parts)


def _condition(job: dict, kind: str) -> dict | None:
    """The condition `kind` (Trainer sets Created, Complete, Failed, Suspended) when it is True."""
    for condition in job.get("status", {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return condition
    return None


@contextlib.contextmanager
def _sigterm_as_keyboard_interrupt() -> Iterator[None]:
    """Kubernetes stops a step's pod with SIGTERM (cancelled run, step timeout): treat it as Ctrl-C
    so the job is deleted, not left holding GPUs. Signal handlers exist in the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame) -> None:  # noqa: ANN001
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _say(message: str) -> None:
    # The step's stdout is what the KFP UI shows while the step waits; logging is not set up there.
    print(f"[trainjob] {message}", flush=True)


def run_train_job(args: Sequence[str], *, pipeline_run_id: str, num_nodes: int, procs_per_node: int,
                  gpus_per_node: int, timeout_s: float, poll_s: float = 10.0,
                  log_every_s: float = 60.0) -> TrainJobSpec:
    """Run `gpt2ops train ARGS` on `num_nodes` nodes as a TrainJob and wait until it completes;
    raises TrainingError when it fails or times out. Returns the job it ran."""
    api_client, namespace = cluster_connection()
    spec = TrainJobSpec(name=trainjob_name(pipeline_run_id), namespace=namespace,
                        pipeline_run_id=pipeline_run_id, num_nodes=num_nodes,
                        procs_per_node=procs_per_node, gpus_per_node=gpus_per_node, args=tuple(args),
                        image=settings().trainer_image, deadline_s=int(timeout_s))
    with api_client:
        TrainJobLauncher(api_client, poll_s=poll_s, log_every_s=log_every_s).run(spec, timeout_s=timeout_s)
    return spec
