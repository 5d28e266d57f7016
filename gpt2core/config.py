"""Typed Cerebras Model Zoo GPT-2 configuration: the five YAML sections as pydantic models.

    params = load_params("gpt2_tiny", {"runconfig.max_steps": 50})
    params.model.hidden_size, params.optimizer.learning_rate, params.to_flat_dict()

A config is a name from ``configs/`` (``gpt2_small``), a local YAML path or an ``s3://`` URI. Both
key generations of the reference are read (1.x ``weight_decay_rate``, ``beta1``/``beta2``, schedule
``steps``/``decay_steps``, ``ExponentialDecay``; 2.x ``weight_decay``, ``betas``, ``total_iters``);
configs are written back with 2.x keys. Types are strict (``5.0`` is no integer, ``1`` no boolean),
every number is finite and within its range, and every problem is one ``ConfigError`` line naming
the key path (``optimizer.learning_rate.1.end_learning_rate``) and what was expected; unknown keys
get a "did you mean".

Keys the Cerebras reference does not have are torch-side extensions, marked "torch" below.

Every key of the GPT-2 configs the Model Zoo published (releases 1.6 to 2.3; 2.4 and later ship
none) loads. Keys that only matter on the Cerebras appliance, or that a release read and ignored,
carry a ``NoEffect`` mark: ``no_effect_keys(params, target)`` lists those a config sets, for the
log and the validate report. New keys of that kind default to None and are left out of
``to_dict`` until given, so ``config_hash`` of a config without them never changes.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import re
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from annotated_types import Ge, Gt, Lt, MinLen
from pydantic import (AllowInfNan, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Strict, Tag,
                      ValidationError, model_validator)
from pydantic_core import PydanticCustomError

import gpt2core
from gpt2core.errors import ConfigError, one_line
from gpt2core.platform.settings import settings


def configs_dir() -> Path:
    """The bundled configs: $GPT2OPS_CONFIG_DIR, else configs/ beside the package. A checkout has
    configs/ there; an installed wheel has not, so the container images (containers/Dockerfile) put
    them elsewhere and set the variable."""
    return settings().config_dir or Path(gpt2core.__file__).resolve().parent.parent / "configs"


def _number_from_yaml_string(value: Any) -> Any:
    # YAML 1.1 reads "1e-5" (no dot) as a string; it is plainly meant as a number.
    if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value.strip()):
        return float(value)
    return value


# Value types of the config. Sections are strict: an integer key refuses 5.0 and True, a number
# refuses "5" and True (an integer is a number), and no number may be NaN or infinite.
Number = Annotated[float, BeforeValidator(_number_from_yaml_string), AllowInfNan(False)]
Positive = Annotated[Number, Gt(0)]
NonNegative = Annotated[Number, Ge(0)]
Rate = Annotated[Number, Ge(0), Lt(1)]  # dropout rates, Adam betas
PositiveInt = Annotated[int, Gt(0)]
NonNegativeInt = Annotated[int, Ge(0)]


class _Section(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", validate_assignment=True)


ALL_TARGETS = ("cpu", "gpu", "cerebras")  # gpt2core.targets.TARGETS (not imported: config stays a leaf)
TORCH = ("cpu", "gpu")


@dataclass(frozen=True)
class NoEffect:
    """Annotation metadata of a key that is accepted, as the reference accepts it, but changes nothing
    on ``targets`` (``why`` says so); ``unless(params, target)`` names the settings where it does."""

    targets: tuple[str, ...]
    why: str
    unless: Callable[[Any, str], bool] | None = None


def _unless_given() -> Any:
    """The default of a key added after config_hash was pinned (a key only older releases read, or a
    new torch option): None when not given, and then left out of ``to_dict`` (and so of
    ``config_hash``)."""
    return Field(None, exclude_if=lambda value: value is None)


def _problem(message: str, key: str | None = None) -> PydanticCustomError:
    """A problem found by a validator of a section. ``key`` is relative to the section; ``{at}`` in
    the message stands for the section's own key path (``optimizer.learning_rate.0.``)."""
    return PydanticCustomError("config", "{message}", {"message": message, "key": key})


