"""The cstorch flow: validate, compile and train our GPT-2 with the Cerebras PyTorch SDK.

Imports ``cerebras.pytorch``, so it runs only where the SDK is installed (``.venv-cerebras`` or the
cerebras image), in the child process that ``gpt2core.cerebras`` starts for each call.

The shape is the SDK's documented training flow, as the Model Zoo 2.x trainer uses it:

    backend = cstorch.backend("CSX", cluster_config=ClusterConfig(...), compile_only=...)
    with backend.device: model = GPT2(params.model)
    compiled = cstorch.compile(model, backend)
    @cstorch.trace step: forward, loss scaling (cstorch.amp.GradScaler), clipping, optimizer step
    executor = cstorch.utils.data.DataExecutor(cstorch.utils.data.DataLoader(input_fn, ...),
                                               num_steps=..., checkpoint_steps=...)
    for batch in executor: step(batch); step_closure logs; checkpoint_closure cstorch.save(...)

The model, config, HDF5 loader and saved-model format are gpt2core's own; only the optimizer and
schedule classes differ from the torch trainer, because the wafer runs ``cstorch.optim`` only.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

import cerebras.pytorch as cstorch
from cerebras.appliance.cluster.config import ClusterConfigError

from gpt2core.cerebras.settings import CerebrasSettings, resolve_settings
from gpt2core.checkpoint_names import CEREBRAS, checkpoint_name, list_checkpoints
from gpt2core.config import InputParams, Params, SchedulerParams, schedule_milestones
from gpt2core.data.loader import input_dataloader
from gpt2core.errors import ConfigError, DataError, TrainingError
from gpt2core.model import GPT2
from gpt2core.platform.artifacts.manifest import sha256_file

log = logging.getLogger(__name__)

MetricsCallback = Callable[[dict[str, float], int], None]


# ----------------------------------------------------------------------------- backend


def sdk_lib_dir() -> Path:
    """``cerebras/pytorch/lib``: the CSX backend runs its MLIR tools (torch-cirh-opt) from PATH."""
    return Path(cstorch.__file__).parent / "lib"


def make_backend(settings: CerebrasSettings, artifact_dir: Path, *, data_dir: str | Path,
                 compile_only: bool = False, validate_only: bool = False) -> Any:
    """``cstorch.backend(...)`` for these settings; one per process (the SDK allows no second).
    On CSX the data folder is mounted into the appliance's streaming workers, which read it."""
    artifact_dir.mkdir(parents=True, exist_ok=True)
    if not settings.is_csx:
        return cstorch.backend("CPU", artifact_dir=str(artifact_dir))
    lib = str(sdk_lib_dir())
    if lib not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([lib, os.environ.get("PATH", "")])
    cluster = {
        "mgmt_address": settings.mgmt_address,
        "mgmt_namespace": settings.mgmt_namespace,
        "credentials_path": settings.credentials_path,
        "num_csx": settings.num_csx,
        "mount_dirs": sorted({*settings.mount_dirs, str(Path(data_dir).resolve())}),
        "python_paths": list(settings.python_paths),
        "job_labels": list(settings.job_labels),
        "job_time_sec": settings.job_time_sec,
        "disable_version_check": settings.disable_version_check,
    }
    if settings.num_workers_per_csx:
        cluster["num_workers_per_csx"] = settings.num_workers_per_csx
    if settings.job_priority:
        cluster["job_priority"] = settings.job_priority
    try:
        cluster_config = cstorch.distributed.ClusterConfig(**cluster)
    except (ValueError, TypeError) as exc:  # the SDK's own checks of the same settings
        raise ConfigError(f"runconfig (cluster settings): {exc}") from None
    kwargs = {"compile_dir": settings.compile_dir} if settings.compile_dir else {}
    return cstorch.backend("CSX", artifact_dir=str(artifact_dir), cluster_config=cluster_config,
                           compile_only=compile_only, validate_only=validate_only, **kwargs)


