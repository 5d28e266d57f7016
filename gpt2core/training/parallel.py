"""Devices and data parallelism, applied from outside the model: DDP, or FSDP2 for the large sizes.

Processes come from ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...);
without it training runs in one process. NCCL on GPUs, gloo on CPU. Across nodes (a Kubeflow
Trainer TrainJob) ``RANK`` is the rank in the whole job (data shards, rank 0 tracks and publishes)
and ``LOCAL_RANK`` the GPU on this node.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.nn.parallel import DistributedDataParallel

from gpt2core.errors import TrainingError
from gpt2core.targets import TORCH_TARGETS

try:  # torch >= 2.6
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
except ImportError:  # torch 2.4 / 2.5 (the Cerebras SDK pins 2.4)
    from torch.distributed._composable.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard



@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(target: str) -> DistInfo:
    """This process's rank and device; joins the process group when started by torchrun."""
    if target not in TORCH_TARGETS:
        raise TrainingError(f"target {target!r}: expected one of {TORCH_TARGETS} (cerebras runs in its own image)")
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if target == "gpu":
        if not torch.cuda.is_available():
            raise TrainingError("target gpu: no CUDA device is visible (use --target cpu, or run on a GPU node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, device)


def shutdown_distributed() -> None:
    """Leave the process group, if this process is in one (``init_distributed`` joined it)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def parallelize(model: nn.Module, *, kind: str, info: DistInfo, param_dtype: torch.dtype | None,
                compile: bool, activation_checkpointing: bool) -> nn.Module:
    """Wrap ``model`` for training; returns the module to call (state dicts keep the model's names).

    ``kind`` is "ddp" or "fsdp": FSDP2 shards each block and then the rest (embeddings, head), so
    parameters, gradients and optimizer state of the large sizes fit across GPUs.
    """
    blocks = model.transformer.h
    if activation_checkpointing:
        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block)  # recompute activations in backward; names unchanged
    if kind == "fsdp" and info.world_size > 1:
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in blocks:
            if compile:
                block.compile()
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    if compile:
        model.compile()
    if info.world_size > 1:
        return DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of a step (grad accumulation)."""
    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        yield
    else:
        yield