def _renamed(data: Any, renames: dict[str, str]) -> Any:
    """``data`` with the 1.x keys of ``renames`` under their 2.x names; both given is ambiguous."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for old, new in renames.items():
        if old in data:
            if new in data:
                raise _problem(f"{{at}}{old} and {{at}}{new} are the same setting (1.x and 2.x names); "
                               f"give only {{at}}{new}")
            data[new] = data.pop(old)
    return data


class InputParams(_Section):
    """``train_input`` / ``eval_input``: where the HDF5 data is and how it is batched."""

    data_dir: str
    batch_size: PositiveInt  # the global batch, split evenly across data-parallel ranks
    data_processor: Annotated[str, NoEffect(TORCH, "one HDF5 reader serves both Model Zoo data processors")] = \
        "GptHDF5MapDataProcessor"
    vocab_size: PositiveInt = 50257
    max_sequence_length: PositiveInt = 1024
    shuffle: bool = False
    shuffle_seed: NonNegativeInt = 1
    num_workers: NonNegativeInt = 0
    prefetch_factor: PositiveInt | None = None  # batches each worker loads ahead (with num_workers > 0)
    persistent_workers: bool = False  # keep the workers between epochs (with num_workers > 0)
    drop_last: bool = True
    repeat: Annotated[bool, NoEffect(ALL_TARGETS, "training data always repeats until max_steps (no "
                                                  "PyTorch GPT-2 processor of the reference reads it)")] = True


class InitializerParams(_Section):
    """A weight initializer of the reference: ``normal`` or ``truncated_normal`` (bounds a, b absolute)."""

    name: Literal["normal", "truncated_normal"] = "normal"
    mean: Number = 0.0
    std: NonNegative = 0.02
    a: Number | None = None
    b: Number | None = None

    @model_validator(mode="after")
    def _check_bounds(self) -> InitializerParams:
        if self.a is not None and self.b is not None and not self.a < self.b:
            raise _problem(f"expected a < b (the truncation bounds), got a={self.a}, b={self.b}", "b")
        return self


class ModelParams(_Section):
    """``model``: the GPT-2 architecture, loss and precision."""

    hidden_size: PositiveInt
    num_hidden_layers: PositiveInt
    num_heads: PositiveInt
    filter_size: PositiveInt
    vocab_size: PositiveInt = 50257  # the tokenizer's ids
    # torch: rows of the embedding and output head, past vocab_size for faster matmuls (50304 = 64 x 786,
    # as nanoGPT and llm.c train); the logits of the extra ids are masked out of the loss and sampling.
    padded_vocab_size: PositiveInt | None = _unless_given()
    max_position_embeddings: PositiveInt = 1024
    position_embedding_type: str = "learned"
    use_position_embedding: bool = True
    share_embedding_weights: bool = True
    embedding_dropout_rate: Rate | None = None  # None: same as dropout_rate
    dropout_rate: Rate = 0.1
    attention_type: Literal["scaled_dot_product"] = "scaled_dot_product"
    attention_dropout_rate: Rate = 0.1
    use_projection_bias_in_attention: bool = True
    use_ffn_bias_in_attention: bool = True
    use_ffn_bias: bool = True
    # exact erf GELU, or its tanh approximation (OpenAI's weights)
    nonlinearity: Literal["gelu", "gelu_new"] = "gelu"
    layer_norm_epsilon: Positive = 1.0e-5
    use_bias_in_output: bool = False
    initializer_range: NonNegative = 0.02
    embedding_initializer: InitializerParams | None = None
    initializer: InitializerParams | None = None
    output_layer_initializer: InitializerParams | None = None  # None: std / sqrt(2 * layers)
    loss_scaling: Literal["num_tokens", "batch_size"] = "num_tokens"
    loss_weight: Annotated[Positive, NoEffect(
        ALL_TARGETS, "loss_scaling num_tokens divides by the real tokens; loss_weight scales batch_size "
                     "scaling only (Model Zoo 1.9+ resets it to 1.0)",
        unless=lambda p, _: p.model.loss_scaling == "batch_size" or p.model.loss_weight == 1.0)] = 1.0
    mixed_precision: Annotated[bool, NoEffect(("cpu",), "CPU runs are fp32")] = False
    fp16_type: Annotated[Literal["bfloat16", "float16", "cbfloat16"], NoEffect(
        TORCH, "CPU runs are fp32, and so are GPU runs without model.mixed_precision",
        unless=lambda p, target: target == "gpu" and p.model.mixed_precision)] = "bfloat16"
    precision_opt_level: Annotated[NonNegativeInt | None, NoEffect(TORCH, "numerics level of the wafer")] = None
    boundary_casting: Annotated[bool, NoEffect(ALL_TARGETS, "a TensorFlow GPT-2 option (1.6-1.8)")] = False
    tf_summary: Annotated[bool, NoEffect(ALL_TARGETS, "a TensorFlow GPT-2 option (1.6-1.8)")] = False
    allow_multireplica: Annotated[bool | None, NoEffect(
        ALL_TARGETS, "pipeline-mode replicas of the 1.x appliance (gone in 2.0)")] = _unless_given()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def embedding_rows(self) -> int:
        """Rows of the token embedding and output head: padded_vocab_size, else vocab_size."""
        return self.padded_vocab_size or self.vocab_size

    @model_validator(mode="before")
    @classmethod
    def _read_1x_loss(cls, data: Any) -> Any:
        # Model Zoo 1.6-1.7 had no loss_scaling: the loss was sum / batch * loss_weight. From 1.8 a
        # loss_weight other than 1 needs loss_scaling batch_size (1.8 asserts, 1.9+ resets it to 1),
        # so a config that sets one without loss_scaling is a 1.x config and means batch scaling.
        if (isinstance(data, dict) and "loss_scaling" not in data
                and isinstance(data.get("loss_weight"), (int, float)) and data["loss_weight"] != 1):
            data = {**data, "loss_scaling": "batch_size"}
        return data

    @model_validator(mode="after")
    def _check_architecture(self) -> ModelParams:
        if self.hidden_size % self.num_heads:
            raise _problem(f"model.hidden_size {self.hidden_size} must be divisible by num_heads "
                           f"{self.num_heads}", "num_heads")
        if self.padded_vocab_size is not None and self.padded_vocab_size < self.vocab_size:
            raise _problem(f"expected at least model.vocab_size ({self.vocab_size}), got {self.padded_vocab_size}",
                           "padded_vocab_size")
        if self.position_embedding_type != "learned" or not self.use_position_embedding:
            raise _problem(f"GPT-2 uses learned position embeddings, got {self.position_embedding_type!r}",
                           "position_embedding_type")
        return self


_SCHEDULE_KEYS = {  # the keys each scheduler needs; only the last entry may run until max_steps
    "Linear": ("initial_learning_rate", "end_learning_rate", "total_iters"),
    "CosineDecay": ("initial_learning_rate", "end_learning_rate", "total_iters"),
    "Constant": ("learning_rate",),
    "Exponential": ("initial_learning_rate", "decay_rate", "total_iters"),
}


class SchedulerParams(_Section):
    """One entry of ``optimizer.learning_rate``; entries run one after the other."""

    scheduler: Literal["Linear", "Constant", "CosineDecay", "Exponential"]
    initial_learning_rate: NonNegative | None = None  # Linear, CosineDecay, Exponential
    end_learning_rate: NonNegative | None = None  # Linear, CosineDecay
    learning_rate: NonNegative | None = None  # Constant
    total_iters: PositiveInt | None = None  # may be left out on a last Constant entry only
    decay_rate: NonNegative | None = None  # Exponential: lr = initial * decay_rate ** (step / total_iters)
    staircase: bool = False
    # 1.7-2.0 small configs: `alpha: 0.1  # Decay by 10x` on a Linear entry. Only TensorFlow's cosine
    # read it (a floor of alpha * initial); every PyTorch release ignored it (2.2+ refuses it), so the
    # entry decays to end_learning_rate.
    alpha: Annotated[NonNegative | None, NoEffect(
        ALL_TARGETS, "the PyTorch reference ignores it: the entry ends at end_learning_rate")] = _unless_given()

    @property
    def start_lr(self) -> float:
        return self.learning_rate if self.scheduler == "Constant" else self.initial_learning_rate

    @model_validator(mode="before")
    @classmethod
    def _read_1x_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "steps" in data and "decay_steps" in data:
            # 1.7-1.9 read them as one setting (steps wins); 1.7 small_ws gives both, equal.
            if data["steps"] != data["decay_steps"]:
                raise _problem(f"{{at}}steps {data['steps']} and {{at}}decay_steps {data['decay_steps']} "
                               f"differ; they are one setting (total_iters): give one")
            data = {k: v for k, v in data.items() if k != "decay_steps"}
        data = _renamed(data, {"steps": "total_iters", "decay_steps": "total_iters"})
        if isinstance(data, dict) and data.get("scheduler") == "ExponentialDecay":
            data["scheduler"] = "Exponential"
        return data

    @model_validator(mode="after")
    def _check_keys(self) -> SchedulerParams:
        missing = [name for name in _SCHEDULE_KEYS[self.scheduler] if getattr(self, name) is None]
        if missing:
            raise _problem(f"missing required key for {self.scheduler}", missing[0])
        return self


# One constant learning rate, or a schedule of entries (a tagged union: errors name the entry's keys).
LearningRate = Annotated[Union[Annotated[NonNegative, Tag("constant")],
                               Annotated[list[SchedulerParams], MinLen(1), Tag("schedule")]],
                         Discriminator(lambda v: "schedule" if isinstance(v, list) else "constant")]
# A static loss scale, or "dynamic".
LossScale = Annotated[Union[Annotated[Positive, Tag("static")], Annotated[Literal["dynamic"], Tag("name")]],
                      Discriminator(lambda v: "name" if isinstance(v, str) else "static")]


def schedule_milestones(learning_rate: list[SchedulerParams]) -> list[int]:
    """The steps at which each entry of a chained schedule hands over to the next."""
    return list(itertools.accumulate(s.total_iters for s in learning_rate[:-1]))


_FP16_ONLY = NoEffect(TORCH, "loss scaling serves fp16 only: model.mixed_precision with fp16_type float16 "
                              "on a GPU",
                      unless=lambda p, target: target == "gpu" and p.model.mixed_precision
                      and p.model.fp16_type == "float16")


def schedule_overrun(optimizer: OptimizerParams, max_steps: int) -> str | None:
    """Why ``max_steps`` trains past the end of the learning-rate schedule, or None when it does not.

    A schedule whose last entry is Linear or CosineDecay ends after the sum of its entries'
    ``total_iters`` and then holds its last ``end_learning_rate`` (``gpt2core.training.schedule``):
    steps past that end train at the floor rate. A constant rate, a last Constant entry (meant to
    run until max_steps) and a last Exponential entry (it keeps decaying) never end."""
    schedule = optimizer.learning_rate
    if not isinstance(schedule, list) or schedule[-1].scheduler not in ("Linear", "CosineDecay"):
        return None
    end = sum(s.total_iters for s in schedule)
    if max_steps <= end:
        return None
    return (f"runconfig.max_steps {max_steps} runs past the end of the learning-rate schedule at step "
            f"{end} (the sum of optimizer.learning_rate total_iters): steps {end + 1}-{max_steps} train at "
            f"its final rate {schedule[-1].end_learning_rate:g}; to decay over the whole run set the last "
            f"entry's total_iters to {schedule[-1].total_iters + max_steps - end}")


class OptimizerParams(_Section):
    """``optimizer``: AdamW, its learning-rate schedule, clipping and fp16 loss scaling."""

    learning_rate: LearningRate
    optimizer_type: str = "AdamW"
    betas: Annotated[tuple[Rate, Rate], Strict(False)] = (0.9, 0.999)  # a YAML list
    eps: Positive = 1.0e-8
    weight_decay: NonNegative = 0.0
    correct_bias: bool = True
    max_gradient_norm: Positive | None = None
    grad_accum_steps: PositiveInt = 1  # torch: micro-batches per optimizer step
    loss_scaling_factor: Annotated[LossScale, _FP16_ONLY] = "dynamic"  # fp16 only
    initial_loss_scale: Annotated[Positive | None, _FP16_ONLY] = None
    max_loss_scale: Annotated[Positive | None, NoEffect(TORCH, "a bound of the appliance's dynamic loss "
                                                               "scaling")] = None
    disable_lr_steps_reset: Annotated[bool | None, NoEffect(
        ALL_TARGETS, "read by the 1.x appliance's scheduler only")] = _unless_given()

    @model_validator(mode="before")
    @classmethod
    def _read_1x_keys(cls, data: Any) -> Any:
        # 1.x spellings; `epsilon` and `use_bias_correction` are TensorFlow's, which the 1.7-1.9
        # small configs carry (the 1.x PyTorch path ignored them: eps 1e-6, correct_bias False).
        data = _renamed(data, {"weight_decay_rate": "weight_decay", "epsilon": "eps",
                               "use_bias_correction": "correct_bias"})
        if isinstance(data, dict) and ("beta1" in data or "beta2" in data):
            if "betas" in data:
                raise _problem("{at}beta1/beta2 and {at}betas are the same setting; give only betas")
            data["betas"] = [data.pop("beta1", 0.9), data.pop("beta2", 0.999)]
        return data

    @model_validator(mode="after")
    def _check(self) -> OptimizerParams:
        if self.optimizer_type.lower() not in ("adamw", "adam"):
            raise _problem(f"expected AdamW or Adam, got {self.optimizer_type!r}", "optimizer_type")
        if isinstance(self.learning_rate, list):
            for i, s in enumerate(self.learning_rate[:-1]):
                if s.total_iters is None:
                    raise _problem("missing required key (only the last scheduler may run until max_steps)",
                                   f"learning_rate.{i}.total_iters")
        return self


_APPLIANCE = NoEffect(TORCH, "Cerebras appliance")
_TORCH_ONLY = NoEffect(("cerebras",), "torch trainer option; the Cerebras SDK compiles for the wafer")


class RunConfigParams(_Section):
    """``runconfig``: how long to run, logging, checkpoints, seeds and (torch) execution options."""

    max_steps: PositiveInt
    log_steps: PositiveInt = 100
    checkpoint_steps: NonNegativeInt = 0  # 0: only a final checkpoint
    save_initial_checkpoint: bool = False
    keep_last_checkpoints: PositiveInt = 3  # torch: older step checkpoints are deleted
    seed: NonNegativeInt = 1
    eval_steps: PositiveInt | None = None  # None: the whole eval set
    eval_frequency: NonNegativeInt | None = None  # torch: evaluate every N training steps (0, None: at the end)
    model_dir: str = "./model_dir"
    checkpoint_path: str | None = None
    mode: Annotated[str, NoEffect(ALL_TARGETS, "the gpt2ops command chooses (train, evaluate, ...)")] = "train"
    validate_only: Annotated[bool, NoEffect(ALL_TARGETS, "gpt2ops validate is the validate_only run")] = False
    compile_only: Annotated[bool, NoEffect(ALL_TARGETS, "gpt2ops compile is the compile_only run")] = False
    num_csx: Annotated[PositiveInt, _APPLIANCE] = 1
    num_workers_per_csx: Annotated[NonNegativeInt, _APPLIANCE] = 0
    # Cerebras Wafer-Scale Cluster (target cerebras), as the reference 2.x runconfig names them.
    # "<host>:<port>" of the cluster management server
    mgmt_address: Annotated[str | None, _APPLIANCE] = None
    mgmt_namespace: Annotated[str | None, _APPLIANCE] = None
    credentials_path: Annotated[str | None, _APPLIANCE] = None  # TLS certificate of the cluster
    mount_dirs: Annotated[list[str], _APPLIANCE] = []  # folders the appliance workers mount
    python_paths: Annotated[list[str], _APPLIANCE] = []  # added to the workers' PYTHONPATH
    compile_dir: Annotated[str | None, _APPLIANCE] = None  # appliance compile cache folder (None: the SDK's)
    job_labels: Annotated[list[str], _APPLIANCE] = []  # "key=value" labels of appliance jobs
    job_priority: Annotated[str | None, _APPLIANCE] = None  # p1, p2 or p3 (None: the cluster's default)
    job_time_sec: Annotated[PositiveInt | None, _APPLIANCE] = None
    disable_version_check: Annotated[bool, _APPLIANCE] = False
    show_debug_metrics: Annotated[bool, NoEffect(ALL_TARGETS, "debug metrics of the 1.x runner")] = False
    save_losses: bool = False
    torch_compile: Annotated[bool, _TORCH_ONLY] = False  # torch: torch.compile the model (gpu target)
    # torch: how torchrun ranks share the model (fsdp: FSDP2 fully_shard)
    parallelism: Annotated[Literal["ddp", "fsdp"], _TORCH_ONLY] = "ddp"
    activation_checkpointing: Annotated[bool, _TORCH_ONLY] = False  # torch: recompute each block in backward
    sample_prompts: list[str] = ["The meaning of life is"]
    sample_max_new_tokens: NonNegativeInt = 64  # evaluate: length of each text sample
    sample_temperature: Positive = 0.8
    sample_top_k: PositiveInt | None = 40


class Params(_Section):
    """A whole config: the five sections of the Cerebras reference."""

    train_input: InputParams
    eval_input: InputParams
    model: ModelParams
    optimizer: OptimizerParams
    runconfig: RunConfigParams

    @model_validator(mode="after")
    def _check_inputs_fit_model(self) -> Params:
        m = self.model
        for section in ("train_input", "eval_input"):
            inp: InputParams = getattr(self, section)
            if inp.vocab_size != m.vocab_size:
                raise _problem(f"{inp.vocab_size} differs from model.vocab_size {m.vocab_size}",
                               f"{section}.vocab_size")
            if inp.max_sequence_length > m.max_position_embeddings:
                raise _problem(f"expected 1..model.max_position_embeddings ({m.max_position_embeddings}), "
                               f"got {inp.max_sequence_length}", f"{section}.max_sequence_length")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-able dict with 2.x keys; ``load_params`` of it gives back an equal Params."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_flat_dict(self) -> dict[str, Any]:
        """Dotted keys (``optimizer.learning_rate.0.total_iters``) for MLflow params."""
        flat: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                for i, v in enumerate(value):
                    walk(f"{prefix}.{i}", v)
            else:
                flat[prefix] = value

        walk("", self.to_dict())
        return flat

    def config_hash(self) -> str:
        """Short sha256 of the canonical config: equal configs hash equal whatever the key generation.
        Tagged on MLflow runs and model versions: the canonical form must not change."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def no_effect_keys(params: Params, target: str) -> list[str]:
    """The keys ``params`` sets (explicitly, not by default) that change nothing on ``target`` (cpu,
    gpu, cerebras), one line each: ``"model.allow_multireplica: accepted, no effect on target gpu
    (why)"``. The stages that train log them once, and validate lists them in its report."""
    return [f"{key}: accepted, no effect on target {target} ({mark.why})"
            for key, mark in _marked_keys(params, "")
            if target in mark.targets and not (mark.unless and mark.unless(params, target))]