# ----------------------------------------------------------------------------- optimizer, schedule


def build_optimizer(model: torch.nn.Module, params: Params) -> cstorch.optim.Optimizer:
    """cstorch AdamW/Adam with the torch trainer's two groups: matrices and embeddings decay,
    norms and biases do not."""
    p = params.optimizer
    unique = {id(t): t for t in model.parameters() if t.requires_grad}.values()
    groups = [{"params": [t for t in unique if t.dim() >= 2], "weight_decay": p.weight_decay},
              {"params": [t for t in unique if t.dim() < 2], "weight_decay": 0.0}]
    first_lr = p.learning_rate if not isinstance(p.learning_rate, list) else p.learning_rate[0].start_lr
    if p.optimizer_type.lower() == "adamw":
        return cstorch.optim.AdamW(groups, lr=first_lr, betas=tuple(p.betas), eps=p.eps,
                                   weight_decay=p.weight_decay, correct_bias=p.correct_bias)
    return cstorch.optim.Adam(groups, lr=first_lr, betas=tuple(p.betas), eps=p.eps,
                              weight_decay=p.weight_decay)


def _scheduler(optimizer: cstorch.optim.Optimizer, s: SchedulerParams, max_steps: int) -> Any:
    lr = cstorch.optim.lr_scheduler
    total = s.total_iters or max_steps
    if s.scheduler == "Constant":
        return lr.ConstantLR(optimizer, learning_rate=s.learning_rate, total_iters=s.total_iters)
    if s.scheduler == "Linear":
        return lr.LinearLR(optimizer, initial_learning_rate=s.initial_learning_rate,
                           end_learning_rate=s.end_learning_rate, total_iters=total)
    if s.scheduler == "CosineDecay":
        return lr.CosineDecayLR(optimizer, initial_learning_rate=s.initial_learning_rate,
                                end_learning_rate=s.end_learning_rate, total_iters=total)
    return lr.ExponentialLR(optimizer, initial_learning_rate=s.initial_learning_rate, total_iters=total,
                            decay_rate=s.decay_rate, staircase=s.staircase)


def build_lr_scheduler(optimizer: cstorch.optim.Optimizer, params: Params) -> Any:
    """``optimizer.learning_rate`` as cstorch schedulers: the same schedule as the torch trainer's
    (``gpt2core.training.schedule``), in classes the wafer computes on device."""
    learning_rate, max_steps = params.optimizer.learning_rate, params.runconfig.max_steps
    if not isinstance(learning_rate, list):
        return cstorch.optim.lr_scheduler.ConstantLR(optimizer, learning_rate=learning_rate)
    schedulers = [_scheduler(optimizer, s, max_steps) for s in learning_rate]
    if len(schedulers) == 1:
        return schedulers[0]
    return cstorch.optim.lr_scheduler.SequentialLR(optimizer, schedulers=schedulers,
                                                   milestones=schedule_milestones(learning_rate))


# ----------------------------------------------------------------------------- precision


class Precision:
    """Mixed precision as the Model Zoo sets it up: on CSX the half dtype is set globally and a
    cstorch GradScaler scales float16/cbfloat16 losses (dynamically for cbfloat16); on the CPU
    backend bfloat16 autocast (or float32) needs no loss scaling."""

    def __init__(self, settings: CerebrasSettings, params: Params):
        """Call before the model is built: the half dtype is global SDK state the model traces with."""
        self.settings, self.params = settings, params
        self.max_gradient_norm = params.optimizer.max_gradient_norm
        self.grad_scaler = None
        if settings.half_dtype:
            cstorch.amp.set_half_dtype(settings.half_dtype)

    def make_grad_scaler(self) -> None:
        """Call once the optimizer exists: the GradScaler hooks the optimizers the backend knows."""
        if self.settings.uses_grad_scaler:
            o = self.params.optimizer
            self.grad_scaler = cstorch.amp.GradScaler(
                loss_scale=o.loss_scaling_factor, init_scale=o.initial_loss_scale,
                max_loss_scale=o.max_loss_scale)

    def autocast(self) -> Any:
        # On CSX the compiler casts by itself; the CPU backend autocasts to bfloat16 like torch.
        if self.settings.is_csx or not self.settings.half_dtype:
            return nullcontext()
        return cstorch.amp.autocast()

    def backward_and_step(self, loss: torch.Tensor, model: torch.nn.Module,
                          optimizer: cstorch.optim.Optimizer) -> None:
        if self.grad_scaler is not None:
            # scale, backward, unscale, clip by global norm, step if finite, update the scale
            cstorch.amp.optimizer_step(loss, optimizer, self.grad_scaler,
                                       max_gradient_norm=self.max_gradient_norm)
            return
        loss.backward()
        if self.max_gradient_norm:
            torch.nn.utils.clip_grad_norm_(list(model.parameters()), self.max_gradient_norm)
        optimizer.step()
        optimizer.zero_grad()


