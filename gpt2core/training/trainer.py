"""The training loop, assembled from small parts: model, parallelism, optimizer, schedule, data,
checkpoints and metrics.

    result = train(params, data_dir=..., work_dir=..., target="cpu", log_metrics=tracked.log_metrics)

One optimizer step consumes the global batch ``train_input.batch_size``, split over the
data-parallel ranks and ``optimizer.grad_accum_steps`` micro-batches. Each micro-batch's loss is
weighted by its share of the step's real tokens (or sequences, for ``loss_scaling: batch_size``)
counted over all ranks, so the step loss and gradients are those of the whole global batch: 2
processes give the losses of 1, and a padded batch counts each real token once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from gpt2core.checkpoint_names import FOLDER as CHECKPOINT_FOLDER
from gpt2core.config import Params
from gpt2core.data.loader import HDF5DataLoader, input_dataloader
from gpt2core.errors import ConfigError, TrainingError
from gpt2core.evaluation import eval_dataloader, evaluate_pass
from gpt2core.model import GPT2
from gpt2core.precision import autocast_dtype
from gpt2core.progress import format_duration, time_left
from gpt2core.training.checkpoint import Checkpointer
from gpt2core.training.metrics import ThroughputMeter, peak_flops
from gpt2core.training.optimizer import build_optimizer
from gpt2core.training.parallel import (FSDPModule, DistInfo, all_reduce_sum, gradient_sync, init_distributed,
                                       parallelize, shutdown_distributed)
from gpt2core.training.schedule import build_lr_scheduler, learning_rate_at

log = logging.getLogger(__name__)

LOSSES_FILE = "losses.jsonl"


@dataclass
class TrainResult:
    model: GPT2  # the trained model, whole on rank 0 (other FSDP2 ranks keep their shards)
    step: int
    final_loss: float
    losses: dict[int, float] = field(default_factory=dict)  # steps run by this call -> loss
    tokens_per_s: float = 0.0  # mean over this call's steps, excluding the first (warm-up, compile)
    mfu: float = 0.0
    checkpoint: Path | None = None
    eval_metrics: dict[str, float] = field(default_factory=dict)


def micro_batch_size(params: Params, world_size: int) -> int:
    batch, accum = params.train_input.batch_size, params.optimizer.grad_accum_steps
    if batch % (world_size * accum):
        raise ConfigError(f"train_input.batch_size: {batch} is not divisible by {world_size} processes x "
                          f"optimizer.grad_accum_steps {accum}")
    return batch // (world_size * accum)


def grad_scaler(params: Params, dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling (dynamic, or static when loss_scaling_factor is a number); bf16 does not."""
    if dtype is not torch.float16:
        return None
    factor = params.optimizer.loss_scaling_factor
    if factor == "dynamic":
        return torch.amp.GradScaler("cuda", init_scale=params.optimizer.initial_loss_scale or 2.0**16)
    return torch.amp.GradScaler("cuda", init_scale=float(factor), growth_interval=2**31 - 1)


def train(params: Params, *, data_dir: str | Path, work_dir: str | Path, target: str = "cpu",
          eval_data_dir: str | Path | None = None, resume_from: str | Path | None = None,
          log_metrics=None, on_checkpoint=None) -> TrainResult:  # noqa: ANN001 - see below
    """Train for ``runconfig.max_steps``, resuming from ``resume_from`` or else the newest checkpoint
    in ``work_dir/checkpoints``. Rank 0 calls ``log_metrics(metrics: dict, step: int)`` every
    ``runconfig.log_steps`` and ``on_checkpoint(path: Path, step: int)`` after writing each checkpoint
    (the callback must not raise for a failure training should survive, e.g. an upload).

    Under torchrun this joins the process group and leaves it when training ends, also on errors
    (every collective of training, the final gather and evaluation included, happens in here)."""
    info = init_distributed(target)
    try:
        return Trainer(params, info, Path(work_dir), log_metrics, on_checkpoint).fit(data_dir, eval_data_dir,
                                                                                     resume_from)
    finally:
        shutdown_distributed()


