"""The one launcher: runs a stage here, on N local processes, or as a TrainJob on N nodes.

    result = launch("train", ctx, train.Request(params="gpt2_small", target="gpu"), nproc_per_node=8)

- in this process (``nproc_per_node == num_nodes == 1``): ``gpt2core.stages.run_stage``;
- on ``nproc_per_node`` local processes: ``torchrun --standalone`` of ``gpt2ops <stage>`` (one
  process per GPU: DDP / FSDP2; rank 0 tracks and publishes);
- on ``num_nodes`` nodes: a Kubeflow Trainer TrainJob (``gpt2core.launch.trainjob``) of
  ``num_nodes x nproc_per_node`` processes, created and followed until it ends.

The request crosses into other processes as the stage's own flags (``request.to_args()``) and the
result comes back the one way every stage hands it back: its ``result.json``
(``<artifact_root>/<pipeline_run_id>/<stage>/result.json``), never the processes' output. A stage
that failed there raises its own error here again. (The cerebras target's SDK work runs in the SDK's
Python through ``gpt2core.platform.child_process``, with the same result-file format.)
"""

from __future__ import annotations

import logging
import subprocess
import sys

from pydantic import PositiveInt, TypeAdapter, ValidationError

from gpt2core.errors import ConfigError, StorageError, TrainingError
from gpt2core.platform.artifacts import NotFound, delete_file
from gpt2core.platform.context import RunContext
from gpt2core.platform.results import StageResult, read_result
from gpt2core.stages import run_stage
from gpt2core.stages.request import StageRequest, context_args

log = logging.getLogger(__name__)
_COUNT = TypeAdapter(PositiveInt)

# Under the gpu train step's 72 h pod deadline (pipelines/): the step deletes a TrainJob that
# overruns before Kubernetes stops the step itself.
TRAINJOB_TIMEOUT_S = 71 * 3600


def launch(stage: str, ctx: RunContext, request: StageRequest, *, nproc_per_node: int = 1,
           num_nodes: int = 1, poll_s: float = 10.0) -> StageResult:
    """Run ``stage`` with ``request`` and return its result (raising the stage's error when it
    failed). ``poll_s``: how often a TrainJob's state is read."""
    nproc_per_node, num_nodes = _count("nproc_per_node", nproc_per_node), _count("num_nodes", num_nodes)
    if num_nodes > 1:
        return _on_trainjob(stage, ctx, request, nproc_per_node=nproc_per_node, num_nodes=num_nodes,
                            poll_s=poll_s)
    if nproc_per_node > 1:
        return _on_local_processes(stage, ctx, request, nproc_per_node)
    return run_stage(stage, ctx, request)


def _count(name: str, value: object) -> int:
    """A process or node count as an int: orchestrators send integers as they like (KFP: ``2.0``)."""
    try:
        return _COUNT.validate_python(value)
    except ValidationError:
        raise ConfigError(f"{name}: expected an integer >= 1, got {value!r}") from None


def stage_args(stage: str, ctx: RunContext, request: StageRequest) -> list[str]:
    """``<stage> <flags>``: the ``gpt2ops`` arguments that run ``request`` in ``ctx`` elsewhere."""
    return [stage, *request.to_args(), *context_args(ctx)]


def _on_local_processes(stage: str, ctx: RunContext, request: StageRequest, nproc: int) -> StageResult:
    result_uri = ctx.result_uri(stage)
    delete_file(result_uri)  # an earlier attempt's result must not pass for this one's
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "gpt2core.cli", *stage_args(stage, ctx, request)]
    log.info("%s on %d processes: %s", stage, nproc, " ".join(command))
    returncode = subprocess.run(command).returncode
    return _read(result_uri, failure=None if returncode == 0 else (
        f"{stage} on {nproc} processes (torchrun) failed with exit code {returncode}; the ranks' errors "
        f"are in the log above"))


def _on_trainjob(stage: str, ctx: RunContext, request: StageRequest, *, nproc_per_node: int,
                 num_nodes: int, poll_s: float) -> StageResult:
    from gpt2core.launch.trainjob import require_cluster_reachable, run_train_job

    if stage != "train":
        raise ConfigError(f"num_nodes {num_nodes}: only the train stage runs on several nodes")
    require_cluster_reachable(request.params, ctx.artifact_root)
    # A retried step re-attaches to the job of its earlier attempt, whose result is then the one to read.
    run_train_job(stage_args(stage, ctx, request)[1:], pipeline_run_id=ctx.pipeline_run_id, num_nodes=num_nodes,
                  procs_per_node=nproc_per_node,
                  gpus_per_node=nproc_per_node if getattr(request, "target", "cpu") == "gpu" else 0,
                  timeout_s=TRAINJOB_TIMEOUT_S, poll_s=poll_s)
    return _read(ctx.result_uri(stage), failure=None)


def _read(result_uri: str, *, failure: str | None) -> StageResult:
    """The result at result_uri, its error raised when it failed; ``failure`` is the message when the
    processes failed and left no result."""
    try:
        result = read_result(result_uri)
    except NotFound:
        if failure:
            raise TrainingError(failure) from None
        raise StorageError(f"{result_uri}: the stage ended without writing its result") from None
    return result.raise_if_failed()
