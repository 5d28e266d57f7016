"""The pipeline's run form, defined once: every parameter a pipeline run takes, with its type,
default and description, and the checks a run makes on them before any data moves.

The KFP pipeline and the Argo WorkflowTemplate take these parameters; ``gpt2ops run`` and
``gpt2ops pipeline submit|schedule`` offer them as flags (``gpt2core.flags``); the pipeline's first
step (``start_run``) checks them with ``PipelineParameters(...).check()``, so a bad value fails
there, naming the parameter, before the download starts. Orchestrators deliver integers as they
like (the KFP UI and API clients send ``5.0``): an integral number is taken as the integer it is, a
fractional one is refused naming the parameter.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Self

from pydantic import Field

from gpt2core import flags
from gpt2core.config import load_params
from gpt2core.data.download import QUICKSTART_SOURCE, check_source
from gpt2core.errors import ConfigError, DataError, Gpt2opsError
from gpt2core.flags import Cli
from gpt2core.launch.trainjob import GPU_NODE_SELECTOR, GPU_TOLERATIONS
from gpt2core.targets import Target
from gpt2core.validation import GPU_MEMORY_GB


class PipelineParameters(flags.Parameters):
    """The run form of a pipeline run (KFP and Argo)."""

    error_prefix: ClassVar[str] = "parameter "

    params: str = Field(
        "gpt2_tiny", description="Config name (gpt2_tiny, gpt2_quickstart, gpt2_small, gpt2_medium, gpt2_large, "
                                 "gpt2_xl) or the path / s3:// URI of a Cerebras Model Zoo GPT-2 YAML.")
    source: str = Field(QUICKSTART_SOURCE.url, description=(
        "Raw text corpus: http(s):// URL, s3:// URI, hf://datasets/... or path of a text file, archive or "
        "jsonl (clear source_include and source_sha256 when changing it)."))
    source_include: Annotated[str, Cli(flags=("--include", "--source_include"))] = Field(
        ",".join(QUICKSTART_SOURCE.include), description="Comma-separated glob patterns of the files to take "
                                                         "from an archive source (empty: all files).")
    source_sha256: Annotated[str, Cli(flags=("--sha256", "--source_sha256"))] = Field(
        QUICKSTART_SOURCE.sha256 or "", pattern=r"^([0-9a-fA-F]{64})?$",
        description="Expected sha256 of the downloaded source, 64 hex digits (empty: not checked).")
    target: Target = Field("cpu", description="Where training runs: gpu (GPU node pool), cerebras "
                                              "(Wafer-Scale Cluster) or cpu.")
    num_gpus: int = Field(1, description="GPUs per node for the compile and train steps when target is gpu.")
    num_nodes: int = Field(1, description=(
        "Training nodes when target is gpu; past 1 the train step runs a Kubeflow Trainer TrainJob of "
        "num_nodes x num_gpus GPUs (runtime gpt2ops-torchrun) and follows it."))
    gpu_type: str = Field("H100", description="GPU model the memory check is made against when target is gpu "
                                              "(e.g. H100, A100).")
    node_selector: Annotated[dict[str, str], Cli(json=True)] = Field(default_factory=dict, description=(
        "Node labels the heavy steps off the GPU branch (validate, evaluate, promote, cpu and cerebras "
        "compile/train) must run on, e.g. {\"cloud.google.com/gke-nodepool\": \"cpu-pool\"} (empty: any node)."))
    tolerations: Annotated[list[dict[str, Any]], Cli(json=True)] = Field(default_factory=list, description=(
        "Tolerations for every heavy step, the GPU branch's included, e.g. [{\"key\": \"dedicated\", "
        "\"operator\": \"Exists\", \"effect\": \"NoSchedule\"}]."))
    gpu_node_selector: Annotated[dict[str, str], Cli(json=True)] = Field(
        default_factory=lambda: dict(GPU_NODE_SELECTOR), description=(
            "Node labels of the GPU pool, where the gpu branch's compile and train run (there it takes the "
            "place of node_selector); the default matches the Trainer runtime and docs/kubernetes.md."))
    gpu_tolerations: Annotated[list[dict[str, Any]], Cli(json=True)] = Field(
        default_factory=lambda: [dict(t) for t in GPU_TOLERATIONS], description=(
            "Tolerations the gpu branch's compile and train get on top of tolerations; the default tolerates "
            "the GPU pool's nvidia.com/gpu:NoSchedule taint."))
    max_steps: int = Field(0, description="Training steps; 0 keeps the config's runconfig.max_steps.")
    experiment: str = Field("gpt2ops", min_length=1, description="MLflow experiment of the runs.")
    artifact_root: str = Field("s3://gpt2ops/runs", description=(
        "Where every artifact of the run is stored: s3://bucket/prefix (or an absolute local folder when "
        "every step runs on one machine)."))
    run_name: str = Field("", description="Name of the MLflow parent run (empty: MLflow picks one).")

    def check(self) -> Self:
        """Every check that needs no data: ``check_values``, then the config (loaded and checked) and
        where the chosen target can train. A ConfigError names the parameter and what was expected."""
        self.check_values()
        try:
            params = load_params(self.params)
        except Gpt2opsError as exc:
            raise ConfigError(f"parameter params: {exc}") from exc
        if self.num_nodes > 1:
            from gpt2core.launch.trainjob import require_cluster_reachable

            try:
                require_cluster_reachable(self.params, self.artifact_root)
            except ConfigError as exc:
                raise ConfigError(f"parameter params/artifact_root: {exc}") from None
        if self.target == "cerebras" and not params.runconfig.mgmt_address:
            raise ConfigError(f"parameter target: cerebras needs the Wafer-Scale Cluster's management server, "
                              f"runconfig.mgmt_address, in config {self.params!r} (not set)")
        return self

    def check_values(self) -> Self:
        """The checks of the values alone, no file or service read: ranges, combinations, the form of
        the source and artifact root. What ``gpt2ops pipeline submit|schedule`` checks before sending
        a run (the config may name a file only the cluster has)."""
        if self.num_gpus < 1:
            raise ConfigError(f"parameter num_gpus: expected >= 1, got {self.num_gpus}")
        if self.target == "gpu" and self.gpu_type.upper() not in GPU_MEMORY_GB:
            raise ConfigError(f"parameter gpu_type: target gpu needs the GPU model the memory check is made "
                              f"against, one of {', '.join(GPU_MEMORY_GB)}; got {self.gpu_type!r}")
        if self.num_nodes < 1 or (self.num_nodes > 1 and self.target != "gpu"):
            raise ConfigError(f"parameter num_nodes: expected 1, or more than 1 with target gpu (training past "
                              f"one node is a Kubeflow Trainer TrainJob on the GPU pool); got "
                              f"num_nodes={self.num_nodes} with target {self.target!r}")
        if self.max_steps < 0:
            raise ConfigError(f"parameter max_steps: expected 0 (use the config's) or a positive number, "
                              f"got {self.max_steps}")
        bucket = self.artifact_root[len("s3://"):].partition("/")[0]
        if not (self.artifact_root.startswith("/") or (self.artifact_root.startswith("s3://") and bucket)):
            raise ConfigError(f"parameter artifact_root: expected s3://bucket/prefix or an absolute local "
                              f"folder, got {self.artifact_root!r}")
        try:
            check_source(self.source, here=False)  # a local path is one on the cluster's nodes
        except DataError as exc:
            raise ConfigError(f"parameter source: {exc}") from None
        return self

    @property
    def include_patterns(self) -> list[str]:
        return [p.strip() for p in self.source_include.split(",") if p.strip()]

    @property
    def config_max_steps(self) -> int | None:
        """max_steps as a stage's request takes it: None keeps the config's."""
        return self.max_steps or None