class Trainer:
    def __init__(self, params: Params, info: DistInfo, work_dir: Path, log_metrics=None,  # noqa: ANN001
                 on_checkpoint=None):  # noqa: ANN001
        self.params, self.info, self.work_dir = params, info, work_dir
        work_dir.mkdir(parents=True, exist_ok=True)
        self.log_metrics = log_metrics if info.is_main else None
        self.on_checkpoint = on_checkpoint if info.is_main else None
        run, device = params.runconfig, info.device
        self.amp_dtype = autocast_dtype(params.model, device)

        torch.manual_seed(run.seed)  # identical initial weights on every rank
        self.model = GPT2(params.model).to(device)
        self.model.fused_head_loss = True
        torch.manual_seed(run.seed + 1 + info.rank)  # independent dropout streams per rank
        self.train_model = parallelize(self.model, kind=run.parallelism, info=info, param_dtype=self.amp_dtype,
                                       compile=run.torch_compile, activation_checkpointing=run.activation_checkpointing)
        self.optimizer = build_optimizer(self.model, params.optimizer, fused=device.type == "cuda")
        self.scheduler = build_lr_scheduler(self.optimizer, params.optimizer.learning_rate)
        self.scaler = grad_scaler(params, self.amp_dtype)
        self.checkpointer = Checkpointer(work_dir / CHECKPOINT_FOLDER, keep_last=run.keep_last_checkpoints, info=info)
        self.meter = ThroughputMeter(self.model.flops_per_token(params.train_input.max_sequence_length),
                                     peak_flops(device, self.amp_dtype)[0])
        self.eval_loader: HDF5DataLoader | None = None  # kept between evaluations (persistent_workers)
        self.last_good: Path | None = None  # the newest checkpoint known to hold a finite state

    def fit(self, data_dir: str | Path, eval_data_dir: str | Path | None,
            resume_from: str | Path | None) -> TrainResult:
        p, run, info = self.params, self.params.runconfig, self.info
        loader = input_dataloader(p.train_input, data_dir, name="train_input",
                                  batch_size=micro_batch_size(p, info.world_size), training=True, rank=info.rank,
                                  world_size=info.world_size)
        if eval_data_dir:  # opened now: eval data that does not fit the config fails before the first step
            self.eval_loader = eval_dataloader(p, eval_data_dir, rank=info.rank, world_size=info.world_size)
        state = dict(model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
                     loader=loader)
        resume_from = resume_from or self.checkpointer.latest()
        step = self.checkpointer.load(resume_from, **state) if resume_from else 0
        if resume_from:
            self.last_good = Path(resume_from)
            # The rate of the config's schedule, not the checkpoint's: a rate lowered to get past a
            # NaN stop applies from the first resumed step.
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate_at(p.optimizer.learning_rate, step)
        if step == 0 and run.save_initial_checkpoint:
            self._save(0, state)
        result = TrainResult(model=self.model, step=step, final_loss=math.nan)
        if step >= run.max_steps:
            log.info("checkpoint is at step %d >= runconfig.max_steps %d: nothing to train", step, run.max_steps)
            return result

        tokens_per_step = p.train_input.batch_size * p.train_input.max_sequence_length
        log.info("training %s parameters on %s x%d from step %d to %d (%d tokens/step)",
                 f"{self.model.num_params():,}", info.device, info.world_size, step, run.max_steps, tokens_per_step)
        batches = iter(loader)
        first_step, timed_since = step, None  # the first step (warm-up, compilation) is not timed
        self.train_model.train()
        while step < run.max_steps:
            lr = self.optimizer.param_groups[0]["lr"]
            micro = [next(batches) for _ in range(p.optimizer.grad_accum_steps)]
            loss, grad_norm = self._step(micro)
            step += 1
            if not math.isfinite(loss):
                raise self._stopped(step, f"loss is {loss}")
            result.losses[step] = result.final_loss = loss
            self.meter.add(tokens_per_step)
            if step == first_step + 1:
                timed_since = time.perf_counter()
            if run.save_losses and info.is_main:
                with open(self.work_dir / LOSSES_FILE, "a") as f:
                    f.write(json.dumps({"step": step, "loss": loss}) + "\n")
            if step % run.log_steps == 0 or step == run.max_steps:
                tokens_per_s, mfu = self.meter.read()
                # at the mean pace of the timed steps (evaluations and checkpoints included)
                eta = (time_left(step - first_step - 1, run.max_steps - first_step - 1,
                                 time.perf_counter() - timed_since) if step > first_step + 1 else None)
                self._log(step, loss, lr, grad_norm, tokens_per_s, mfu, eta)
            if self.eval_loader is not None and run.eval_frequency and step % run.eval_frequency == 0:
                self._log_eval(step, self.evaluate())
            if run.checkpoint_steps and step % run.checkpoint_steps == 0 and step < run.max_steps:
                self._save(step, state)
        if step > first_step + 1:
            result.tokens_per_s = (step - first_step - 1) * tokens_per_step / (time.perf_counter() - timed_since)
            result.mfu = result.tokens_per_s * self.meter.flops_per_token / self.meter.peak
        result.step = step
        result.checkpoint = self._save(step, state)
        result.model = self._full_model()
        if self.eval_loader is not None:
            result.eval_metrics = self.evaluate()
            self._log_eval(step, result.eval_metrics)
        return result

    def _save(self, step: int, state: dict) -> Path:
        """Write the checkpoint of ``step``, only of a finite state: a step can leave NaN/Inf
        weights behind a finite loss (the loss is taken before the update), and a checkpoint of
        them would be no place to resume from."""
        if not self._state_is_finite():
            raise self._stopped(step, "the weights or optimizer state hold NaN/Inf after the optimizer step "
                                      "(its checkpoint was not written)")
        path = self.last_good = self.checkpointer.save(step, **state)
        if self.on_checkpoint:  # rank 0, which wrote the file
            self.on_checkpoint(path, step)
        return path

    def _state_is_finite(self) -> bool:
        """Whether every weight and optimizer state tensor is finite on every rank (one collective)."""
        tensors = [*self.model.parameters(), *(t for s in self.optimizer.state.values() for t in s.values()
                                               if isinstance(t, torch.Tensor) and t.is_floating_point())]
        local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]  # FSDP2 shards
        device = self.info.device  # Adam's step counts live on the CPU, the rest on the device
        bad = torch.stack([(~torch.isfinite(t).all()).to(device) for t in local if t.numel()]).sum().float()
        return all_reduce_sum(bad).item() == 0

    def _stopped(self, step: int, what: str) -> TrainingError:
        """The error that stops training at ``step``, naming the checkpoint to resume from."""
        if self.last_good is None:
            where = ("no checkpoint holds a finite state yet (none was written); lower the learning rate or "
                     "check the data, then start again")
        else:
            where = (f"the last good checkpoint is {self.last_good}; lower the learning rate or check the data, "
                     f"then resume with --checkpoint_path {self.last_good}")
        return TrainingError(f"step {step}: {what}; training stopped: {where}")

    def _full_model(self) -> GPT2:
        """The trained model with whole parameters. Under FSDP2 every rank joins the gather and rank 0
        gets a CPU copy (the others keep their shards: only rank 0 publishes)."""
        if not isinstance(self.model, FSDPModule):
            return self.model
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.info.is_main:
            return self.model
        full = GPT2(self.params.model)
        full.load_state_dict(state)
        return full

    def _step(self, micro: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
        """One optimizer step over the micro-batches; returns (global loss, gradient norm)."""
        device, world = self.info.device, self.info.world_size
        by_tokens = self.params.model.loss_scaling == "num_tokens"
        units = [(b["attention_mask"].sum() if by_tokens else b["input_ids"].new_tensor(b["input_ids"].size(0)))
                 .to(device, torch.float32) for b in micro]
        total_units = all_reduce_sum(torch.stack(units).sum())
        step_loss = torch.zeros((), device=device)
        autocast = (torch.autocast(device.type, dtype=self.amp_dtype) if self.amp_dtype
                    else contextlib.nullcontext())
        for i, (batch, n) in enumerate(zip(micro, units)):
            ids, mask, labels = (batch[k].to(device, non_blocking=True)
                                 for k in ("input_ids", "attention_mask", "labels"))
            share = n / total_units  # of the global step; DDP averages over ranks, hence x world
            with gradient_sync(self.train_model, enabled=i == len(micro) - 1), autocast:
                _, loss = self.train_model(ids, attention_mask=mask, labels=labels)
                weighted = loss * share * world
            (self.scaler.scale(weighted) if self.scaler else weighted).backward()
            step_loss += loss.detach() * share
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.params.optimizer.max_gradient_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm or math.inf)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        return all_reduce_sum(step_loss).item(), float(grad_norm)

    def evaluate(self) -> dict[str, float]:
        return evaluate_pass(self.train_model, self.params, self.eval_loader, device=self.info.device,
                             eval_steps=self.params.runconfig.eval_steps)

    def _log(self, step: int, loss: float, lr: float, grad_norm: float, tokens_per_s: float, mfu: float,
             eta_s: float | None) -> None:
        """The step's log line (``eta`` unknown until a step after the first is timed) and metrics."""
        if not self.info.is_main:
            return
        log.info("step %d/%d | loss %.4f | lr %.3e | grad_norm %.3f | %s tok/s | mfu %.1f%% | eta %s",
                 step, self.params.runconfig.max_steps, loss, lr, grad_norm, f"{tokens_per_s:,.0f}",
                 100 * mfu, "?" if eta_s is None else format_duration(eta_s))
        if self.log_metrics:
            self.log_metrics({"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                              "train/tokens_per_s": tokens_per_s, "train/mfu": mfu}, step=step)

    def _log_eval(self, step: int, metrics: dict[str, float]) -> None:
        if not self.info.is_main:
            return
        log.info("step %d eval | loss %.4f | perplexity %.2f | accuracy %.4f", step, metrics["eval/loss"],
                 metrics["eval/lm_perplexity"], metrics["eval/accuracy"])
        if self.log_metrics:
            self.log_metrics(metrics, step=step)
