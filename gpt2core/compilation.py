"""Compile the training step ahead of training (the reference's compile_only, cpu/gpu targets).

The trainer's own step (model, parallel wrapper, optimizer; ``runconfig.torch_compile: true``) runs
twice on a synthetic batch of the configured shape, each time in a fresh process with an empty
Inductor cache: first cold, then saving ``torch.compiler.save_cache_artifacts()``; then warm, after
``load_cache_artifacts``, which is what the train stage does with ``load_compile_cache``. The
first-step times of the two processes are the cold and warm compile times.

Caches hit only for the same torch version, device type and graph: same config, one process.
Multi-GPU training compiles per-rank graphs (DDP splits at bucket boundaries) that partly differ.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from gpt2core import errors
from gpt2core.config import Params, load_params
from gpt2core.errors import StorageError
from gpt2core.platform.child_process import child_main, run_child_module

log = logging.getLogger(__name__)

CACHE_FILE = "torch_compile_cache.bin"
REPORT_FILE = "compile_report.json"


@dataclass
class CompileReport:
    target: str
    device: str
    torch_version: str
    cold_s: float  # first training step with empty caches: tracing + compiling + running
    warm_s: float  # first training step in a new process after load_cache_artifacts
    step_s: float  # a compiled step once warm (what is left of the first step's time is compiling)
    # CPU seconds of each whole process (compilers included): steadier than wall time on a busy host
    cold_cpu_s: float
    warm_cpu_s: float
    cache_bytes: int
    cache_entries: dict[str, int]

    @property
    def speedup(self) -> float:
        return self.cold_s / self.warm_s if self.warm_s > 0 else float("nan")


def compile_training_step(params: Params, target: str, out_dir: Path, *, timeout_s: float = 3600) -> CompileReport:
    """Cold compile (saving the caches to out_dir/CACHE_FILE), then a warm start from them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_file = out_dir / CACHE_FILE
    with tempfile.TemporaryDirectory(prefix="gpt2ops-compile-") as tmp:
        config = Path(tmp) / "params.yaml"
        config.write_text(params.to_yaml())
        log.info("compiling the training step for %s (cold, empty caches)", target)
        cold = _child({"params": str(config), "target": target, "save": str(cache_file)}, Path(tmp) / "cold",
                      timeout_s)
        log.info("cold: first step %.1f s, then %.3f s/step; starting warm from %.1f MB of caches",
                 cold["first_step_s"], cold["step_s"], cache_file.stat().st_size / 1e6)
        warm = _child({"params": str(config), "target": target, "load": str(cache_file)}, Path(tmp) / "warm",
                      timeout_s)
        log.info("warm: first step %.1f s (cache entries loaded: %s)", warm["first_step_s"], warm["cache_entries"])
    return CompileReport(target=target, device=cold["device"], torch_version=cold["torch_version"],
                         cold_s=cold["first_step_s"], warm_s=warm["first_step_s"], step_s=cold["step_s"],
                         cold_cpu_s=cold["process_cpu_s"], warm_cpu_s=warm["process_cpu_s"],
                         cache_bytes=cache_file.stat().st_size, cache_entries=warm["cache_entries"])


def _child(request: dict, scratch: Path, timeout_s: float) -> dict:
    """Time the step in a new Python with its own empty Inductor/Triton caches (its result, or its
    gpt2ops error raised here again as the same class, comes back through a result file)."""
    scratch.mkdir(parents=True)
    env = {"TORCHINDUCTOR_CACHE_DIR": str(scratch / "inductor"), "TRITON_CACHE_DIR": str(scratch / "triton")}
    cpu_before = _children_cpu_s()
    result = run_child_module(sys.executable, "gpt2core.compilation", request,
                              what="compiling the training step", env=env, timeout_s=timeout_s)
    return {**result, "process_cpu_s": _children_cpu_s() - cpu_before}


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for descendants: the child and its gcc
    return usage.ru_utime + usage.ru_stime