# ----------------------------------------------------------------------------- data


def hdf5_input_fn(section: InputParams, data_dir: str, start_step: int) -> Any:
    """Our HDF5 loader of config section ``section``, as cstorch's DataLoader calls it (on the
    appliance's streaming workers for CSX, in this process for CPU). Each streamer reads its share
    of the global batch; a resumed run starts at the batch after ``start_step`` (the order depends
    only on seed and epoch)."""
    rank, world_size = 0, 1
    if cstorch.distributed.is_streamer():
        rank, world_size = cstorch.distributed.get_streaming_rank(), cstorch.distributed.num_streamers()
    batch_size = section.batch_size
    per_rank = cstorch.distributed.get_streaming_batch_size(batch_size) if world_size > 1 else batch_size
    loader = input_dataloader(section, data_dir, name="train_input", batch_size=per_rank, training=True,
                              rank=rank, world_size=world_size)
    loader.seek(start_step)
    return loader


def make_dataloader(params: Params, data_dir: str | Path, start_step: int = 0) -> Any:
    return cstorch.utils.data.DataLoader(hdf5_input_fn, params.train_input, str(data_dir), start_step)


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_schedule(start_step: int, max_steps: int, checkpoint_steps: int) -> Any:
    """The executor's checkpoint steps (0-based, counted from ``start_step``) for global steps that
    are multiples of ``checkpoint_steps``, plus the final step; 0 means only the final one."""
    from cerebras.pytorch.utils.data.utils import Schedule

    num_steps = max_steps - start_step
    if not checkpoint_steps:
        return Schedule([Schedule.Range(start=num_steps - 1, end=num_steps, step=1, include_last=True)])
    first_global = (start_step // checkpoint_steps + 1) * checkpoint_steps
    first_local = min(first_global - start_step, num_steps) - 1
    return Schedule([Schedule.Range(start=first_local, end=num_steps, step=checkpoint_steps, include_last=True)])


def load_checkpoint(path: str | Path, *, sha256: str | None = None) -> dict[str, Any]:
    """The state in a cstorch checkpoint, loaded only if the file's sha256 is ``sha256``: cstorch's
    H5 format unpickles (dill) what it stores, and its fallback for other files is a torch.load,
    done here with ``weights_only=True``. ``sha256`` comes from the manifest of the artifact a stage
    published the checkpoint in, as recorded in MLflow (``gpt2core.stages.inputs.vouched_checkpoint``),
    or from this flow having written the file; None (nobody vouched for it) or a mismatch is a
    DataError and nothing is loaded."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such Cerebras checkpoint")
    if sha256 is None:
        raise DataError(f"{path}: refused to load a Cerebras checkpoint nobody vouched for (no expected sha256): "
                        f"loading it would unpickle it; resume from a checkpoint a gpt2ops stage published")
    actual = sha256_file(path)
    if actual != sha256:
        raise DataError(f"{path}: refused to load: its sha256 {actual[:16]}... is not the {sha256[:16]}... "
                        f"recorded when it was published (changed since); loading it would unpickle it")
    try:
        return cstorch.load(str(path), weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the SDK raises bare RuntimeError/ValueError for bad files
        raise DataError(f"{path}: not a readable cstorch checkpoint ({exc})") from None


def load_model_state(model: GPT2, state: dict[str, Any], path: str | Path) -> None:
    """Put a checkpoint's model weights into ``model``; weights that do not fit its config are a
    DataError naming the checkpoint (not the SDK's or torch's wall of size mismatches)."""
    if "model" not in state or not isinstance(state["model"], dict):
        raise DataError(f"{path}: no 'model' state in this checkpoint (keys: {sorted(state)[:8]})")
    weights = {name: torch.as_tensor(value).detach().to("cpu", torch.float32) for name, value in state["model"].items()}
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in weights.items()}
    if found != expected:
        differ = sorted(n for n in expected.keys() & found.keys() if expected[n] != found[n])
        raise DataError(
            f"{path}: the checkpoint's weights do not fit the model config (missing "
            f"{sorted(expected.keys() - found.keys())[:3]}, unexpected {sorted(found.keys() - expected.keys())[:3]}, "
            + ", ".join(f"{n} is {found[n]} not {expected[n]}" for n in differ[:2]) + ")")
    model.load_state_dict(weights)


def convert_checkpoint(checkpoint: str | Path, params: Params, out_dir: str | Path, *, sha256: str | None) -> Path:
    """A cstorch checkpoint (loaded only if its sha256 is ``sha256``: ``load_checkpoint``) as our
    standard saved-model folder (``model.safetensors`` in HF layout, ``config.json``,
    ``params.yaml``): what the evaluate stage and the GPU path load."""
    from gpt2core.hf_checkpoint import save_pretrained

    model = GPT2(params.model)
    load_model_state(model, load_checkpoint(checkpoint, sha256=sha256), checkpoint)
    return save_pretrained(model, params, out_dir)


# ----------------------------------------------------------------------------- runs


def _seed(params: Params) -> None:
    torch.manual_seed(params.runconfig.seed)


class _Run:
    """What one run traces: the model on the backend, its optimizer, schedule and precision."""

    def __init__(self, settings: CerebrasSettings, params: Params, backend: Any):
        self.precision = Precision(settings, params)
        _seed(params)
        with backend.device:  # CSX: parameters are created lazily, on the appliance's terms
            self.model = GPT2(params.model)
        self.compiled = cstorch.compile(self.model, backend)
        self.optimizer = build_optimizer(self.model, params)
        self.scheduler = build_lr_scheduler(self.optimizer, params)
        self.precision.make_grad_scaler()
        self.step = _training_step(self.compiled, self.model, self.optimizer, self.scheduler, self.precision)


def _lowered_files(executor_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(executor_dir.glob("*.mlir"))}


def trace_one_step(params: Params, data_dir: str | Path, work_dir: str | Path, *, backend_name: str = "CSX",
                   mode: str = "validate") -> dict[str, Any]:
    """Validate (``mode="validate"``) or compile (``"compile"``) one training step; returns a report.

    CSX validate is the SDK's ``validate_only``: trace, lower to MLIR and validate the graph, all on
    this machine. CSX compile is ``compile_only``: the same lowering here, then the compile for the
    wafer on the appliance, whose artifacts stay in the cluster's compile cache (``compile_dir``)
    for the train job. Without ``runconfig.mgmt_address`` the compile stops at that boundary with a
    ConfigError naming the setting. On the CPU backend the step simply runs once.
    """
    if mode not in ("validate", "compile"):
        raise ValueError(f"mode {mode!r}")
    settings = resolve_settings(params, backend_name, need_appliance=False)
    work_dir = Path(work_dir)
    artifact_dir = work_dir / "cerebras_logs"
    backend = make_backend(settings, artifact_dir, data_dir=data_dir, compile_only=(mode == "compile"),
                           validate_only=(mode == "validate"))
    run = _Run(settings, params, backend)
    executor = cstorch.utils.data.DataExecutor(make_dataloader(params, data_dir), num_steps=1)
    report: dict[str, Any] = {
        "backend": settings.backend, "mode": mode, "sdk_version": cstorch.__version__,
        "num_params": run.model.num_params(non_embedding=False), "half_dtype": settings.half_dtype,
        "loss_scaling": settings.loss_scaling_factor if settings.uses_grad_scaler else None,
        "mgmt_address": settings.mgmt_address, "num_csx": settings.num_csx, "compile_dir": settings.compile_dir,
    }
    started = time.perf_counter()
    try:
        for batch in executor:
            run.step(batch)
    except ClusterConfigError as exc:
        # Raised at the appliance boundary, after the step was traced and lowered here.
        lowered = ", ".join(f"{name} {size} bytes" for name, size in _lowered_files(Path(executor.artifact_dir)).items())
        if settings.mgmt_address is None:
            raise ConfigError(
                f"runconfig.mgmt_address: not set; the step was traced and lowered to MLIR here ({lowered or 'no files'} "
                f"in {executor.artifact_dir}), but compiling it for the wafer needs the cluster management server "
                f"as '<host>:<port>'") from None
        raise ConfigError(f"runconfig.mgmt_address / runconfig.mgmt_namespace / runconfig.credentials_path: "
                          f"the cluster at {settings.mgmt_address} refused this configuration ({exc})") from None
    report["seconds"] = round(time.perf_counter() - started, 3)
    if settings.is_csx:
        executor_dir = Path(executor.artifact_dir)
        report["lowered"] = _lowered_files(executor_dir)
        report["artifact_dir"] = str(artifact_dir)
        cluster = backend.cluster_config
        report["mount_dirs"] = sorted(str(m.path) for m in cluster.mount_dirs)
        report["python_paths"] = sorted(cluster.python_paths)
        if not report["lowered"]:
            raise TrainingError(f"{executor_dir}: the SDK wrote no MLIR; the step was not lowered")
        report["result"] = "validated locally" if mode == "validate" else f"compiled on {settings.mgmt_address}"
    else:
        report["result"] = "ran one step on the CPU backend"
    return report


def _training_step(compiled: Callable, model: GPT2, optimizer: Any, scheduler: Any, precision: Precision) -> Callable:
    @cstorch.trace
    def training_step(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with precision.autocast():
            _, loss = compiled(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        precision.backward_and_step(loss, model, optimizer)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        return loss, lr

    return training_step


def train(params: Params, data_dir: str | Path, *, model_dir: str | Path, checkpoint_dir: str | Path,
          work_dir: str | Path, backend_name: str = "CSX", on_metrics: MetricsCallback | None = None,
          checkpoint_sha256: str | None = None) -> dict[str, Any]:
    """Train for ``runconfig.max_steps`` (from ``runconfig.checkpoint_path`` when set: loaded only if
    its sha256 is ``checkpoint_sha256``), write cstorch checkpoints to ``checkpoint_dir`` and the
    final model, converted, to ``model_dir``."""
    settings = resolve_settings(params, backend_name, need_appliance=True)
    r = params.runconfig
    checkpoint_dir, model_dir, work_dir = Path(checkpoint_dir), Path(model_dir), Path(work_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    backend = make_backend(settings, work_dir / "cerebras_logs", data_dir=data_dir)
    run = _Run(settings, params, backend)
    model, optimizer, scheduler, precision = run.model, run.optimizer, run.scheduler, run.precision

    start_step = 0
    resume = r.checkpoint_path
    if resume:
        state = load_checkpoint(resume, sha256=checkpoint_sha256)
        missing = [key for key in ("optimizer", "lr_scheduler", "global_step") if key not in state]
        if missing:
            raise DataError(f"runconfig.checkpoint_path: {resume} has no {', '.join(missing)} state "
                            f"(expected a checkpoint written by this flow)")
        load_model_state(model, state, resume)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["lr_scheduler"])
        if precision.grad_scaler is not None and state.get("grad_scaler"):
            precision.grad_scaler.load_state_dict(state["grad_scaler"])
        start_step = int(state["global_step"])
        if start_step >= r.max_steps:
            raise ConfigError(f"runconfig.checkpoint_path: {resume} is at step {start_step}, "
                              f"already at runconfig.max_steps={r.max_steps}")
        log.info("resuming from %s at step %d", resume, start_step)

    num_steps = r.max_steps - start_step
    executor = cstorch.utils.data.DataExecutor(
        make_dataloader(params, data_dir, start_step), num_steps=num_steps,
        checkpoint_steps=checkpoint_schedule(start_step, r.max_steps, r.checkpoint_steps),
        activation_steps=min(r.log_steps, num_steps))
    tokens_per_step = params.train_input.batch_size * params.train_input.max_sequence_length
    history: list[tuple[int, float]] = []
    window = {"start": time.perf_counter(), "steps": 0}
    written: dict[Path, str] = {}  # checkpoint -> its sha256, as this flow wrote it

    @cstorch.step_closure
    def record(loss: torch.Tensor, lr: torch.Tensor, step: int) -> None:
        value = float(loss.item())
        if not math.isfinite(value):
            raise TrainingError(f"loss is {value} at step {step}; the last good checkpoint is in {checkpoint_dir}")
        history.append((step, value))
        elapsed = max(time.perf_counter() - window["start"], 1e-9)
        metrics = {"train/loss": value, "train/lr": float(torch.as_tensor(lr).item()),
                   "train/tokens_per_s": tokens_per_step * window["steps"] / elapsed}
        window.update(start=time.perf_counter(), steps=0)
        log.info("step %d loss %.4f lr %.3g", step, value, metrics["train/lr"])
        if on_metrics:
            on_metrics(metrics, step)

    @cstorch.checkpoint_closure
    def save_checkpoint(step: int) -> None:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "lr_scheduler": scheduler.state_dict(), "global_step": step}
        if precision.grad_scaler is not None:
            state["grad_scaler"] = precision.grad_scaler.state_dict()
        path = checkpoint_dir / checkpoint_name(step, CEREBRAS)
        cstorch.save(state, str(path))
        if step == r.max_steps:  # converted below: this flow wrote it, so it vouches for it
            written[path] = sha256_file(path)
        for old in list_checkpoints(checkpoint_dir, CEREBRAS)[:-r.keep_last_checkpoints]:
            old.unlink()

    if r.save_initial_checkpoint and start_step == 0:
        save_checkpoint(0)  # queued: the SDK runs it as the executor starts, before the first step
    started = time.perf_counter()
    for batch in executor:
        loss, lr = run.step(batch)
        step = start_step + executor.user_iteration
        window["steps"] += 1
        if step % r.log_steps == 0 or executor.on_final_iteration:
            record(loss, lr, step)
        save_checkpoint(step)  # a checkpoint closure: runs only on the executor's checkpoint steps
    seconds = time.perf_counter() - started

    final = checkpoint_dir / checkpoint_name(r.max_steps, CEREBRAS)
    if not final.is_file():
        raise TrainingError(f"{final}: the final checkpoint was not written")
    convert_checkpoint(final, params, model_dir, sha256=written.get(final))
    return {
        "backend": settings.backend,
        "train/steps": float(r.max_steps),
        "train/tokens_per_s": tokens_per_step * num_steps / seconds if seconds > 0 else 0.0,
        "steps": num_steps,
        "start_step": start_step,
        "final_step": r.max_steps,
        "loss_history": history,
        "train/loss": history[-1][1] if history else float("nan"),
        "seconds": seconds,
        "steps_per_s": num_steps / seconds if seconds > 0 else 0.0,
        "checkpoint": str(final),
        "sdk_version": cstorch.__version__,
    }
