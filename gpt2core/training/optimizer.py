"""AdamW (or Adam) over two parameter groups: weight matrices and embeddings decay; norms and biases do not."""

from __future__ import annotations

import torch
import torch.nn as nn

from gpt2core.config import OptimizerParams, SchedulerParams
from gpt2core.errors import ConfigError


def _peak_learning_rate(learning_rate: float | list[SchedulerParams]) -> float:
    """The largest rate a schedule names: each entry's start and end value (not what an Exponential
    entry with decay_rate > 1 grows to)."""
    if not isinstance(learning_rate, list):
        return learning_rate
    return max(v for s in learning_rate for v in (s.initial_learning_rate, s.end_learning_rate, s.learning_rate)
               if v is not None)


def build_optimizer(model: nn.Module, p: OptimizerParams, *, fused: bool) -> torch.optim.Optimizer:
    """The optimizer for ``model``; its learning rate is set by the schedule (see schedule.py).

    ``fused`` selects the single-kernel implementation (CUDA); otherwise torch's default (foreach).
    """
    if not p.correct_bias:
        raise ConfigError("optimizer.correct_bias: torch's AdamW always corrects the bias; set it to True")
    # Adam's first step moves a weight by lr / (1 - beta1) in float32: a larger rate is no number there.
    limit = torch.finfo(torch.float32).max * (1 - p.betas[0])
    if _peak_learning_rate(p.learning_rate) > limit:
        raise ConfigError(f"optimizer.learning_rate: {_peak_learning_rate(p.learning_rate):g} is beyond what the "
                          f"optimizer's float32 step can hold (at most {limit:.3g} with betas[0] {p.betas[0]})")
    # Parameters seen once even when tied (the output head shares the token embedding).
    params = {id(t): t for t in model.parameters() if t.requires_grad}.values()
    decay = [t for t in params if t.dim() >= 2]
    no_decay = [t for t in params if t.dim() < 2]
    groups = [{"params": decay, "weight_decay": p.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    optimizer_class = torch.optim.AdamW if p.optimizer_type.lower() == "adamw" else torch.optim.Adam
    return optimizer_class(groups, lr=1.0, betas=tuple(p.betas), eps=p.eps,
                           **({"fused": True} if fused else {}))
