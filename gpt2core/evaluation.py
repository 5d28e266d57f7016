"""Evaluation metrics as the Cerebras GPT-2 reference defines them, and text sampling.

- ``eval/loss``: the model's loss (with the config's loss scaling) averaged over eval batches;
- ``eval/lm_perplexity``: exp(masked cross entropy summed over the whole eval set / real tokens);
- ``eval/accuracy``: mask-weighted accuracy of the argmax next-token prediction.

``eval_dataloader`` and ``evaluate_pass`` are what the trainer's evaluation and the evaluate stage
run: the config's eval data and batch, the number of batches (the trainer's evaluations take
``runconfig.eval_steps``; the evaluate stage scores the whole split unless told otherwise) and the
mixed-precision rule.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from gpt2core.config import Params
from gpt2core.data.loader import HDF5DataLoader, input_dataloader
from gpt2core.precision import autocast_dtype
from gpt2core.progress import ProgressLog

log = logging.getLogger(__name__)


def eval_dataloader(params: Params, data_dir: str | Path, *, rank: int = 0,
                    world_size: int = 1) -> HDF5DataLoader:
    """The ``eval_input`` loader of one rank: the global ``eval_input.batch_size`` split over
    ``world_size`` ranks (at least 1 sequence each)."""
    per_rank = max(1, params.eval_input.batch_size // world_size)
    return input_dataloader(params.eval_input, data_dir, name="eval_input", batch_size=per_rank, training=False,
                            rank=rank, world_size=world_size)


def eval_batches(loader: HDF5DataLoader, eval_steps: int | None) -> int:
    """How many batches an evaluation of ``eval_steps`` batches scores: all of the loader's when
    None, never more."""
    return len(loader) if eval_steps is None else min(len(loader), eval_steps)


def evaluate_pass(model: nn.Module, params: Params, loader: HDF5DataLoader, *, device: torch.device,
                  eval_steps: int | None) -> dict[str, float]:
    """One evaluation: from the loader's first batch, ``eval_steps`` batches (None: the whole eval
    set; never more than one pass), autocast per ``gpt2core.precision``, progress logged. The
    trainer passes ``runconfig.eval_steps``, the evaluate stage its request's cap (default: none).
    Returns the ``evaluate`` metrics, summed over ranks."""
    loader.seek(0)
    return evaluate(model, loader, device=device, max_batches=eval_batches(loader, eval_steps),
                    autocast_dtype=autocast_dtype(params.model, device), progress_label="evaluate")


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], *, device: torch.device,
             max_batches: int | None = None, autocast_dtype: torch.dtype | None = None,
             progress_label: str | None = None) -> dict[str, float]:
    """The eval metrics over ``batches`` (at most ``max_batches``), summed across ranks:
    ``eval/loss``, ``eval/lm_perplexity``, ``eval/accuracy`` and ``eval/tokens`` (the real tokens
    scored). With ``progress_label`` and ``max_batches`` rank 0 logs progress lines
    (``gpt2core.progress.ProgressLog``). An ``HDF5DataLoader`` repeats its epochs without end: give
    it with ``max_batches`` (``evaluate_pass`` does: at most one pass). ValueError when no batch holds
    a real token."""
    was_training = model.training
    model.eval()
    # loss sum, batches, masked CE sum, real tokens, correct tokens
    totals = torch.zeros(5, dtype=torch.float64, device=device)
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype
                else contextlib.nullcontext())
    progress = None
    if progress_label and max_batches:
        progress = ProgressLog(log, progress_label, max_batches,
                               enabled=not dist.is_initialized() or dist.get_rank() == 0)
    for done, batch in enumerate(itertools.islice(batches, max_batches), start=1):
        ids, mask, labels = (batch[k].to(device, non_blocking=True)
                             for k in ("input_ids", "attention_mask", "labels"))
        with autocast:
            logits, loss = model(ids, attention_mask=mask, labels=labels)
        weights = mask.flatten().double()
        per_token = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten().long(), reduction="none")
        correct = (logits.argmax(dim=-1) == labels).flatten().double()
        totals += torch.stack([loss.double(), torch.ones((), dtype=torch.float64, device=device),
                               (per_token.double() * weights).sum(), weights.sum(), (correct * weights).sum()])
        if progress:
            progress.update(done, ids.numel())
    model.train(was_training)
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss_sum, n_batches, ce_sum, tokens, correct = totals.tolist()
    if n_batches == 0 or tokens == 0:
        raise ValueError("evaluation saw no batches with real tokens")
    return {
        "eval/loss": loss_sum / n_batches,
        "eval/lm_perplexity": math.exp(ce_sum / tokens),
        "eval/accuracy": correct / tokens,
        "eval/tokens": tokens,
    }


@torch.no_grad()
def sample(model: nn.Module, prompt_ids: list[int], *, max_new_tokens: int, temperature: float = 1.0,
           top_k: int | None = None, eos_id: int | None = None,
           generator: torch.Generator | None = None) -> list[int]:
    """Continue ``prompt_ids`` by sampling from softmax(logits / temperature), restricted to the
    ``top_k`` most likely tokens; stops early at ``eos_id``. Returns only the new tokens."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    context_size = model.params.max_position_embeddings
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits, _ = model(ids[:, -context_size:])  # no KV cache: samples are short
        logits = logits[0, -1].float() / temperature
        if top_k is not None and top_k < logits.numel():
            threshold = torch.topk(logits, top_k).values[-1]
            logits = logits.masked_fill(logits < threshold, float("-inf"))
        token = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
        if eos_id is not None and token.item() == eos_id:
            break
        new.append(int(token.item()))
        ids = torch.cat([ids, token.view(1, 1)], dim=1)
    model.train(was_training)
    return new
