"""Experiment tracking (MLflow): a parent run per pipeline run, a child run per stage, a registry.
Every MLflow call of gpt2ops, components and pipelines goes through here.

    with stage_run("train", ctx, params=params.to_flat_dict(),
                   tags={TAG_CONFIG_HASH: params.config_hash()}) as tracked:
        tracked.log_metrics({"train/loss": loss}, step=step)

- Store: ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory. An
  unreachable store fails fast with a TrackingError naming the URI (credentials in it redacted).
- Artifacts (reports, plots, models) go where the experiment says; a new experiment is created
  with its artifact location under the pipeline's artifact root (``<root>/mlflow``), so with an
  s3:// root MLflow writes into the same S3 as the stages (``MLFLOW_S3_ENDPOINT_URL``).
- Every run is tagged with the stage, pipeline run id, git sha, config hash and dataset hash
  (``gpt2ops.*`` tags, all named in ``tags``) and records system metrics (CPU, memory, GPU); the
  datasets a stage read and wrote are its run's MLflow dataset inputs (``StageRun.log_datasets``).
- The experiment is marked as model training; ``runs_page`` is the UI page of a pipeline run's runs.
- Models: safetensors weights + params.yaml logged as an MLflow (pyfunc) model, registered; the
  ``champion`` alias moves only when a challenger scores better on the same eval set.

Modules: ``tags`` (every tag name), ``connection`` (URI, client, errors), ``runs`` (parent and
stage runs, logging), ``queries`` (finding runs, reading histories), ``registry``, ``plots``
(matplotlib PNGs).
"""

from gpt2core.platform.tracking.connection import tracking_uri
from gpt2core.platform.tracking.plots import (LOSS_CURVE_FILE, curves_png, loss_curve_artifact_uri,
                                              loss_curve_png)
from gpt2core.platform.tracking.queries import (PipelineRunRecord, find_parent_run, find_pipeline_run,
                                                find_stage_runs, metric_histories, published_record,
                                                runs_page, stage_run_id)
from gpt2core.platform.tracking.registry import (champion_version, default_model_name, download_model_version,
                                                 find_model_version, promote_if_better, tagged_score)
from gpt2core.platform.tracking.runs import (DatasetUse, StageRun, close_orphaned_runs, end_pipeline_run,
                                             pipeline_run, record_pipeline_results, record_published,
                                             stage_run, start_pipeline_run)
from gpt2core.platform.tracking.tags import (CHALLENGER, CHAMPION, DATASET_EVALUATION, DATASET_INPUT,
                                             DATASET_OUTPUT, DATASET_TRAINING, TAG_CONFIG_HASH,
                                             TAG_DATASET_HASH,
                                             TAG_ERROR, TAG_GIT_SHA, TAG_KIND, TAG_MODEL_URI,
                                             TAG_MODEL_VERSION, TAG_PIPELINE_RUN, TAG_PROMOTED, TAG_STAGE,
                                             TAG_TARGET)

__all__ = [
    "CHALLENGER", "CHAMPION", "DATASET_EVALUATION", "DATASET_INPUT", "DATASET_OUTPUT", "DATASET_TRAINING",
    "DatasetUse", "LOSS_CURVE_FILE", "PipelineRunRecord", "StageRun", "TAG_CONFIG_HASH",
    "TAG_DATASET_HASH", "TAG_ERROR", "TAG_GIT_SHA", "TAG_KIND", "TAG_MODEL_URI", "TAG_MODEL_VERSION",
    "TAG_PIPELINE_RUN", "TAG_PROMOTED", "TAG_STAGE", "TAG_TARGET", "champion_version", "close_orphaned_runs",
    "curves_png",
    "default_model_name", "download_model_version", "end_pipeline_run", "find_model_version",
    "find_parent_run", "find_pipeline_run", "find_stage_runs", "loss_curve_artifact_uri",
    "loss_curve_png", "metric_histories", "pipeline_run", "promote_if_better", "published_record",
    "record_pipeline_results", "record_published", "runs_page", "stage_run", "stage_run_id",
    "start_pipeline_run",
    "tagged_score", "tracking_uri",
]
