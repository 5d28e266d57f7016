"""Every tag and alias name gpt2ops sets on MLflow runs and model versions or searches by, defined
once here; nothing outside tracking spells one out."""

# On every run
TAG_KIND = "gpt2ops.kind"  # KIND_PIPELINE (the parent run of a pipeline run) or KIND_STAGE
KIND_PIPELINE, KIND_STAGE = "pipeline", "stage"
TAG_PIPELINE_RUN = "gpt2ops.pipeline_run_id"
TAG_GIT_SHA = "gpt2ops.git_sha"
TAG_ERROR = "gpt2ops.error"  # the error a run FAILED with (one line, at most 5000 characters)

# On stage runs
TAG_STAGE = "gpt2ops.stage"
TAG_CONFIG_HASH = "gpt2ops.config_hash"  # Params.config_hash()
TAG_DATASET_HASH = "gpt2ops.dataset_hash"  # artifact_digest of the data (also on model versions)
TAG_TARGET = "gpt2ops.target"  # cpu | gpu | cerebras

# On every stage run, for each artifact it published (what a reader that unpickles it checks):
# gpt2ops.published.<artifact name> = "<manifest digest> <URI>" (published_tag)
TAG_PUBLISHED_PREFIX = "gpt2ops.published."

# On the promote run and the parent run: the decision; on the parent also every artifact's URI
TAG_MODEL_VERSION = "gpt2ops.model_version"
TAG_PROMOTED = "gpt2ops.promoted"  # "True" | "False"
TAG_ARTIFACT_PREFIX = "artifact."  # artifact.<stage>/<artifact> -> URI

# On model versions
TAG_MODEL_URI = "gpt2ops.model_uri"  # the train stage's model artifact the version was logged from
CHAMPION, CHALLENGER = "champion", "challenger"  # registered model aliases

# What a stage did with a dataset it logged as a run input (shown beside the dataset in MLflow's UI)
DATASET_TRAINING, DATASET_EVALUATION = "training", "evaluation"  # trained on / scored on
DATASET_INPUT, DATASET_OUTPUT = "input", "output"  # read otherwise (checked, tokenized) / written

# MLflow's own tags that gpt2ops sets or searches by
MLFLOW_RUN_NAME = "mlflow.runName"
MLFLOW_PARENT_RUN = "mlflow.parentRunId"
MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"

MLFLOW_DATASET_CONTEXT = "mlflow.data.context"  # on a dataset input: DATASET_*
# On the experiment: its kind, model training (not GenAI). MLflow 3 UIs that read it open the
# experiment on its runs; 3.17's follows its GenAI/Model-training switch instead (queries.runs_page).
MLFLOW_EXPERIMENT_KIND, EXPERIMENT_KIND_TRAINING = "mlflow.experimentKind", "custom_model_development"


def published_tag(name: str, uri: str, digest: str) -> tuple[str, str]:
    """(key, value) of the tag recording that artifact ``name`` with manifest digest ``digest`` was
    published at uri."""
    return f"{TAG_PUBLISHED_PREFIX}{name}", f"{digest} {uri.rstrip('/')}"
