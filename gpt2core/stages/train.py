"""Train stage: `gpt2ops train --params CFG --model_dir DIR [--checkpoint_path CKPT] [--max_steps N]`.

Data comes from ``train_input.data_dir`` (local or s3://). Outputs two artifacts: ``model``
(``model.safetensors`` in Hugging Face layout, ``config.json``, ``params.yaml``) and
``checkpoints`` (the last ``runconfig.keep_last_checkpoints`` training checkpoints). ``model_dir``
is the local working folder: checkpoints land there as training goes, and a rerun with the same
folder resumes from the newest one. Torch targets also upload checkpoints in the background to
``<run>/train/progress/`` (rank 0, latest wins; deleted once the stage has published), and an attempt
started without --checkpoint_path resumes from the newest one there or in this run's published
``checkpoints``: a retried step of the same pipeline run (a preempted pod, ``gpt2ops run --resume``)
continues where the lost attempt left off. The model is registered in MLflow only once both
artifacts are published, so no registered version points at a model that is not there. On GPUs
start it under ``torchrun``: every rank trains, rank 0 tracks and publishes.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from pathlib import Path

from pydantic import Field

from gpt2core.checkpoint_names import (CEREBRAS, FOLDER as CHECKPOINT_FOLDER, TORCH, checkpoint_step,
                                       list_checkpoints)
from gpt2core.config import Params, schedule_overrun
from gpt2core.hf_checkpoint import save_pretrained
from gpt2core.platform.artifacts import (artifact_digest, delete_file, list_files, local_input,
                                         local_output, put_file)
from gpt2core.platform.context import RunContext, process_rank
from gpt2core.platform.results import StageResult
from gpt2core.platform.tracking import (DATASET_EVALUATION, DATASET_TRAINING, TAG_CONFIG_HASH,
                                       TAG_DATASET_HASH, TAG_TARGET, stage_run)
from gpt2core.stages.inputs import (data_input, local_checkpoint, require_input, split_use, vouched_checkpoint,
                                    vouched_input, working_folder)
from gpt2core.stages.request import TrainingRequest

log = logging.getLogger(__name__)

STAGE = "train"
PROGRESS = "progress"  # <run>/train/progress/: checkpoints uploaded while training (not an artifact)


class Request(TrainingRequest):
    """What to train, where, and from which checkpoint."""

    model_dir: str | None = Field(None, description="local working folder for checkpoints (default: "
                                                    "runconfig.model_dir); a rerun with the same folder resumes")
    checkpoint_path: str | None = Field(None, description="resume from this checkpoint file or folder "
                                                          "(local or s3://)")
    compile_cache: str | None = Field(None, description="the compile stage's compile_cache artifact: "
                                                        "training starts with warm compiler caches (gpu)")


def run(ctx: RunContext, request: Request) -> StageResult:
    """Train the model of ``request.params`` and publish its weights (``model``) and checkpoints."""
    cfg = request.load_params()
    require_input("train_input.data_dir", cfg.train_input.data_dir)  # before any work
    if cfg.runconfig.eval_frequency:
        require_input("eval_input.data_dir", cfg.eval_input.data_dir)
    require_input("--checkpoint_path", request.checkpoint_path, folder=False)
    require_input("--compile_cache", request.compile_cache)
    target = request.target
    outputs = {"model": ctx.artifact_uri(STAGE, "model"), "checkpoints": ctx.artifact_uri(STAGE, "checkpoints")}
    work_dir = working_folder("--model_dir", request.model_dir or cfg.runconfig.model_dir)
    progress_uri = ctx.artifact_uri(STAGE, PROGRESS)
    if process_rank() != 0:  # another torchrun rank: train, leave the rest to rank 0
        _train_torch(cfg, work_dir, request, log_metrics=None, progress_uri=progress_uri,
                     checkpoints_uri=outputs["checkpoints"])
        return StageResult(outputs=outputs)

    overrun = schedule_overrun(cfg.optimizer, cfg.runconfig.max_steps)
    if overrun:
        log.warning(overrun)
    tags = {TAG_CONFIG_HASH: cfg.config_hash(), TAG_DATASET_HASH: artifact_digest(cfg.train_input.data_dir),
            TAG_TARGET: target}
    with stage_run(STAGE, ctx, params=cfg.to_flat_dict(), tags=tags) as tracked:
        tracked.log_datasets([split_use(cfg.train_input.data_dir, DATASET_TRAINING)]
                             + ([split_use(cfg.eval_input.data_dir, DATASET_EVALUATION)]
                                if cfg.runconfig.eval_frequency and target != "cerebras" else []))
        started = time.monotonic()
        resumed_only: list[Path] = []  # a run resumed at max_steps saved no checkpoint: publish that one
        with local_output(outputs["model"]) as model_out:
            if target == "cerebras":
                metrics = _train_cerebras(cfg, work_dir, model_out, request.checkpoint_path, tracked.log_metrics)
            else:
                result = _train_torch(cfg, work_dir, request, log_metrics=tracked.log_metrics,
                                      progress_uri=progress_uri, checkpoints_uri=outputs["checkpoints"])
                save_pretrained(result.model, cfg, model_out)
                resumed_only = [result.checkpoint] if result.checkpoint else []
                metrics = {"train/loss": result.final_loss, "train/tokens_per_s": result.tokens_per_s,
                           "train/mfu": result.mfu, "train/steps": float(result.step), **result.eval_metrics}
        with local_output(outputs["checkpoints"]) as checkpoints_out:
            suffix = CEREBRAS if target == "cerebras" else TORCH
            for checkpoint in list_checkpoints(work_dir / CHECKPOINT_FOLDER, suffix) or resumed_only:
                shutil.copy2(checkpoint, checkpoints_out / checkpoint.name)
        # Registered only now, from the published (manifest-verified) artifact: a version in the
        # registry always points at a model that exists, whenever the stage is killed.
        with local_input(outputs["model"]) as published:
            tracked.log_model(published, model_uri=outputs["model"])  # safetensors + params.yaml
        metrics["train/seconds"] = time.monotonic() - started
        # at the last step, so the per-step train/loss history ends on the final value
        tracked.log_metrics(metrics, step=int(metrics.get("train/steps", 0)))
        tracked.log_loss_curve()
    if target != "cerebras":  # published: the checkpoints artifact holds them now
        _clear_progress(progress_uri)
    return StageResult(outputs=outputs, metrics=metrics, mlflow_run_id=tracked.run_id)


def _train_torch(cfg: Params, work_dir: Path, request: Request, log_metrics,  # noqa: ANN001, ANN202
                 progress_uri: str, checkpoints_uri: str):
    """Train on the torch targets; checkpoints are uploaded to ``progress_uri`` as they are written,
    and an attempt resumes from the newest an earlier one left there or in ``checkpoints_uri``."""
    from gpt2core.training import train  # torch and the trainer only when training

    with contextlib.ExitStack() as stack:
        data_dir = stack.enter_context(data_input("train_input.data_dir", cfg.train_input.data_dir))
        eval_dir = (stack.enter_context(data_input("eval_input.data_dir", cfg.eval_input.data_dir))
                    if cfg.runconfig.eval_frequency else None)
        if request.compile_cache and cfg.runconfig.torch_compile:
            from gpt2core.compilation import load_compile_cache

            # the compile stage's caches (training starts warm); loading them unpickles them
            with vouched_input(request.compile_cache, "compile_cache") as caches:
                load_compile_cache(caches, request.compile_cache)
        if request.checkpoint_path:
            resume = local_checkpoint(request.checkpoint_path, work_dir)
        else:
            resume = earlier_attempt(progress_uri, checkpoints_uri, work_dir)
        # Rank 0 writes the checkpoints, so only it uploads them. Closed when this block ends, also
        # on errors: before the stage publishes and clears the prefix.
        on_checkpoint = (stack.enter_context(ProgressUploader(progress_uri, cfg.runconfig.keep_last_checkpoints))
                         if process_rank() == 0 else None)
        result = train(cfg, data_dir=data_dir, work_dir=work_dir, target=request.target, eval_data_dir=eval_dir,
                       resume_from=resume, log_metrics=log_metrics, on_checkpoint=on_checkpoint)
        if result.checkpoint is None and resume:  # resumed at max_steps: nothing trained, nothing saved
            result.checkpoint = Path(resume)
        return result


def _checkpoints_under(uri: str) -> list[tuple[int, str]]:
    """(step, name) of the training checkpoints directly under uri, oldest first."""
    found = ((checkpoint_step(name), name) for name in list_files(uri))
    return sorted((step, name) for step, name in found if step is not None)


def earlier_attempt(progress_uri: str, checkpoints_uri: str, work_dir: Path) -> Path | None:
    """A local copy of the newest checkpoint an earlier attempt of this pipeline run left: uploaded
    while it trained (``progress_uri``), or published as this stage's ``checkpoints`` artifact (an
    attempt stopped after publishing, before its step was recorded as done). None when there is
    none, or when ``work_dir`` already holds one as new. Each object is whole once listed (an S3
    upload appears complete or not at all), so a partly published artifact still serves."""
    found = sorted((step, f"{uri.rstrip('/')}/{name}") for uri in (progress_uri, checkpoints_uri)
                   for step, name in _checkpoints_under(uri))
    if not found:
        return None
    step, uri = found[-1]
    local = list_checkpoints(work_dir / CHECKPOINT_FOLDER)
    if local and checkpoint_step(local[-1].name) >= step:
        return None  # the trainer resumes from the local folder
    log.info("resuming from %s (an earlier attempt of this run)", uri)
    return local_checkpoint(uri, work_dir)


class ProgressUploader:
    """The trainer's on_checkpoint callback (rank 0): uploads checkpoints to the progress prefix on a
    background thread, so training goes on while a (GPT-2 XL: ~19 GB) checkpoint uploads, then
    deletes the uploaded ones beyond the last ``keep_last``. One upload at a time and one pending
    slot, latest wins: a checkpoint that arrives while another uploads replaces any pending one
    (only the newest matters for a resume, and queueing every one would fall further behind).
    A failure is logged, never raised. ``close()`` uploads what is pending, then stops the thread."""

    def __init__(self, progress_uri: str, keep_last: int):
        self.progress_uri, self.keep_last = progress_uri.rstrip("/"), keep_last
        self._pending: tuple[Path, int] | None = None
        self._closing = False
        self._wake = threading.Condition()
        self._worker = threading.Thread(target=self._run, name="progress-uploader", daemon=True)
        self._worker.start()

    def __call__(self, path: Path, step: int) -> None:
        if step == 0:
            return  # the initial checkpoint (save_initial_checkpoint): a retry gains nothing from it
        with self._wake:
            if self._closing:
                log.warning("checkpoint of step %d arrived after the progress uploader closed; not uploaded", step)
                return
            if self._pending is not None:
                log.info("checkpoint of step %d not uploaded to %s: step %d replaces it while an upload runs",
                         self._pending[1], self.progress_uri, step)
            self._pending = (Path(path), step)
            self._wake.notify()

    def close(self) -> None:
        """Wait for the running and the pending upload, then stop the thread. The stage calls it
        before it publishes and clears the prefix, so no late upload re-creates progress files; the
        pending one is the newest checkpoint, which a retry of a publish that fails resumes from."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._worker.join()

    def __enter__(self) -> ProgressUploader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._pending is None and not self._closing:
                    self._wake.wait()
                if self._pending is None:  # closing, nothing left
                    return
                (path, step), self._pending = self._pending, None
            self._upload(path, step)

    def _upload(self, path: Path, step: int) -> None:
        if not path.exists():  # the trainer's keep-last removed it while it waited: a newer one follows
            log.info("checkpoint of step %d is gone before its upload started; skipped", step)
            return
        try:
            put_file(path, f"{self.progress_uri}/{path.name}")
            _prune_progress(self.progress_uri, keep=self.keep_last)
        except Exception as exc:  # noqa: BLE001 - an upload must never stop training
            log.warning("could not upload checkpoint of step %d to %s (%s); training goes on, but a retry "
                        "of this step would resume from an older checkpoint", step, self.progress_uri, exc)


