"""Training checkpoints: everything needed to continue a run exactly where it stopped.

One file per step, ``checkpoint_00000100.pt`` (``gpt2core/checkpoint_names.py``), holding the model, optimizer, scheduler, grad
scaler, loader position, step and every rank's RNG state. States are gathered as full (unsharded)
tensors with ``torch.distributed.checkpoint.state_dict``, so a checkpoint written by DDP or FSDP2
on N processes loads on any number. The file is written to a temporary name, fsynced and renamed:
a kill leaves either the old set of checkpoints or the new one, never a torn file; a full disk is a
DiskFullError naming the folder and the size, with the temporary file removed. Only the last K
are kept. Files load with ``weights_only=True`` (no pickled code runs on load).
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from gpt2core.checkpoint_names import checkpoint_name, list_checkpoints
from gpt2core.errors import DataError, Gpt2opsError, TrainingError, one_line
from gpt2core.platform.disk import disk_space
from gpt2core.training.parallel import DistInfo

log = logging.getLogger(__name__)

def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _tensor_bytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) state dict: about the size of its checkpoint file."""
    if isinstance(state, torch.Tensor):
        return state.nbytes
    if isinstance(state, dict):
        return sum(_tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_tensor_bytes(v) for v in state)
    return 0


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep_last: int, info: DistInfo):
        self.directory, self.keep_last, self.info = Path(directory), keep_last, info

    def latest(self) -> Path | None:
        found = list_checkpoints(self.directory)
        return found[-1] if found else None

    def save(self, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: Any, scaler: torch.amp.GradScaler | None, loader: Any) -> Path:
        """Write the checkpoint of ``step`` (every rank must call this; rank 0 writes the file)."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
        rngs = [None] * self.info.world_size
        if dist.is_initialized():
            dist.all_gather_object(rngs, rng_state(self.info.device))
        else:
            rngs = [rng_state(self.info.device)]
        path = self.directory / checkpoint_name(step)
        if self.info.is_main:
            state = {
                "step": step, "world_size": self.info.world_size,
                "model": model_state, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "loader": loader.state_dict(), "rng": rngs,
            }
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            with disk_space(self.directory, doing=f"writing checkpoint {path.name}",
                            needed=_tensor_bytes(state), remove=[tmp]):
                with open(tmp, "wb") as f:
                    torch.save(state, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            for old in list_checkpoints(self.directory)[:-self.keep_last]:
                old.unlink(missing_ok=True)
            log.info("saved checkpoint %s", path)
        if dist.is_initialized():
            dist.barrier()  # nobody runs ahead of a checkpoint that may be resumed from
        return path

    def load(self, path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: Any, scaler: torch.amp.GradScaler | None, loader: Any) -> int:
        """Restore everything from ``path``; returns the step it was taken after."""
        path = Path(path)
        state = read_checkpoint(path, error=TrainingError)
        missing = {"step", "model", "optimizer", "scheduler", "loader", "rng"} - set(state)
        if missing:
            raise TrainingError(f"{path}: not a training checkpoint (missing {sorted(missing)})")
        try:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                           options=StateDictOptions(full_state_dict=True))
        except (RuntimeError, KeyError, ValueError) as exc:
            raise TrainingError(f"{path}: does not fit this model/optimizer ({one_line(exc)})") from exc
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        loader.load_state_dict(state["loader"])
        if state["world_size"] == self.info.world_size:
            set_rng_state(state["rng"][self.info.rank], self.info.device)
        else:  # data order is exact on any world size; dropout streams cannot be
            log.warning("%s: written by %d processes, resumed on %d: RNG streams start afresh",
                        path, state["world_size"], self.info.world_size)
        log.info("resumed from %s (step %d)", path, state["step"])
        return int(state["step"])


def read_checkpoint(path: Path, *, error: type[Gpt2opsError] = DataError, name: str | None = None) -> dict:
    """The state dict of a torch checkpoint file, loaded with ``weights_only=True`` (tensors and
    plain containers only: no pickled code runs) and memory-mapped. A file that cannot be read, or
    that holds other pickled objects, raises ``error`` naming ``name`` (default: the path) in one
    line; torch's own advice to retry with ``weights_only=False`` is left out, as following it for a
    file of unknown origin runs whatever code it holds."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, OSError, RuntimeError, EOFError, ValueError) as exc:
        if isinstance(exc, pickle.UnpicklingError) and str(exc).startswith("Weights only load failed"):
            raise error(f"{name or path}: holds pickled objects other than tensors, so it is not loaded (only "
                        f"weights-only checkpoints are read; this is no checkpoint gpt2ops wrote)") from None
        raise error(f"{name or path}: not a readable training checkpoint ({one_line(exc)})") from exc
