"""A step's settings (``pipelines.definition.StepSettings``) as Kubernetes settings of its KFP task
(kfp-kubernetes). kfp.local ignores all of them.

Credentials come from two Secrets (templates in k8s/), never from pipeline parameters:
- `gpt2ops-s3`: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL (S3 / MinIO / SeaweedFS);
- `gpt2ops-mlflow`: MLFLOW_TRACKING_URI and MLFLOW_S3_ENDPOINT_URL, plus MLFLOW_TRACKING_USERNAME and
  MLFLOW_TRACKING_PASSWORD when the tracking server has authentication on (optional keys).
"""

from __future__ import annotations

from collections.abc import Mapping

from kfp import kubernetes

from gpt2core.launch.trainjob import ENV_TRAINER_IMAGE, GPU_RESOURCE
from pipelines.definition import (MLFLOW_AUTH_KEYS, MLFLOW_SECRET, MLFLOW_SECRET_KEYS, S3_SECRET,
                                  S3_SECRET_KEYS, StepSettings)

__all__ = ["MLFLOW_AUTH_KEYS", "MLFLOW_SECRET", "MLFLOW_SECRET_KEYS", "S3_SECRET", "S3_SECRET_KEYS", "configure"]


def configure(task, settings: StepSettings, form: Mapping[str, object]) -> None:
    """Give a KFP task its step's settings; ``form``: the pipeline's parameters (placement reads
    its node selector, tolerations and GPU count from them)."""
    from gpt2core.images import image_for

    task.set_container_image(image_for(settings.image))
    if not settings.cached:
        task.set_caching_options(False)
    _credentials(task)
    setters = {("requests", "cpu"): task.set_cpu_request, ("limits", "cpu"): task.set_cpu_limit,
               ("requests", "memory"): task.set_memory_request, ("limits", "memory"): task.set_memory_limit}
    for (kind, resource), setter in setters.items():
        value = getattr(settings.resources, kind).get(resource)
        if value:
            setter(value)
    if settings.retry:
        retry = settings.retry
        task.set_retry(num_retries=retry.limit, backoff_duration=f"{retry.backoff_s}s",
                       backoff_factor=retry.factor, backoff_max_duration=f"{retry.max_backoff_s}s")
    if settings.timeout_s:
        kubernetes.set_timeout(task, settings.timeout_s)
    placement = settings.placement
    if placement:
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=placement.shm_size)
        kubernetes.add_node_selector_json(task, form[placement.node_selector])
        for tolerations in placement.tolerations:  # kfp-kubernetes adds to those the task has
            kubernetes.add_toleration_json(task, form[tolerations])
    for key, value in settings.pod_labels.items():
        kubernetes.add_pod_label(task, key, value)
    if placement and placement.gpus:
        task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(form[placement.gpus])
    if settings.trainer_image:  # what the TrainJob nodes the step may launch run
        task.set_env_variable(ENV_TRAINER_IMAGE, image_for(settings.trainer_image))


def _credentials(task) -> None:
    kubernetes.use_secret_as_env(task, secret_name=S3_SECRET,
                                 secret_key_to_env={k: k for k in S3_SECRET_KEYS})
    kubernetes.use_secret_as_env(task, secret_name=MLFLOW_SECRET,
                                 secret_key_to_env={k: k for k in MLFLOW_SECRET_KEYS})
    kubernetes.use_secret_as_env(task, secret_name=MLFLOW_SECRET,
                                 secret_key_to_env={k: k for k in MLFLOW_AUTH_KEYS}, optional=True)