def _prune_progress(progress_uri: str, *, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints under the progress prefix."""
    found = _checkpoints_under(progress_uri)
    for _, name in found[:max(0, len(found) - keep)]:
        delete_file(f"{progress_uri.rstrip('/')}/{name}")


def _clear_progress(progress_uri: str) -> None:
    try:
        _prune_progress(progress_uri, keep=0)
    except Exception as exc:  # noqa: BLE001 - the stage has published; leftovers only cost space
        log.warning("could not clear %s (%s)", progress_uri, exc)


def _train_cerebras(cfg: Params, work_dir: Path, model_out: Path, checkpoint_path: str | None,
                    log_metrics) -> dict[str, float]:  # noqa: ANN001
    from gpt2core import cerebras

    # The cstorch flow resumes from runconfig.checkpoint_path (a .mdl file, which loading unpickles):
    # only from one a stage published, and only if it is still the file it published.
    resume_from, sha256 = checkpoint_path or cfg.runconfig.checkpoint_path, None
    if resume_from:
        local, sha256 = vouched_checkpoint(resume_from, work_dir, suffix=CEREBRAS)
        cfg.runconfig.checkpoint_path = str(local)
    with data_input("train_input.data_dir", cfg.train_input.data_dir) as data_dir:
        result = cerebras.train(cfg, data_dir=data_dir, model_dir=model_out,
                                checkpoint_dir=work_dir / CHECKPOINT_FOLDER, work_dir=work_dir,
                                on_metrics=log_metrics, checkpoint_sha256=sha256)
    return {k: float(v) for k, v in result.items() if k.startswith("train/") and isinstance(v, (int, float))}
