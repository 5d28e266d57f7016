"""The GPT-2 pre-training pipeline, defined once; rendered to Kubeflow Pipelines
(``pipelines/gpt2_pipeline.py`` with ``pipelines/kubernetes.py``) and to Argo Workflows
(``pipelines/argo_workflow.py``):

    start run -> download -> preprocess -> validate -> [gpu | cerebras | cpu: compile -> train]
              -> evaluate -> promote -> record results                  (exit handler: end run)

What is defined here, and nowhere else:

- the steps (``STEPS``, in pipeline order): the stage each runs, its inputs (run-form parameters,
  outputs of earlier steps, constants), the stage's command line made from them (what an Argo task
  runs; the KFP components build the same request in Python from the same inputs), its outputs
  (where in the stage's ``StageResult`` each one is) and the steps it waits for beyond its inputs;
- the branches: ``compile`` and ``train`` run once per training target (``TARGET_BRANCHES``), and only the
  run form's ``target`` branch runs; a step outside the branches that takes a branch output gets
  the chosen branch's;
- per step: image, resources, node placement (node selector, tolerations, GPUs, memory-backed
  ``/dev/shm``), retries with backoff, time limit, caching, credentials (``S3_SECRET``,
  ``MLFLOW_SECRET``), and the bookkeeping steps' own settings (``BOOKKEEPING``, ``START``).

The parameters are the run form, ``gpt2core.pipeline_parameters.PipelineParameters``. Placement
settings name run-form parameters (``node_selector``, ``tolerations``, ``gpu_node_selector``,
``gpu_tolerations``, ``num_gpus``), whose values each renderer puts on the pod.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from gpt2core.pipeline_parameters import PipelineParameters
from gpt2core.targets import TARGETS

PIPELINE_NAME = "gpt2ops-pretrain"
DESCRIPTION = "Pre-train a GPT-2 model: download, preprocess, validate, compile, train, evaluate, promote."
# The branches, in the order the KFP pipeline tests them (if gpu / elif cerebras / else cpu).
TARGET_BRANCHES = tuple(sorted(TARGETS, key=("gpu", "cerebras", "cpu").index))
BRANCH_STAGES = ("compile", "train")

# Credentials come from two Secrets (templates in k8s/secrets/), never from pipeline parameters.
S3_SECRET = "gpt2ops-s3"
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")
MLFLOW_SECRET = "gpt2ops-mlflow"
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL")
MLFLOW_AUTH_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")  # optional: set when auth is on

SHM_SIZE = "16Gi"  # DataLoader workers and NCCL exchange tensors through /dev/shm
POD_LABELS = MappingProxyType({"app.kubernetes.io/part-of": "gpt2ops"})


# ---------------------------------------------------------------- values a step's inputs take

@dataclass(frozen=True)
class Form:
    """A run-form parameter (a field of PipelineParameters)."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in PipelineParameters.model_fields:
            raise ValueError(f"{self.name!r} is not a run-form parameter")


@dataclass(frozen=True)
class Output:
    """An output of an earlier step, by stage: for a branch stage, the same branch's step when the
    reader is in a branch, else the chosen branch's."""

    stage: str
    name: str


Value = Form | Output | str  # a str is a constant


# ---------------------------------------------------------------- a stage's command line

@dataclass(frozen=True)
class Input:
    """The value of one of the step's inputs, as given."""

    name: str


@dataclass(frozen=True)
class Product:
    """The product of two integer inputs."""

    left: str
    right: str


@dataclass(frozen=True)
class JsonField:
    """One key of an input that holds a JSON object."""

    name: str
    key: str


@dataclass(frozen=True)
class Scratch:
    """A folder of the step's own, empty at every attempt (a working folder that must not be shared
    with another run or attempt)."""

    name: str


ArgValue = Input | Product | JsonField | Scratch


@dataclass(frozen=True)
class Arg:
    """One argument of ``gpt2ops <stage>``: ``flag value`` (``flag`` None: a positional value)."""

    flag: str | None
    value: ArgValue


def args(*flags_and_inputs: tuple[str | None, ArgValue | str]) -> tuple[Arg, ...]:
    """Args from ``(flag, value)`` pairs; a str value names an input."""
    return tuple(Arg(flag, Input(value) if isinstance(value, str) else value) for flag, value in flags_and_inputs)


# ---------------------------------------------------------------- settings

@dataclass(frozen=True)
class Retry:
    """Retries with exponential backoff: ``limit`` more attempts, the first after ``backoff_s``
    seconds, each next wait ``factor`` times longer, no wait longer than ``max_backoff_s``."""

    limit: int
    backoff_s: int
    factor: float
    max_backoff_s: int


