"""AdamW (or Adam) over two parameter groups: weight matrices and embeddings decay; norms and biases do not."""

from __future__ import annotations

import torch
import torch.nn as nn

from gpt2core.config import OptimizerParams
from gpt2core.errors import ConfigError


def build_optimizer(model: nn.Module, p: OptimizerParams, *, fused: bool) -> torch.optim.Optimizer:
    """The optimizer for ``model``; its learning rate is set by the schedule (see schedule.py).

    ``fused`` selects the single-kernel implementation (CUDA); otherwise torch's default (foreach).
    """
    if not p.correct_bias:
        raise ConfigError("optimizer.correct_bias: torch's AdamW always corrects the bias; set it to True")
    # Parameters seen once even when tied (the output head shares the token embedding).
    params = {id(t): t for t in model.parameters() if t.requires_grad}.values()
    decay = [t for t in params if t.dim() >= 2]
    no_decay = [t for t in params if t.dim() < 2]
    groups = [{"params": decay, "weight_decay": p.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    optimizer_class = torch.optim.AdamW if p.optimizer_type.lower() == "adamw" else torch.optim.Adam
    return optimizer_class(groups, lr=1.0, betas=tuple(p.betas), eps=p.eps,
                           **({"fused": True} if fused else {}))
