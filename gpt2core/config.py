"""Typed Cerebras Model Zoo GPT-2 configuration: the five YAML sections as dataclasses.

    params = load_params("gpt2_tiny", {"runconfig.max_steps": 50})
    params.model.hidden_size, params.optimizer.learning_rate, params.to_flat_dict()

A config is a name from ``configs/`` (``gpt2_small``), a local YAML path or an ``s3://`` URI. Both
key generations of the reference are read (1.x ``weight_decay_rate``, ``beta1``/``beta2``, schedule
``steps``/``decay_steps``; 2.x ``weight_decay``, ``betas``, ``total_iters``); configs are written back
with 2.x keys. Every problem is a ``ConfigError`` naming the key path (``optimizer.betas``) and what
was expected; unknown keys get a "did you mean".

Keys the Cerebras reference does not have are torch-side extensions, marked "torch" below.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

import gpt2core
from gpt2core.errors import ConfigError
from gpt2core.platform.settings import settings


def configs_dir() -> Path:
    """The bundled configs: $GPT2OPS_CONFIG_DIR, else configs/ beside the package. A checkout has
    configs/ there; an installed wheel has not, so the container images (containers/Dockerfile) put
    them elsewhere and set the variable."""
    return settings().config_dir or Path(gpt2core.__file__).resolve().parent.parent / "configs"


SCHEDULERS = ("Linear", "Constant", "CosineDecay", "Exponential")
NONLINEARITIES = ("gelu", "gelu_new")  # exact erf GELU, tanh approximation (OpenAI's weights)
LOSS_SCALINGS = ("num_tokens", "batch_size")
OPTIMIZERS = ("adamw", "adam")
PARALLELISMS = ("ddp", "fsdp")
FP16_TYPES = ("bfloat16", "float16", "cbfloat16")


@dataclass
class InputParams:
    """``train_input`` / ``eval_input``: where the HDF5 data is and how it is batched."""

    data_dir: str
    batch_size: int  # the global batch, split evenly across data-parallel ranks
    data_processor: str = "GptHDF5MapDataProcessor"
    vocab_size: int = 50257
    max_sequence_length: int = 1024
    shuffle: bool = False
    shuffle_seed: int = 1
    num_workers: int = 0
    prefetch_factor: int | None = None
    persistent_workers: bool = False
    drop_last: bool = True
    repeat: bool = True


@dataclass
class InitializerParams:
    """A weight initializer of the reference: ``normal`` or ``truncated_normal`` (bounds a, b absolute)."""

    name: str = "normal"
    mean: float = 0.0
    std: float = 0.02
    a: float | None = None
    b: float | None = None


@dataclass
class ModelParams:
    """``model``: the GPT-2 architecture, loss and precision."""

    hidden_size: int
    num_hidden_layers: int
    num_heads: int
    filter_size: int
    vocab_size: int = 50257
    max_position_embeddings: int = 1024
    position_embedding_type: str = "learned"
    use_position_embedding: bool = True
    share_embedding_weights: bool = True
    embedding_dropout_rate: float | None = None  # None: same as dropout_rate
    dropout_rate: float = 0.1
    attention_type: str = "scaled_dot_product"
    attention_dropout_rate: float = 0.1
    use_projection_bias_in_attention: bool = True
    use_ffn_bias_in_attention: bool = True
    use_ffn_bias: bool = True
    nonlinearity: str = "gelu"
    layer_norm_epsilon: float = 1.0e-5
    use_bias_in_output: bool = False
    initializer_range: float = 0.02
    embedding_initializer: InitializerParams | None = None
    initializer: InitializerParams | None = None
    output_layer_initializer: InitializerParams | None = None  # None: std / sqrt(2 * layers)
    loss_scaling: str = "num_tokens"
    loss_weight: float = 1.0
    mixed_precision: bool = False
    fp16_type: str = "bfloat16"
    precision_opt_level: int | None = None
    boundary_casting: bool = False
    tf_summary: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class SchedulerParams:
    """One entry of ``optimizer.learning_rate``; entries run one after the other."""

    scheduler: str
    initial_learning_rate: float | None = None  # Linear, CosineDecay, Exponential
    end_learning_rate: float | None = None  # Linear, CosineDecay
    learning_rate: float | None = None  # Constant
    total_iters: int | None = None  # may be left out on the last entry only
    decay_rate: float | None = None  # Exponential: lr = initial * decay_rate ** (step / total_iters)
    staircase: bool = False

    @property
    def start_lr(self) -> float:
        return self.learning_rate if self.scheduler == "Constant" else self.initial_learning_rate


def schedule_milestones(learning_rate: list[SchedulerParams]) -> list[int]:
    """The steps at which each entry of a chained schedule hands over to the next."""
    return list(itertools.accumulate(s.total_iters for s in learning_rate[:-1]))


@dataclass
class OptimizerParams:
    """``optimizer``: AdamW, its learning-rate schedule, clipping and fp16 loss scaling."""

    learning_rate: float | list[SchedulerParams]
    optimizer_type: str = "AdamW"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1.0e-8
    weight_decay: float = 0.0
    correct_bias: bool = True
    max_gradient_norm: float | None = None
    grad_accum_steps: int = 1  # torch: micro-batches per optimizer step
    loss_scaling_factor: float | str = "dynamic"  # fp16 only: "dynamic" or a static scale
    initial_loss_scale: float | None = None
    max_loss_scale: float | None = None


@dataclass
class RunConfigParams:
    """``runconfig``: how long to run, logging, checkpoints, seeds and (torch) execution options."""

    max_steps: int
    log_steps: int = 100
    checkpoint_steps: int = 0  # 0: only a final checkpoint
    save_initial_checkpoint: bool = False
    keep_last_checkpoints: int = 3  # torch: older step checkpoints are deleted
    seed: int = 1
    eval_steps: int | None = None  # None: the whole eval set
    eval_frequency: int | None = None  # torch: evaluate every N training steps (None: only at the end)
    model_dir: str = "./model_dir"
    checkpoint_path: str | None = None
    mode: str = "train"
    validate_only: bool = False
    compile_only: bool = False
    num_csx: int = 1
    num_workers_per_csx: int = 0
    # Cerebras Wafer-Scale Cluster (target cerebras), as the reference 2.x runconfig names them.
    mgmt_address: str | None = None  # "<host>:<port>" of the cluster management server
    mgmt_namespace: str | None = None
    credentials_path: str | None = None  # TLS certificate of the cluster
    mount_dirs: list[str] = field(default_factory=list)  # folders the appliance workers mount
    python_paths: list[str] = field(default_factory=list)  # added to the workers' PYTHONPATH
    compile_dir: str | None = None  # compile cache folder on the appliance (None: the SDK's)
    job_labels: list[str] = field(default_factory=list)  # "key=value" labels of appliance jobs
    job_priority: str | None = None  # p1, p2 or p3 (None: the cluster's default)
    job_time_sec: int | None = None
    disable_version_check: bool = False
    show_debug_metrics: bool = False
    save_losses: bool = False
    torch_compile: bool = False  # torch: torch.compile the model (gpu target)
    parallelism: str = "ddp"  # torch: "ddp" or "fsdp" (FSDP2 fully_shard) across torchrun ranks
    activation_checkpointing: bool = False  # torch: recompute each block in backward
    sample_prompts: list[str] = field(default_factory=lambda: ["The meaning of life is"])
    sample_max_new_tokens: int = 64  # evaluate: length of each text sample
    sample_temperature: float = 0.8
    sample_top_k: int | None = 40


@dataclass
class Params:
    """A whole config: the five sections of the Cerebras reference."""

    train_input: InputParams
    eval_input: InputParams
    model: ModelParams
    optimizer: OptimizerParams
    runconfig: RunConfigParams

    def __post_init__(self) -> None:
        _check_semantics(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-able dict with 2.x keys; ``load_params`` of it gives back an equal Params."""
        return _plain(dataclasses.asdict(self))

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
        """Short sha256 of the canonical config: equal configs hash equal whatever the key generation."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- loading


def available_configs() -> list[str]:
    return sorted(p.stem for p in configs_dir().glob("*.yaml"))


def load_params(path_or_uri_or_name: str | Path, overrides: dict[str, object] | None = None) -> Params:
    """Read a config (bundled name, local path or s3:// URI), apply dotted overrides, type-check it."""
    source = str(path_or_uri_or_name)
    try:
        raw = yaml.safe_load(_read_config_text(source))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a YAML mapping with sections {_section_names()}")
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    return params_from_dict(raw, source=source)


def params_from_dict(raw: dict[str, Any], *, source: str = "<dict>") -> Params:
    try:
        return _build(Params, raw, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def parse_override(text: str) -> tuple[str, object]:
    """``"runconfig.max_steps=50"`` -> ``("runconfig.max_steps", 50)``; the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected KEY.PATH=VALUE, e.g. runconfig.max_steps=50")
    return key.strip(), yaml.safe_load(value)


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


def _section_names() -> str:
    return ", ".join(f.name for f in dataclasses.fields(Params))


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


# 1.x key -> 2.x key, per dataclass. Given both, the config is ambiguous.
_RENAMED = {
    "OptimizerParams": {"weight_decay_rate": "weight_decay"},
    "SchedulerParams": {"steps": "total_iters", "decay_steps": "total_iters"},
}


def _upgrade_keys(cls: type, data: dict[str, Any], path: str) -> dict[str, Any]:
    data = dict(data)
    for old, new in _RENAMED.get(cls.__name__, {}).items():
        if old in data:
            if new in data:
                raise ConfigError(f"{path}{old} and {path}{new} are the same setting (1.x and 2.x "
                                  f"names); give only {path}{new}")
            data[new] = data.pop(old)
    if cls is OptimizerParams and ("beta1" in data or "beta2" in data):
        if "betas" in data:
            raise ConfigError(f"{path}beta1/beta2 and {path}betas are the same setting; give only betas")
        data["betas"] = [data.pop("beta1", 0.9), data.pop("beta2", 0.999)]
    if cls is SchedulerParams and data.get("scheduler") == "ExponentialDecay":
        data["scheduler"] = "Exponential"  # 1.x name
    return data


def _build(cls: type, data: Any, path: str) -> Any:
    """Make dataclass ``cls`` from a mapping, checking every key; ``path`` prefixes error key paths."""
    if not isinstance(data, dict):
        where = path.rstrip(".") or "config"
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} keys, got {_describe(data)}")
    data = _upgrade_keys(cls, data, path)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {path}{close[0]}?" if close else f" (known: {', '.join(fields)})"
            raise ConfigError(f"{path}{key}: unknown key{hint}")
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _coerce(hints[name], data[name], f"{path}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{path}{name}: missing required key ({_type_name(hints[name])})")
    return cls(**values)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arm in (a for a in args if a is not type(None)):
            if dataclasses.is_dataclass(arm) or typing.get_origin(arm) in (list, tuple):
                # A mapping or list meant for a structured arm: its own error names the inner key.
                if isinstance(value, dict if dataclasses.is_dataclass(arm) else (list, tuple)):
                    return _coerce(arm, value, path)
                continue
            try:
                return _coerce(arm, value, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_describe(value)}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{path}.")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list of {_type_name(args[0])}, got {_describe(value)}")
        return [_coerce(args[0], v, f"{path}.{i}") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)} numbers, got {_describe(value)}")
        return tuple(_coerce(a, v, f"{path}.{i}") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "1e-5" (no dot) as a string; it is plainly meant as a number.
        if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a field type this loader does not know is a programming error
        raise TypeError(f"{path}: unsupported field type {tp!r}")
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_describe(value)}")


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    if origin is tuple:
        return f"a list of {len(args)} {_type_name(args[0])}s"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) < 60 else text[:57] + '...'}"


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------- semantic checks


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _check_semantics(p: Params) -> None:
    m, o, r = p.model, p.optimizer, p.runconfig
    for name in ("hidden_size", "num_hidden_layers", "num_heads", "filter_size", "vocab_size",
                 "max_position_embeddings"):
        _require(getattr(m, name) > 0, f"model.{name}", f"expected a positive integer, got {getattr(m, name)}")
    _require(m.hidden_size % m.num_heads == 0, "model.num_heads",
             f"model.hidden_size {m.hidden_size} must be divisible by num_heads {m.num_heads}")
    _require(m.position_embedding_type == "learned" and m.use_position_embedding,
             "model.position_embedding_type",
             f"GPT-2 uses learned position embeddings, got {m.position_embedding_type!r}")
    _require(m.attention_type == "scaled_dot_product", "model.attention_type",
             f"expected 'scaled_dot_product', got {m.attention_type!r}")
    _require(m.nonlinearity in NONLINEARITIES, "model.nonlinearity",
             f"expected one of {NONLINEARITIES}, got {m.nonlinearity!r}")
    _require(m.loss_scaling in LOSS_SCALINGS, "model.loss_scaling",
             f"expected one of {LOSS_SCALINGS}, got {m.loss_scaling!r}")
    _require(m.fp16_type in FP16_TYPES, "model.fp16_type", f"expected one of {FP16_TYPES}, got {m.fp16_type!r}")
    for name in ("dropout_rate", "attention_dropout_rate", "embedding_dropout_rate"):
        rate = getattr(m, name)
        _require(rate is None or 0.0 <= rate < 1.0, f"model.{name}", f"expected a rate in [0, 1), got {rate}")
    for name in ("embedding_initializer", "initializer", "output_layer_initializer"):
        init = getattr(m, name)
        _require(init is None or init.name in ("normal", "truncated_normal"), f"model.{name}.name",
                 f"expected 'normal' or 'truncated_normal', got {init and init.name!r}")

    for section in ("train_input", "eval_input"):
        inp: InputParams = getattr(p, section)
        _require(inp.batch_size > 0, f"{section}.batch_size", f"expected a positive integer, got {inp.batch_size}")
        _require(inp.vocab_size == m.vocab_size, f"{section}.vocab_size",
                 f"{inp.vocab_size} differs from model.vocab_size {m.vocab_size}")
        _require(0 < inp.max_sequence_length <= m.max_position_embeddings, f"{section}.max_sequence_length",
                 f"expected 1..model.max_position_embeddings ({m.max_position_embeddings}), "
                 f"got {inp.max_sequence_length}")

    _require(o.optimizer_type.lower() in OPTIMIZERS, "optimizer.optimizer_type",
             f"expected AdamW or Adam, got {o.optimizer_type!r}")
    _require(all(0.0 <= b < 1.0 for b in o.betas), "optimizer.betas", f"expected values in [0, 1), got {list(o.betas)}")
    _require(o.weight_decay >= 0.0, "optimizer.weight_decay", f"expected >= 0, got {o.weight_decay}")
    _require(o.grad_accum_steps >= 1, "optimizer.grad_accum_steps", f"expected >= 1, got {o.grad_accum_steps}")
    _require(o.max_gradient_norm is None or o.max_gradient_norm > 0, "optimizer.max_gradient_norm",
             f"expected a positive number or null, got {o.max_gradient_norm}")
    _require(not isinstance(o.loss_scaling_factor, str) or o.loss_scaling_factor == "dynamic",
             "optimizer.loss_scaling_factor", f"expected 'dynamic' or a number, got {o.loss_scaling_factor!r}")
    if isinstance(o.learning_rate, list):
        _check_schedule(o.learning_rate)

    _require(r.max_steps > 0, "runconfig.max_steps", f"expected a positive integer, got {r.max_steps}")
    _require(r.log_steps > 0, "runconfig.log_steps", f"expected a positive integer, got {r.log_steps}")
    _require(r.checkpoint_steps >= 0, "runconfig.checkpoint_steps", f"expected >= 0, got {r.checkpoint_steps}")
    _require(r.keep_last_checkpoints >= 1, "runconfig.keep_last_checkpoints",
             f"expected >= 1, got {r.keep_last_checkpoints}")
    _require(r.parallelism in PARALLELISMS, "runconfig.parallelism",
             f"expected one of {PARALLELISMS}, got {r.parallelism!r}")
    _require(r.sample_temperature > 0, "runconfig.sample_temperature", f"expected > 0, got {r.sample_temperature}")


def _check_schedule(schedule: list[SchedulerParams]) -> None:
    _require(bool(schedule), "optimizer.learning_rate", "expected a number or a non-empty list of schedulers")
    for i, s in enumerate(schedule):
        key = f"optimizer.learning_rate.{i}"
        _require(s.scheduler in SCHEDULERS, f"{key}.scheduler",
                 f"expected one of {SCHEDULERS}, got {s.scheduler!r}"
                 + "".join(f"; did you mean {c}?" for c in difflib.get_close_matches(s.scheduler, SCHEDULERS, 1)))
        needed = {"Linear": ("initial_learning_rate", "end_learning_rate"),
                  "CosineDecay": ("initial_learning_rate", "end_learning_rate"),
                  "Constant": ("learning_rate",),
                  "Exponential": ("initial_learning_rate", "decay_rate")}[s.scheduler]
        for name in needed:
            _require(getattr(s, name) is not None, f"{key}.{name}", f"missing required key for {s.scheduler}")
        last = i == len(schedule) - 1
        _require(s.total_iters is not None or last, f"{key}.total_iters",
                 "missing required key (only the last scheduler may run until max_steps)")
        _require(s.total_iters is None or s.total_iters > 0, f"{key}.total_iters",
                 f"expected a positive integer, got {s.total_iters}")
        _require(s.scheduler not in ("Linear", "CosineDecay", "Exponential") or s.total_iters is not None,
                 f"{key}.total_iters", f"{s.scheduler} needs total_iters (its length in steps)")
        _require(math.isfinite(s.start_lr) and s.start_lr >= 0, f"{key}",
                 f"learning rate must be a finite number >= 0, got {s.start_lr}")