def _marked_keys(section: BaseModel, prefix: str) -> Iterator[tuple[str, NoEffect]]:
    for name in sorted(section.model_fields_set, key=list(type(section).model_fields).index):
        value, key = getattr(section, name), f"{prefix}{name}"
        mark = next((m for m in type(section).model_fields[name].metadata if isinstance(m, NoEffect)), None)
        if mark is not None:
            yield key, mark
        entries = value if isinstance(value, list) else [value]
        for i, entry in enumerate(entries):
            if isinstance(entry, BaseModel):
                yield from _marked_keys(entry, f"{key}.{i}." if isinstance(value, list) else f"{key}.")


# ----------------------------------------------------------------------------- loading


def available_configs() -> list[str]:
    return sorted(p.stem for p in configs_dir().glob("*.yaml"))


def load_params(params: str | Path, overrides: dict[str, object] | None = None) -> Params:
    """Read config ``params`` (bundled name, local YAML path or s3:// URI), apply dotted
    ``overrides`` (``{"runconfig.max_steps": 50}``) and check it. Raises ConfigError naming the key."""
    source = str(params)
    try:
        raw = yaml.safe_load(_read_config_text(source))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({one_line(exc)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a YAML mapping with sections {', '.join(Params.model_fields)}")
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    return params_from_dict(raw, source=source)


def params_from_dict(raw: Any, *, source: str = "<dict>") -> Params:
    """Check a config given as a mapping (as ``yaml.safe_load`` reads it). Raises ConfigError
    ``"<source>: <key path>: <what was expected>"`` for the first problem found."""
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_first_problem(exc)}") from None


def parse_override(text: str) -> tuple[str, object]:
    """``"runconfig.max_steps=50"`` -> ``("runconfig.max_steps", 50)``; the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected KEY.PATH=VALUE, e.g. runconfig.max_steps=50")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({one_line(exc)})") from None


def _read_config_text(source: str) -> str:
    local = Path(source).expanduser()
    if local.is_file():
        return local.read_text()
    if source.startswith("s3://"):
        from gpt2core.platform.artifacts import NotFound, read_text

        try:
            return read_text(source)
        except NotFound:
            raise ConfigError(f"{source}: no such config file") from None
    bundled = configs_dir() / (source if source.endswith(".yaml") else f"{source}.yaml")
    if "/" not in source and bundled.is_file():
        return bundled.read_text()
    raise ConfigError(f"{source}: no such config file or bundled config "
                      f"(bundled: {', '.join(available_configs())})")


def _set_dotted(raw: dict[str, Any], dotted: str, value: object) -> None:
    parts = dotted.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        path = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, path)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {dotted}: {path} is a {type(node).__name__}, not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, dotted)] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, path: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {path}: expected a list index below {len(node)}")
    return int(part)


# ----------------------------------------------------------------------------- error messages


def _first_problem(exc: ValidationError) -> str:
    """pydantic's first error as ``<key path>: <what was expected>, got <value>``."""
    error = exc.errors()[0]
    path, tp, section = _resolve(error["loc"])
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind == "config":  # raised by a section's validator
        at = "".join(f"{p}." for p in path)
        message = ctx["message"].replace("{at}", at)
        return f"{at}{ctx['key']}: {message}" if ctx["key"] else message
    if kind == "missing" and path and isinstance(path[-1], int):  # a short fixed-length list
        path, tp, _ = _resolve(error["loc"][:-1])
        kind = "tuple_type"
    key = ".".join(map(str, path)) or "config"
    if kind in ("extra_forbidden", "invalid_key"):
        fields = list(section.model_fields) if section else []
        parent = key.rpartition(".")[0]
        close = difflib.get_close_matches(str(path[-1]), fields, n=1)
        hint = (f"; did you mean {parent + '.' if parent else ''}{close[0]}?" if close
                else f" (known: {', '.join(fields)})")
        return f"{key}: unknown key{hint}"
    if tp is None:  # pragma: no cover - an error pydantic reports where no key of ours is
        return f"{key}: {error['msg']}"
    if kind == "missing":
        return f"{key}: missing required key ({_expected(tp)})"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"):
        return f"{key}: expected {_expected(tp, bounds=True)}, got {value}"
    options = re.findall(r"'([^']*)'", ctx.get("expected", "")) if isinstance(value, str) else []
    hint = "".join(f"; did you mean {c}?" for c in difflib.get_close_matches(str(value), options, n=1))
    return f"{key}: expected {_expected(tp)}, got {_describe(value)}{hint}"


def _resolve(loc: tuple[str | int, ...]) -> tuple[list[str | int], Any, type[BaseModel] | None]:
    """The key path of a pydantic error location (union tags left out), the annotation there (a
    union when the error is about the union's value) and the section holding its last key (None
    past an unknown key)."""
    tp: Any = Params
    path: list[str | int] = []
    section: type[BaseModel] | None = None
    for i, part in enumerate(loc):
        base, _ = _strip(tp)
        if isinstance(base, type) and issubclass(base, BaseModel):
            section = base
            field = base.model_fields.get(str(part))
            tp = field and (Annotated[(field.annotation, *field.metadata)] if field.metadata
                            else field.annotation)
        elif typing.get_origin(base) in (list, tuple) and isinstance(part, int):
            args = typing.get_args(base)
            tp = args[0] if typing.get_origin(base) is list else args[min(part, len(args) - 1)]
        elif typing.get_origin(base) in (Union, types.UnionType):  # a tag of a discriminated union
            if i < len(loc) - 1:
                tp = next(arm for arm in typing.get_args(base) if Tag(str(part)) in _strip(arm)[1])
            continue
        else:
            tp = None
        path.append(part)
    return path, tp, section


def _strip(tp: Any) -> tuple[Any, list[Any]]:
    """(the type under Annotated and Optional, the Annotated metadata)."""
    metadata: list[Any] = []
    while True:
        if typing.get_origin(tp) is Annotated:
            metadata += tp.__metadata__
            tp = tp.__origin__
        elif typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp):
            arms = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(arms) != 1:
                return tp, metadata
            tp = arms[0]
        else:
            return tp, metadata


