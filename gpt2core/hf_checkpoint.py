"""Hugging Face ``GPT2LMHeadModel`` weights <-> ours, and the saved-model folder both can load.

A saved model folder holds ``model.safetensors`` in Hugging Face's layout, HF's ``config.json``
and our resolved ``params.yaml``, so either side loads it:

    save_pretrained(model, params, folder)
    model = load_pretrained(folder)                                   # ours
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder)         # theirs, identical logits

Parameter names already match (see ``gpt2core.model``); the only difference is that HF stores the
attention and MLP projections as ``Conv1D`` with ``[in, out]`` weights, where ``nn.Linear`` keeps
``[out, in]``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gpt2core.config import ModelParams, Params, load_params
from gpt2core.errors import ConfigError, DataError
from gpt2core.model import GPT2

WEIGHTS_FILE = "model.safetensors"
HF_CONFIG_FILE = "config.json"
PARAMS_FILE = "params.yaml"

_CONV1D_WEIGHT = re.compile(r"(^|\.)h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
# Buffers older transformers releases saved with the weights: the causal mask, not parameters.
_HF_BUFFERS = re.compile(r"\.attn\.(bias|masked_bias)$")


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], params: ModelParams) -> dict[str, torch.Tensor]:
    """Our state dict in HF ``GPT2LMHeadModel`` layout; a tied head is left out as HF saves it."""
    out = {}
    for name, tensor in state_dict.items():
        if name == "lm_head.weight" and params.share_embedding_weights:
            continue
        out[name] = tensor.t().contiguous() if _CONV1D_WEIGHT.search(name) else tensor.contiguous()
    return out


def from_hf_state_dict(hf_state_dict: dict[str, torch.Tensor], params: ModelParams) -> dict[str, torch.Tensor]:
    """An HF ``GPT2LMHeadModel`` (or bare ``GPT2Model``) state dict in our layout."""
    out = {}
    for name, tensor in hf_state_dict.items():
        if _HF_BUFFERS.search(name):
            continue
        if not name.startswith(("transformer.", "lm_head.")):
            name = f"transformer.{name}"  # GPT2Model checkpoints have no "transformer." prefix
        out[name] = tensor.t().contiguous() if _CONV1D_WEIGHT.search(name) else tensor
    if params.share_embedding_weights:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def hf_incompatibility(params: ModelParams) -> str | None:
    """Why HF's GPT2LMHeadModel cannot represent this architecture, or None when it can."""
    biases = ("use_projection_bias_in_attention", "use_ffn_bias_in_attention", "use_ffn_bias")
    missing = [f"model.{b}" for b in biases if not getattr(params, b)]
    if missing:
        return f"HF GPT-2 always has these biases: {', '.join(missing)} is False"
    if params.use_bias_in_output:
        return "HF GPT-2 has no output bias: model.use_bias_in_output is True"
    return None


def hf_config(params: ModelParams) -> dict:
    """HF ``GPT2Config`` fields for this architecture (``config.json``)."""
    embd_pdrop = params.dropout_rate if params.embedding_dropout_rate is None else params.embedding_dropout_rate
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": params.vocab_size,
        "n_positions": params.max_position_embeddings,
        "n_embd": params.hidden_size,
        "n_layer": params.num_hidden_layers,
        "n_head": params.num_heads,
        "n_inner": params.filter_size,
        "activation_function": params.nonlinearity,  # "gelu" and "gelu_new" mean the same in HF
        "resid_pdrop": params.dropout_rate,
        "embd_pdrop": embd_pdrop,
        "attn_pdrop": params.attention_dropout_rate,
        "layer_norm_epsilon": params.layer_norm_epsilon,
        "initializer_range": params.initializer_range,
        "tie_word_embeddings": params.share_embedding_weights,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
    }


def model_params_from_hf_config(config: dict) -> ModelParams:
    """ModelParams of an HF GPT-2 ``config.json`` (e.g. to import OpenAI's weights)."""
    if config.get("model_type", "gpt2") != "gpt2":
        raise ConfigError(f"config.json: expected model_type 'gpt2', got {config.get('model_type')!r}")
    activation = config.get("activation_function", "gelu_new")
    if activation not in ("gelu", "gelu_new"):
        raise ConfigError(f"config.json activation_function: expected 'gelu' or 'gelu_new', got {activation!r}")
    hidden = config["n_embd"]
    return ModelParams(
        hidden_size=hidden,
        num_hidden_layers=config["n_layer"],
        num_heads=config["n_head"],
        filter_size=config.get("n_inner") or 4 * hidden,
        vocab_size=config["vocab_size"],
        max_position_embeddings=config["n_positions"],
        nonlinearity=activation,
        dropout_rate=config.get("resid_pdrop", 0.1),
        embedding_dropout_rate=config.get("embd_pdrop", 0.1),
        attention_dropout_rate=config.get("attn_pdrop", 0.1),
        layer_norm_epsilon=config.get("layer_norm_epsilon", 1e-5),
        initializer_range=config.get("initializer_range", 0.02),
        share_embedding_weights=config.get("tie_word_embeddings", True),
    )


def save_pretrained(model: GPT2, params: Params, folder: str | Path) -> Path:
    """Write ``model.safetensors`` (HF layout), ``params.yaml`` and, when HF can load the
    architecture, ``config.json`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_file(to_hf_state_dict(state, params.model), folder / WEIGHTS_FILE, metadata={"format": "pt"})
    (folder / PARAMS_FILE).write_text(params.to_yaml())
    if hf_incompatibility(params.model) is None:
        (folder / HF_CONFIG_FILE).write_text(json.dumps(hf_config(params.model), indent=2) + "\n")
    return folder


def load_pretrained(folder: str | Path, *, map_location: str | torch.device = "cpu") -> GPT2:
    """A GPT2 from a saved-model folder: ours (``params.yaml``) or an HF one (``config.json``)."""
    folder = Path(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise DataError(f"{folder}: no {WEIGHTS_FILE} (expected a folder written by save_pretrained "
                        f"or transformers' save_pretrained)")
    if (folder / PARAMS_FILE).is_file():
        model_params = load_params(folder / PARAMS_FILE).model
    elif (folder / HF_CONFIG_FILE).is_file():
        model_params = model_params_from_hf_config(json.loads((folder / HF_CONFIG_FILE).read_text()))
    else:
        raise DataError(f"{folder}: neither {PARAMS_FILE} nor {HF_CONFIG_FILE} describes the model")
    model = GPT2(model_params)
    state = from_hf_state_dict(load_file(weights, device=str(map_location)), model_params)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DataError(f"{weights}: weights do not fit the config (missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]})")
    return model
