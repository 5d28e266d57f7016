"""Validate a training job before it runs (the reference's validate_only, for the cpu/gpu targets).

Without training anything: the model is built on the meta device (no memory, no time) for its
parameter count and flops per token; the memory of one training process is estimated (weights,
gradients, optimizer state, activations) and set against the target device; the datasets are
checked by ``verify_dataset``. Every problem is collected, so one report lists them all.

Memory model (bytes per parameter, fp32 master weights as the trainer keeps them, AdamW):
weights 4 + gradients 4 + optimizer 8, plus 4 for DDP's gradient buckets; FSDP shards the first
three over the GPUs. Activations per layer and micro-batch follow Korthikanti et al. 2022
("Reducing Activation Recomputation"): 34·s·b·h bytes in 16-bit (doubled in fp32), plus the
attention matrix 5·a·s²·b where no fused (flash) attention kernel runs, i.e. on CPU; activation
checkpointing keeps only each block's input (2·s·b·h in 16-bit) and one block's full set. The
logits and their gradient add 2·b·s·V·4 bytes (the loss is computed in fp32).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from gpt2core.config import Params
from gpt2core.errors import DataError

log = logging.getLogger(__name__)

GB = 1e9
# Memory of one device (GB), by the name users give it in --gpu_type.
GPU_MEMORY_GB = {
    "B200": 192.0, "H200": 141.0, "H100": 80.0, "H800": 80.0, "A100": 80.0, "A100-40GB": 40.0,
    "L40S": 48.0, "A10G": 24.0, "L4": 24.0, "V100": 32.0, "T4": 16.0,
}
RUNTIME_OVERHEAD_GB = {"gpu": 1.5, "cpu": 0.5}  # CUDA context and allocator slack / interpreter + torch
USABLE_FRACTION = 0.9  # fragmentation: plan for 90 % of the device


@dataclass
class ModelFacts:
    num_params: int  # all parameters, tied head counted once
    num_params_non_embedding: int
    flops_per_token: int  # training (forward + backward), at train_input.max_sequence_length


@dataclass
class MemoryEstimate:
    """Per training process (one GPU, or the CPU host), in GB."""

    weights_gb: float
    grads_gb: float
    optimizer_gb: float
    ddp_buckets_gb: float
    activations_gb: float
    overhead_gb: float
    total_gb: float
    device_gb: float
    micro_batch_size: int

    @property
    def fits(self) -> bool:
        return self.total_gb <= USABLE_FRACTION * self.device_gb


@dataclass
class ValidationReport:
    target: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    datasets: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"ok": self.ok, **asdict(self)}

    def to_markdown(self) -> str:
        lines = [f"# Validation report ({self.target})", "",
                 f"**{'OK' if self.ok else f'{len(self.problems)} problem(s)'}**", ""]
        if self.problems:
            lines += ["## Problems", ""] + [f"- {p}" for p in self.problems] + [""]
        if self.notes:
            lines += ["## Notes", ""] + [f"- {n}" for n in self.notes] + [""]
        for title, section in (("Config", self.config), ("Model", self.model), ("Memory", self.memory)):
            if section:
                lines += [f"## {title}", "", "| key | value |", "|---|---|"]
                lines += [f"| {k} | {_shown(v)} |" for k, v in section.items()] + [""]
        if self.datasets:
            lines += ["## Datasets", "", "| split | uri | sequences | tokens | files |", "|---|---|---|---|---|"]
            for key, d in self.datasets.items():
                lines.append(f"| {key} | {d.get('uri', '')} | {d.get('num_sequences', '-')} | "
                             f"{d.get('num_tokens', '-')} | {d.get('files', '-')} |")
            lines.append("")
        return "\n".join(lines)


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:,.3f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)


def model_facts(params: Params) -> ModelFacts:
    """Parameter count and flops/token of the configured model, built on the meta device."""
    import torch

    from gpt2core.model import GPT2

    with torch.device("meta"):
        model = GPT2(params.model)
    return ModelFacts(num_params=model.num_params(non_embedding=False),
                      num_params_non_embedding=model.num_params(),
                      flops_per_token=model.flops_per_token(params.train_input.max_sequence_length))


def estimate_memory(params: Params, num_params: int, *, target: str, num_devices: int,
                    device_gb: float) -> MemoryEstimate:
    """Memory of one training process; see the module docstring for the model."""
    from gpt2core.precision import autocast_dtype

    m, run = params.model, params.runconfig
    accum = params.optimizer.grad_accum_steps
    micro = max(1, params.train_input.batch_size // max(1, num_devices * accum))
    seq, hidden, heads, layers = params.train_input.max_sequence_length, m.hidden_size, m.num_heads, m.num_hidden_layers
    sharded = run.parallelism == "fsdp" and num_devices > 1
    shard = num_devices if sharded else 1
    weights, grads, optimizer = 4 * num_params / shard, 4 * num_params / shard, 8 * num_params / shard
    ddp_buckets = 4 * num_params if (num_devices > 1 and not sharded) else 0
    half = autocast_dtype(m, "cuda" if target == "gpu" else "cpu") is not None
    scale = 1 if half else 2  # the formula counts 16-bit activations
    per_layer = 34 * seq * micro * hidden * scale
    if target != "gpu":  # no flash attention: the s x s scores are kept for backward
        per_layer += 5 * heads * seq * seq * micro * scale
    if run.activation_checkpointing:
        activations = layers * 2 * seq * micro * hidden * scale + per_layer
    else:
        activations = layers * per_layer
    activations += 2 * micro * seq * m.embedding_rows * 4
    overhead = RUNTIME_OVERHEAD_GB["gpu" if target == "gpu" else "cpu"] * GB
    total = weights + grads + optimizer + ddp_buckets + activations + overhead
    return MemoryEstimate(weights_gb=weights / GB, grads_gb=grads / GB, optimizer_gb=optimizer / GB,
                          ddp_buckets_gb=ddp_buckets / GB, activations_gb=activations / GB,
                          overhead_gb=overhead / GB, total_gb=total / GB, device_gb=device_gb,
                          micro_batch_size=micro)


def device_memory_gb(target: str, gpu_type: str) -> float | None:
    """Memory of one device of the target: the GPU type's, or this host's RAM for cpu."""
    if target == "gpu":
        return GPU_MEMORY_GB.get(gpu_type.upper())
    import psutil

    return psutil.virtual_memory().total / GB


def check_job(params: Params, report: ValidationReport, *, target: str, num_gpus: int, gpu_type: str) -> None:
    """Model size, flops, memory and batch layout: problems and facts into report."""
    facts = model_facts(params)
    report.model = asdict(facts)
    num_devices = num_gpus if target == "gpu" else 1
    if target == "gpu":
        if num_gpus < 1:
            report.problems.append(f"num_gpus: {num_gpus}; the gpu target needs at least 1")
            num_devices = 1
        if gpu_type.upper() not in GPU_MEMORY_GB:
            report.problems.append(f"gpu_type: {gpu_type!r} is unknown; expected one of "
                                   f"{', '.join(GPU_MEMORY_GB)}")
    batch, accum = params.train_input.batch_size, params.optimizer.grad_accum_steps
    if batch % (num_devices * accum):
        report.problems.append(f"train_input.batch_size: {batch} is not divisible by {num_devices} device(s) x "
                               f"optimizer.grad_accum_steps {accum}")
    device_gb = device_memory_gb(target, gpu_type) or GPU_MEMORY_GB["H100"]
    memory = estimate_memory(params, facts.num_params, target=target, num_devices=num_devices, device_gb=device_gb)
    report.memory = {**asdict(memory), "fits": memory.fits,
                     "device": gpu_type.upper() if target == "gpu" else "host RAM"}
    if not memory.fits:
        hint = ("runconfig.parallelism: fsdp, more GPUs, " if target == "gpu" else "") + \
               "runconfig.activation_checkpointing: true, or optimizer.grad_accum_steps > 1"
        report.problems.append(
            f"memory: about {memory.total_gb:.1f} GB per process (weights {memory.weights_gb:.1f}, grads "
            f"{memory.grads_gb:.1f}, optimizer {memory.optimizer_gb:.1f}, activations {memory.activations_gb:.1f}) "
            f"exceeds {USABLE_FRACTION:.0%} of {report.memory['device']}'s {device_gb:.0f} GB; try {hint}")
    if target == "gpu" and not params.model.mixed_precision:
        report.notes.append("model.mixed_precision is false: GPU training runs in fp32 (slower, twice the "
                            "activation memory); set it true for bf16")


def check_dataset(key: str, data_dir: str, local_dir, params: Params, report: ValidationReport) -> dict | None:
    """verify_dataset on one split (already local), against the sequence length and vocabulary of
    the section ``key`` belongs to (``train_input.data_dir``: train_input); problems go into report."""
    from gpt2core.data.verify import verify_dataset

    try:
        section = getattr(params, key.partition(".")[0])  # train_input or eval_input: its own length
        stats = verify_dataset(local_dir, max_seq_length=section.max_sequence_length, vocab_size=section.vocab_size)
    except DataError as exc:
        report.problems.append(f"{key} ({data_dir}): {exc}")
        return None
    report.datasets[key] = {"uri": data_dir, **{k: v for k, v in stats.items() if not isinstance(v, dict)}}
    if stats.get("inverted_mask") or any(s.get("inverted_mask") for s in stats.get("splits", {}).values()):
        report.notes.append(f"{key} ({data_dir}): written with inverted_mask: true (data_params.json); the "
                            f"loader reads the mask flipped back (1 = real token)")
    if not stats.get("num_sequences"):
        report.problems.append(f"{key} ({data_dir}): the split holds no sequences")
    return stats


def check_data_volume(params: Params, train_stats: dict | None, report: ValidationReport) -> None:
    if not train_stats:
        return
    batch, steps = params.train_input.batch_size, params.runconfig.max_steps
    n = train_stats.get("num_sequences", 0)
    if 0 < n < batch:
        report.problems.append(f"train_input.batch_size: {batch} is more than the {n} training sequences "
                               "(no full batch can be formed)")
    elif n and steps * batch > n:
        report.notes.append(f"{steps} steps x batch {batch} = {steps * batch:,} sequences: "
                            f"{steps * batch / n:.1f} epochs over {n:,} training sequences")