_TYPE_NAMES = {bool: ("a boolean", "booleans"), int: ("an integer", "integers"),
               float: ("a number", "numbers"), str: ("a string", "strings")}


def _expected(tp: Any, *, bounds: bool = False) -> str:
    """What a value of annotation ``tp`` must be, in words; with ``bounds``, its range too (``a
    finite number in [0, 1)``)."""
    base, metadata = _strip(tp)
    origin, args = typing.get_origin(base), typing.get_args(base)
    if origin in (Union, types.UnionType):
        text = " or ".join(_expected(arm, bounds=bounds) for arm in args if arm is not type(None))
    elif origin is Literal:
        text = f"one of {', '.join(repr(a) for a in args)}" if len(args) > 1 else repr(args[0])
    elif origin is list:
        non_empty = any(isinstance(m, MinLen) for m in metadata)
        text = f"a {'non-empty ' if non_empty else ''}list of {_plural(args[0])}"
    elif origin is tuple:
        text = f"a list of {len(args)} {_plural(args[0])}"
    elif isinstance(base, type) and issubclass(base, BaseModel):
        text = f"a mapping of {base.__name__} keys"
    else:
        text = _TYPE_NAMES[base][0]
        if bounds:
            text = text.replace("a number", "a finite number") + _range(metadata)
    while typing.get_origin(tp) is Annotated:
        tp = tp.__origin__
    if tp is not base and type(None) in typing.get_args(tp):  # Optional
        text += " or null"
    return text


def _range(metadata: list[Any]) -> str:
    """`` in [0, 1)``, `` > 0``, `` >= 0`` or nothing: the bounds of the value types above."""
    low = next((m for m in metadata if isinstance(m, (Gt, Ge))), None)
    high = next((m for m in metadata if isinstance(m, Lt)), None)
    if low is None:
        return ""
    bound = low.gt if isinstance(low, Gt) else low.ge
    if high is not None:
        return f" in {'(' if isinstance(low, Gt) else '['}{bound}, {high.lt})"
    return f" {'>' if isinstance(low, Gt) else '>='} {bound}"


def _plural(tp: Any) -> str:
    base, _ = _strip(tp)
    if isinstance(base, type) and issubclass(base, BaseModel):
        return f"{base.__name__} mappings"
    return _TYPE_NAMES[base][1] if base in _TYPE_NAMES else _expected(tp)


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) < 60 else text[:57] + '...'}"
