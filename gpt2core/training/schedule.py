"""The reference's learning-rate schedule lists as torch schedulers.

Each entry of ``optimizer.learning_rate`` (Linear, Constant, CosineDecay, Exponential) becomes a
``LambdaLR`` giving the absolute learning rate at its local step (the optimizer's base lr is 1.0);
``SequentialLR`` runs them one after the other, each for its ``total_iters``. Entries hold their end
value past ``total_iters`` (Exponential keeps decaying, as in the reference), so the last one may run
until max_steps. A plain number is a constant rate.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, SequentialLR

from gpt2core.config import SchedulerParams, schedule_milestones


def lr_at(s: SchedulerParams) -> Callable[[int], float]:
    """The learning rate of one schedule entry as a function of its local step."""
    total = s.total_iters
    if s.scheduler == "Constant":
        return lambda step: s.learning_rate
    if s.scheduler == "Exponential":
        def exponential(step: int) -> float:
            exponent = step // total if s.staircase else step / total
            return s.initial_learning_rate * s.decay_rate ** exponent
        return exponential
    start, end = s.initial_learning_rate, s.end_learning_rate
    if s.scheduler == "Linear":
        return lambda step: start + (end - start) * min(step, total) / total
    # CosineDecay
    return lambda step: end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def build_lr_scheduler(optimizer: torch.optim.Optimizer,
                       learning_rate: float | list[SchedulerParams]) -> LRScheduler:
    for group in optimizer.param_groups:
        group["lr"] = 1.0  # LambdaLR multiplies base lr by the lambda: make the lambda absolute
    if not isinstance(learning_rate, list):
        return LambdaLR(optimizer, lambda step: learning_rate)
    schedulers = [LambdaLR(optimizer, lr_at(s)) for s in learning_rate]
    if len(schedulers) == 1:
        return schedulers[0]
    return SequentialLR(optimizer, schedulers, schedule_milestones(learning_rate))


def learning_rate_at(learning_rate: float | list[SchedulerParams], step: int) -> float:
    """The learning rate of the optimizer step that follows ``step`` steps: what the scheduler of
    ``build_lr_scheduler`` sets after ``step`` calls of ``scheduler.step()``. A resumed run takes
    its rate from here, so a schedule changed since the checkpoint applies from the first step."""
    if not isinstance(learning_rate, list):
        return learning_rate
    starts = [0, *schedule_milestones(learning_rate)]
    entry = bisect.bisect_right(starts, step) - 1
    return lr_at(learning_rate[entry])(step - starts[entry])