def _synthetic_micro_batches(params: Params, batch_size: int):
    """Batches shaped and typed as the HDF5 loader yields them ([B, S] int32)."""
    import torch

    seq, vocab = params.train_input.max_sequence_length, params.model.vocab_size
    generator = torch.Generator().manual_seed(0)
    micro = []
    for _ in range(params.optimizer.grad_accum_steps):
        ids = torch.randint(0, vocab, (batch_size, seq + 1), generator=generator, dtype=torch.int32)
        micro.append({"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
                      "attention_mask": torch.ones(batch_size, seq, dtype=torch.int32)})
    return micro


def time_training_step(params: Params, target: str, *, load: Path | None, save: Path | None) -> dict:
    """In this process: optionally load caches, run the trainer's step twice, optionally save caches."""
    import torch

    from gpt2core.training.parallel import init_distributed
    from gpt2core.training.trainer import Trainer, micro_batch_size

    entries: dict[str, int] = {}
    if load is not None:
        info = torch.compiler.load_cache_artifacts(load.read_bytes())
        entries = {kind: len(names) for kind, names in (info.artifacts.items() if info else [])}
    dist = init_distributed(target)
    with tempfile.TemporaryDirectory(prefix="gpt2ops-compile-work-") as work:
        trainer = Trainer(params, dist, Path(work))
        micro = _synthetic_micro_batches(params, micro_batch_size(params, dist.world_size))
        times = []
        for _ in range(2):
            started = time.perf_counter()
            trainer._step(micro)
            if dist.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
    if save is not None:
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            raise errors.TrainingError("torch.compile produced no cache artifacts to save")
        save.write_bytes(saved[0])
        entries = {kind: len(names) for kind, names in saved[1].artifacts.items()}
    device = torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else "cpu"
    return {"first_step_s": times[0], "step_s": times[1], "device": device,
            "torch_version": torch.__version__, "cache_entries": entries}


def load_compile_cache(folder: Path, source: str) -> dict[str, int]:
    """Hot-load the compile stage's caches (its compile_cache artifact, in the local ``folder``; named
    ``source`` in messages) into this process, before the model is compiled; returns the number of
    entries loaded by kind. A cache made by another torch version is skipped with a warning (it
    could only miss). Loading unpickles the cache's entries: the caller hands in an artifact it
    checked was published by the compile stage (``gpt2core.stages.inputs.vouched_input``)."""
    import torch

    cache, report_file = folder / CACHE_FILE, folder / REPORT_FILE
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    if report.get("compiled") is False:
        log.info("%s: nothing was compiled (%s); training compiles cold", source, report.get("reason"))
        return {}
    if not cache.is_file():
        raise StorageError(f"{source}: no {CACHE_FILE} (expected the compile stage's compile_cache artifact)")
    made_with = report.get("torch_version")
    if made_with and made_with != torch.__version__:
        log.warning("%s: compiled with torch %s, this is %s: not loaded, training compiles cold",
                    source, made_with, torch.__version__)
        return {}
    info = torch.compiler.load_cache_artifacts(cache.read_bytes())
    loaded = {kind: len(names) for kind, names in (info.artifacts.items() if info else [])}
    log.info("loaded compile caches from %s: %s", source, loaded)
    return loaded


def write_report(report: CompileReport, out_dir: Path) -> None:
    (out_dir / REPORT_FILE).write_text(json.dumps({"compiled": True, **asdict(report), "speedup": report.speedup},
                                                  indent=1))


def write_skipped_report(out_dir: Path, reason: str) -> None:
    (out_dir / REPORT_FILE).write_text(json.dumps({"compiled": False, "reason": reason}, indent=1))


def _time_request(request: dict) -> dict:
    """The child side of ``_child``: time the step for the request's config and target."""
    load, save = request.get("load"), request.get("save")
    return time_training_step(load_params(request["params"]), request["target"], load=load and Path(load),
                              save=save and Path(save))


if __name__ == "__main__":
    sys.exit(child_main(_time_request))
