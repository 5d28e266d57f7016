"""Kubernetes settings of the pipeline steps (kfp-kubernetes). kfp.local ignores all of them.

Credentials come from two Secrets (templates in k8s/), never from pipeline parameters:
- `gpt2ops-s3`: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL (S3 / MinIO / SeaweedFS);
- `gpt2ops-mlflow`: MLFLOW_TRACKING_URI and MLFLOW_S3_ENDPOINT_URL, plus MLFLOW_TRACKING_USERNAME and
  MLFLOW_TRACKING_PASSWORD when the tracking server has authentication on (optional keys).
"""

from __future__ import annotations

from kfp import kubernetes

from gpt2core.launch.trainjob import GPU_RESOURCE

S3_SECRET = "gpt2ops-s3"
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")
MLFLOW_SECRET = "gpt2ops-mlflow"
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL")
MLFLOW_AUTH_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
SHM_SIZE = "16Gi"  # DataLoader workers and NCCL exchange tensors through /dev/shm


def bookkeeping(task, *, retry: bool = True) -> None:
    """Small uncached steps that talk to MLflow (open, record, close the parent run)."""
    task.set_caching_options(False)
    _credentials(task)
    task.set_cpu_request("100m").set_memory_request("256Mi").set_memory_limit("1Gi")
    if retry:
        task.set_retry(num_retries=3, backoff_duration="10s", backoff_factor=2.0,
                       backoff_max_duration="300s")


def io_step(task, *, cpu: str, memory: str) -> None:
    """Data steps: network and S3 bound, retried on transient failures."""
    _credentials(task)
    task.set_cpu_request(cpu).set_memory_request(memory).set_memory_limit(memory)
    task.set_retry(num_retries=3, backoff_duration="30s", backoff_factor=2.0,
                   backoff_max_duration="1800s")
    kubernetes.set_timeout(task, 6 * 3600)
    kubernetes.add_pod_label(task, "app.kubernetes.io/part-of", "gpt2ops")


def heavy_step(task, *, cpu: str, memory: str, timeout_s: int, node_selector, tolerations) -> None:
    """Model steps: placed on the chosen node pool, memory-backed /dev/shm, bounded run time."""
    _credentials(task)
    task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)
    # Few retries with a long backoff: a preempted node is worth retrying, a bad config is not (it
    # fails the same way in seconds). A retry is the same pipeline run: the train step (torch targets,
    # one node or a TrainJob) resumes from the newest checkpoint the lost attempt uploaded to
    # <run>/train/progress/ (only the steps after it run again); the cerebras
    # target and the other heavy steps start over.
    task.set_retry(num_retries=2, backoff_duration="120s", backoff_factor=2.0,
                   backoff_max_duration="3600s")
    kubernetes.set_timeout(task, timeout_s)
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                               size_limit=SHM_SIZE)
    kubernetes.add_node_selector_json(task, node_selector)
    tolerate(task, tolerations)
    kubernetes.add_pod_label(task, "app.kubernetes.io/part-of", "gpt2ops")


def tolerate(task, tolerations) -> None:
    """Add tolerations (a JSON list parameter) to those the task already has."""
    kubernetes.add_toleration_json(task, tolerations)


def gpus(task, count) -> None:
    task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(count)


def _credentials(task) -> None:
    kubernetes.use_secret_as_env(task, secret_name=S3_SECRET,
                                 secret_key_to_env={k: k for k in S3_SECRET_KEYS})
    kubernetes.use_secret_as_env(task, secret_name=MLFLOW_SECRET,
                                 secret_key_to_env={k: k for k in MLFLOW_SECRET_KEYS})
    kubernetes.use_secret_as_env(task, secret_name=MLFLOW_SECRET,
                                 secret_key_to_env={k: k for k in MLFLOW_AUTH_KEYS}, optional=True)
