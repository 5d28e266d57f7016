"""Where training runs, defined once: the pipeline's ``target`` parameter and every ``--target`` flag.

- ``cpu``: this machine's CPU (tests, laptops);
- ``gpu``: CUDA GPUs, one process per GPU under torchrun (DDP / FSDP2), past one node a TrainJob;
- ``cerebras``: a Cerebras Wafer-Scale Cluster through the Cerebras PyTorch SDK, in its own Python
  environment (the SDK pins torch 2.4).
"""

from __future__ import annotations

from typing import Literal, get_args

from gpt2core.errors import ConfigError

Target = Literal["cpu", "gpu", "cerebras"]
TARGETS: tuple[str, ...] = get_args(Target)
TORCH_TARGETS: tuple[str, ...] = ("cpu", "gpu")  # trained by gpt2core.training


def check_target(target: str, *, key: str = "target") -> str:
    """``target`` when it is one of TARGETS; else a ConfigError naming ``key`` (flag or parameter)."""
    if target not in TARGETS:
        raise ConfigError(f"{key}: {target!r} is not one of {', '.join(TARGETS)}")
    return target