@dataclass(frozen=True)
class Resources:
    """Kubernetes resource requests and limits of the step's container (``cpu``, ``memory``)."""

    requests: Mapping[str, str]
    limits: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Placement:
    """Where a heavy step runs, by run-form parameters: the node selector, the tolerations (the
    lists concatenated), the GPUs per pod (None: no GPU); and a memory-backed /dev/shm."""

    node_selector: str = "node_selector"
    tolerations: tuple[str, ...] = ("tolerations",)
    gpus: str | None = None
    shm_size: str = SHM_SIZE


@dataclass(frozen=True)
class StepSettings:
    """How a step runs: its image (a ``gpt2core.images`` target), resources, retries, time limit
    (``timeout_s``, None: none), placement (None: any node, no /dev/shm volume), whether its
    outputs are cached on its inputs, the pod labels, and (``trainer_image``) the image a TrainJob
    it launches runs (an images target; ``GPT2OPS_TRAINER_IMAGE``)."""

    resources: Resources
    retry: Retry | None
    image: str = "cpu"
    timeout_s: int | None = None
    placement: Placement | None = None
    cached: bool = True
    pod_labels: Mapping[str, str] = field(default_factory=lambda: dict(POD_LABELS))
    trainer_image: str | None = None


# Data steps: network and S3 bound, retried on transient failures.
IO_RETRY = Retry(limit=3, backoff_s=30, factor=2.0, max_backoff_s=1800)
# Model steps: few retries with a long backoff: a preempted node is worth retrying, a bad config is
# not (it fails the same way in seconds; Argo does not retry a stage that exits 2, a user-fixable
# error). A retry is the same pipeline run: the train step (torch targets, one node or a TrainJob)
# resumes from the newest checkpoint the lost attempt uploaded to <run>/train/progress/ (only the
# steps after it run again); the cerebras target and the other heavy steps start over.
HEAVY_RETRY = Retry(limit=2, backoff_s=120, factor=2.0, max_backoff_s=3600)
IO_TIMEOUT_S = 6 * 3600

# The run's bookkeeping (open, record, close the MLflow parent run): small, never cached. START
# is not retried: it fails on bad run-form values, and should fail at once.
BOOKKEEPING = StepSettings(resources=Resources(requests={"cpu": "100m", "memory": "256Mi"}, limits={"memory": "1Gi"}),
                       retry=Retry(limit=3, backoff_s=10, factor=2.0, max_backoff_s=300), cached=False,
                       pod_labels={})
START = StepSettings(resources=BOOKKEEPING.resources, retry=None, cached=False, pod_labels={})


def _io(cpu: str, memory: str) -> StepSettings:
    return StepSettings(resources=Resources(requests={"cpu": cpu, "memory": memory}, limits={"memory": memory}),
                    retry=IO_RETRY, timeout_s=IO_TIMEOUT_S)


def _heavy(cpu: str, memory: str, timeout_s: int, placement: Placement = Placement(), **more: object) -> StepSettings:
    both = {"cpu": cpu, "memory": memory}
    return StepSettings(resources=Resources(requests=both, limits=both), retry=HEAVY_RETRY, timeout_s=timeout_s,
                    placement=placement, **more)


# The training targets' steps (compile and train alike).
GPU_PLACEMENT = Placement(node_selector="gpu_node_selector", tolerations=("tolerations", "gpu_tolerations"),
                          gpus="num_gpus")
TARGET_SETTINGS: Mapping[str, StepSettings] = MappingProxyType({
    # kfp-kubernetes allows one node selector per task: the GPU pool's takes node_selector's place.
    "gpu": _heavy("8", "64Gi", 72 * 3600, GPU_PLACEMENT, image="cuda"),
    # The appliance does the compute; the pod is a client that streams data to it.
    "cerebras": _heavy("16", "64Gi", 72 * 3600, image="cerebras"),
    "cpu": _heavy("8", "16Gi", 24 * 3600),
})


# ---------------------------------------------------------------- the steps

@dataclass(frozen=True)
class Step:
    """One step: ``gpt2ops <stage>`` with ``command`` made from ``inputs``. ``outputs``: output
    name -> JSONPath into the stage's StageResult. ``after``: stages it waits for beyond those its
    inputs come from."""

    stage: str
    inputs: Mapping[str, Value]
    command: tuple[Arg, ...]
    outputs: Mapping[str, str]
    settings: StepSettings
    target: str | None = None  # the branch (compile, train) or None
    after: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """Unique among the steps: the stage, with the branch's target."""
        return f"{self.stage}-{self.target}" if self.target else self.stage

    def upstream(self) -> tuple[str, ...]:
        """The stages this step waits for: those its inputs come from, then ``after``."""
        stages = [v.stage for v in self.inputs.values() if isinstance(v, Output)] + list(self.after)
        return tuple(dict.fromkeys(stages))


