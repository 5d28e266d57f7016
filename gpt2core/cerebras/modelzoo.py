"""Export a run's config as a Cerebras Model Zoo params YAML (the 2.x ``trainer:`` format).

Our configs use the reference's five legacy sections; the Model Zoo that ships with the 2.x SDK runs
``cszoo fit params.yaml`` on the ``trainer: {init, fit, validate, validate_all}`` layout. The export
lets users run the official tooling on the same HDF5 data (``GptHDF5MapDataProcessor`` reads our
files as they are) with the same model, optimizer, schedule, precision and loop. No SDK needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from gpt2core.config import InitializerParams, Params, SchedulerParams
from gpt2core.errors import ConfigError

MODELZOO_PARAMS_FILE = "modelzoo_params.yaml"

# Our scheduler names -> the Model Zoo's scheduler classes.
_SCHEDULERS = {"Linear": "LinearLR", "CosineDecay": "CosineDecayLR", "Constant": "ConstantLR",
               "Exponential": "ExponentialLR"}
# Model keys that mean the same in the Model Zoo's GPT-2 model config.
_MODEL_KEYS = (
    "hidden_size", "vocab_size", "position_embedding_type", "share_embedding_weights",
    "max_position_embeddings", "num_hidden_layers", "dropout_rate", "embedding_dropout_rate",
    "layer_norm_epsilon", "loss_scaling", "loss_weight", "num_heads", "attention_type",
    "attention_dropout_rate", "use_projection_bias_in_attention", "use_ffn_bias_in_attention",
    "filter_size", "nonlinearity", "use_ffn_bias", "use_bias_in_output", "initializer_range",
)


def _initializer(init: InitializerParams) -> dict[str, Any]:
    out: dict[str, Any] = {"name": init.name, "mean": init.mean, "std": init.std}
    if init.a is not None:
        out["a"] = init.a
    if init.b is not None:
        out["b"] = init.b
    return out


def _scheduler(s: SchedulerParams, max_steps: int) -> dict[str, Any]:
    name = _SCHEDULERS[s.scheduler]
    if s.scheduler == "Constant":
        body: dict[str, Any] = {"learning_rate": s.learning_rate}
    elif s.scheduler == "Exponential":
        body = {"initial_learning_rate": s.initial_learning_rate, "decay_rate": s.decay_rate,
                "staircase": s.staircase}
    else:
        body = {"initial_learning_rate": s.initial_learning_rate, "end_learning_rate": s.end_learning_rate}
    if s.total_iters is not None:
        body["total_iters"] = s.total_iters
    elif s.scheduler != "Constant":
        body["total_iters"] = max_steps  # our last entry may run to max_steps; the Model Zoo wants a length
    return {name: body}


def _schedulers(params: Params) -> list[dict[str, Any]]:
    lr = params.optimizer.learning_rate
    if not isinstance(lr, list):
        return [{"ConstantLR": {"learning_rate": lr}}]
    entries = [_scheduler(s, params.runconfig.max_steps) for s in lr]
    return entries if len(entries) == 1 else [{"SequentialLR": {"schedulers": entries}}]


def _dataloader(section: Any, data_dir: str) -> dict[str, Any]:
    loader = {"data_processor": section.data_processor, "data_dir": data_dir, "batch_size": section.batch_size,
              "shuffle": section.shuffle, "shuffle_seed": section.shuffle_seed, "num_workers": section.num_workers}
    if section.num_workers:
        loader["persistent_workers"] = section.persistent_workers
        if section.prefetch_factor is not None:
            loader["prefetch_factor"] = section.prefetch_factor
    return loader


def modelzoo_params(params: Params, *, train_data_dir: str | None = None, eval_data_dir: str | None = None,
                    backend: str = "CSX") -> dict[str, Any]:
    """The Model Zoo ``trainer:`` config of ``params`` (data folders default to the config's). Raises
    ConfigError for a torch-side key the Model Zoo's GPT-2 cannot express."""
    m, o, r = params.model, params.optimizer, params.runconfig
    if m.padded_vocab_size is not None:
        raise ConfigError(f"model.padded_vocab_size: {m.padded_vocab_size}: the Model Zoo's GPT-2 has no padded "
                          f"vocabulary (its embedding has model.vocab_size rows); leave it unset to export")
    model: dict[str, Any] = {"name": "gpt2"}
    model.update({k: getattr(m, k) for k in _MODEL_KEYS if getattr(m, k) is not None})
    for key in ("embedding_initializer", "initializer", "output_layer_initializer"):
        if getattr(m, key) is not None:
            model[key] = _initializer(getattr(m, key))
    model["mixed_precision"] = m.mixed_precision
    model["fp16_type"] = m.fp16_type

    optimizer_args: dict[str, Any] = {"betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}
    if o.optimizer_type.lower() == "adamw":
        optimizer_args["correct_bias"] = o.correct_bias
    precision: dict[str, Any] = {"enabled": m.mixed_precision, "fp16_type": m.fp16_type,
                                 "loss_scaling_factor": o.loss_scaling_factor}
    for key in ("initial_loss_scale", "max_loss_scale", "max_gradient_norm"):
        if getattr(o, key) is not None:
            precision[key] = getattr(o, key)
    if m.precision_opt_level is not None:
        precision["precision_opt_level"] = m.precision_opt_level

    cluster: dict[str, Any] = {"num_csx": r.num_csx}
    for key in ("mount_dirs", "python_paths"):
        if getattr(r, key):
            cluster[key] = list(getattr(r, key))
    if r.num_workers_per_csx:
        cluster["num_workers_per_csx"] = r.num_workers_per_csx
    backend_section: dict[str, Any] = {"backend_type": backend.upper()}
    if backend.upper() == "CSX":
        backend_section["cluster_config"] = cluster

    loop: dict[str, Any] = {"max_steps": r.max_steps}
    if r.eval_frequency is not None:
        loop["eval_frequency"] = r.eval_frequency
    if r.eval_steps is not None:
        loop["eval_steps"] = r.eval_steps
    checkpoint: dict[str, Any] = {"save_initial_checkpoint": r.save_initial_checkpoint}
    if r.checkpoint_steps:
        checkpoint["steps"] = r.checkpoint_steps

    val_loader = _dataloader(params.eval_input, eval_data_dir or params.eval_input.data_dir)
    return {"trainer": {
        "init": {
            "backend": backend_section,
            "model_dir": r.model_dir,
            "seed": r.seed,
            "model": model,
            "optimizer": {o.optimizer_type.lower(): optimizer_args},
            "schedulers": _schedulers(params),
            "precision": precision,
            "loop": loop,
            "checkpoint": checkpoint,
            "logging": {"log_steps": r.log_steps},
        },
        "fit": {
            "train_dataloader": _dataloader(params.train_input, train_data_dir or params.train_input.data_dir),
            "val_dataloader": val_loader,
        },
        "validate": {"val_dataloader": val_loader},
        "validate_all": {"val_dataloaders": val_loader},
    }}


class _Dumper(yaml.SafeDumper):
    """Writes the shared validation loader once with an anchor, as the Model Zoo's own configs do."""


def write_modelzoo_params(params: Params, path: str | Path, **kwargs: Any) -> Path:
    """Write ``modelzoo_params(params, **kwargs)`` as YAML to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ("# Cerebras Model Zoo params for this gpt2ops run (trainer format of the 2.x Model Zoo).\n"
              "# Run with the official tooling:  cszoo fit " + path.name + "\n")
    body = yaml.dump(modelzoo_params(params, **kwargs), Dumper=_Dumper, sort_keys=False, default_flow_style=False)
    path.write_text(header + body)
    return path