MODEL_INPUTS = {"params": Form("params"), "dataset_uri": Output("preprocess", "dataset_uri")}


def _branch(target: str) -> tuple[Step, Step]:
    settings = TARGET_SETTINGS[target]
    training = {**MODEL_INPUTS, "max_steps": Form("max_steps"), "target": target}
    compile_step = Step(
        "compile", target=target, after=("validate",), settings=settings,
        inputs=training,
        command=args(("--params", "params"), ("--dataset", "dataset_uri"), ("--max_steps", "max_steps"),
                     ("--target", "target")),
        outputs={"compile_cache_uri": "$.outputs.compile_cache"})
    # One training process per GPU (torchrun) for target gpu; past one node a TrainJob.
    launch = (("--nproc_per_node", "num_gpus"),) if target == "gpu" else ()
    train_step = Step(
        "train", target=target, after=("validate",),
        settings=dataclasses.replace(settings, trainer_image="cuda" if target == "gpu" else None),
        inputs={**MODEL_INPUTS, "compile_cache_uri": Output("compile", "compile_cache_uri"),
                "max_steps": Form("max_steps"), "target": target, "num_gpus": Form("num_gpus"),
                "num_nodes": Form("num_nodes")},
        command=args(("--params", "params"), ("--dataset", "dataset_uri"), ("--compile_cache", "compile_cache_uri"),
                     ("--max_steps", "max_steps"), ("--target", "target"), *launch, ("--num_nodes", "num_nodes"),
                     # the stage resumes from checkpoints it finds in its working folder
                     ("--model_dir", Scratch("model_dir"))),
        outputs={"model_uri": "$.outputs.model", "checkpoints_uri": "$.outputs.checkpoints"})
    return compile_step, train_step


STEPS: tuple[Step, ...] = (
    Step("download", settings=_io("1", "2Gi"),
         inputs={"source": Form("source"), "include": Form("source_include"), "sha256": Form("source_sha256")},
         command=args((None, "source"), ("--include", "include"), ("--sha256", "sha256")),
         outputs={"corpus_uri": "$.outputs.corpus"}),
    Step("preprocess", settings=_io("4", "8Gi"),
         inputs={"corpus_uri": Output("download", "corpus_uri"), "params": Form("params")},
         command=args(("--input_dir", "corpus_uri"), ("--params", "params")),
         outputs={"dataset_uri": "$.outputs.dataset"}),
    Step("validate", settings=_heavy("2", "8Gi", 30 * 60),
         inputs={**MODEL_INPUTS, "max_steps": Form("max_steps"), "target": Form("target"),
                 "num_gpus": Form("num_gpus"), "num_nodes": Form("num_nodes"), "gpu_type": Form("gpu_type")},
         # validate checks the whole job: num_gpus per node on num_nodes nodes
         command=args(("--params", "params"), ("--dataset", "dataset_uri"), ("--max_steps", "max_steps"),
                      ("--target", "target"), ("--num_gpus", Product("num_nodes", "num_gpus")),
                      ("--gpu_type", "gpu_type")),
         outputs={"report_uri": "$.outputs.report"}),
    *(step for target in TARGET_BRANCHES for step in _branch(target)),
    Step("evaluate", settings=_heavy("4", "16Gi", 6 * 3600),
         inputs={**MODEL_INPUTS, "model_uri": Output("train", "model_uri")},
         command=args(("--params", "params"), ("--dataset", "dataset_uri"), ("--model_dir", "model_uri")),
         outputs={"report_uri": "$.outputs.report", "metrics_json": "$.metrics"}),
    # Never cached: the champion may have changed since last time.
    Step("promote", settings=_heavy("4", "16Gi", 6 * 3600, cached=False),
         inputs={**MODEL_INPUTS, "model_uri": Output("train", "model_uri"),
                 "eval_metrics_json": Output("evaluate", "metrics_json")},
         command=args(("--params", "params"), ("--dataset", "dataset_uri"), ("--model_dir", "model_uri"),
                      ("--eval_loss", JsonField("eval_metrics_json", "eval/loss"))),
         outputs={"promoted": "$.metrics['promote/promoted']", "model_version": "$.metrics['promote/version']"}),
)
STAGES = tuple(dict.fromkeys(step.stage for step in STEPS))


def step(stage: str, target: str | None = None) -> Step:
    """The step of ``stage`` (of the ``target`` branch for a branch stage)."""
    return next(s for s in STEPS if s.stage == stage and s.target == target)
