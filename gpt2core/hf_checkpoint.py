"""Hugging Face ``GPT2LMHeadModel`` weights <-> ours, and the saved-model folder both can load.

A saved model folder holds ``model.safetensors`` in Hugging Face's layout, HF's ``config.json``
and our resolved ``params.yaml``, so either side loads it:

    save_pretrained(model, params, folder)
    model = load_pretrained(folder)                                   # ours
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder)         # theirs, identical logits

Parameter names already match (see ``gpt2core.model``); the only difference is that HF stores the
attention and MLP projections as ``Conv1D`` with ``[in, out]`` weights, where ``nn.Linear`` keeps
``[out, in]``.

A padded vocabulary (an embedding with more rows than the GPT-2 tokenizer's 50257 ids, as nanoGPT
and llm.c train with 50304) is ``config.json`` ``vocab_size`` 50304 on HF's side and
``model.vocab_size`` 50257 with ``model.padded_vocab_size`` 50304 on ours: the extra ids' logits are
masked. Every ``GPT2Config`` key of ``config.json`` that changes what the model computes is either
read or refused naming the key and the file; weights whose shapes do not fit the config are refused
before any of them is loaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from pydantic import ValidationError as PydanticValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from gpt2core.config import ModelParams, Params, load_params
from gpt2core.errors import ConfigError, DataError
from gpt2core.model import GPT2
from gpt2core.tokenizer import VOCAB_SIZE

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
        "vocab_size": params.embedding_rows,  # HF's embedding rows: padded ids included
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


# GPT2Config keys that change what the model computes, besides the ones read below, and the only value
# this model implements (transformers' GPT2Attention / GPT2Model).
_HF_FIXED = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False}
# activation_function values: exact erf GELU, or its tanh approximation (three names in transformers)
_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu_fast": "gelu_new"}


def model_params_from_hf_config(config: dict, source: str = HF_CONFIG_FILE) -> ModelParams:
    """ModelParams of an HF GPT-2 ``config.json`` (e.g. to import OpenAI's weights), read from
    ``source`` (named in errors). A ``vocab_size`` above the GPT-2 tokenizer's 50257 ids is that
    tokenizer with a padded vocabulary; a ``GPT2Config`` key set to something this model does not
    compute raises ConfigError naming it."""
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: expected a JSON object of GPT2Config keys, got a {type(config).__name__}")
    if config.get("model_type", "gpt2") != "gpt2":
        raise ConfigError(f"{source}: model_type: expected 'gpt2', got {config.get('model_type')!r}")
    for key, value in _HF_FIXED.items():
        if config.get(key, value) != value:
            raise ConfigError(f"{source}: {key}: {config[key]!r} is not implemented (GPT-2 has {value!r})")
    activation = config.get("activation_function", "gelu_new")
    if activation not in _HF_ACTIVATIONS:
        raise ConfigError(f"{source}: activation_function: expected one of {', '.join(_HF_ACTIVATIONS)}, "
                          f"got {activation!r}")
    missing = [key for key in ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size") if key not in config]
    if missing:
        raise ConfigError(f"{source}: {missing[0]}: missing required key")
    rows = config["vocab_size"]
    if not isinstance(rows, int) or rows < 1:
        raise ConfigError(f"{source}: vocab_size: expected a positive integer, got {rows!r}")
    hidden = config["n_embd"]
    try:
        return ModelParams(
            hidden_size=hidden,
            num_hidden_layers=config["n_layer"],
            num_heads=config["n_head"],
            filter_size=config.get("n_inner") or 4 * hidden,
            vocab_size=min(rows, VOCAB_SIZE),
            padded_vocab_size=rows if rows > VOCAB_SIZE else None,
            max_position_embeddings=config["n_positions"],
            nonlinearity=_HF_ACTIVATIONS[activation],
            dropout_rate=config.get("resid_pdrop", 0.1),
            embedding_dropout_rate=config.get("embd_pdrop", 0.1),
            attention_dropout_rate=config.get("attn_pdrop", 0.1),
            layer_norm_epsilon=config.get("layer_norm_epsilon", 1e-5),
            initializer_range=config.get("initializer_range", 0.02),
            share_embedding_weights=config.get("tie_word_embeddings", True),
        )
    except PydanticValidationError as exc:
        error = exc.errors()[0]
        raise ConfigError(f"{source}: {'.'.join(map(str, error['loc'])) or 'config'}: {error['msg']}") from None


def _check_weight_shapes(weights: Path, model: GPT2, source: str) -> None:
    """Refuse ``weights`` (safetensors, HF layout) before loading them when a tensor's shape differs
    from ``model``'s, naming the key and the config it was built from (read from the file header)."""
    expected = {name: tuple(t.shape) for name, t in to_hf_state_dict(model.state_dict(), model.params).items()}
    with safe_open(weights, framework="pt") as f:
        for name in f.keys():
            ours = name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"
            shape = tuple(f.get_slice(name).get_shape())
            if ours in expected and shape != expected[ours]:
                vocab = " (its vocab_size)" if ours.endswith(("wte.weight", "lm_head.weight")) else ""
                raise DataError(f"{weights}: {name} has shape {list(shape)}, but {source}{vocab} makes "
                                f"{list(expected[ours])}")


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
    """A GPT2 from a saved-model folder: ours (``params.yaml``) or an HF one (``config.json``).
    Raises ConfigError for a config key this model does not implement or a config.json that is not a
    JSON object, DataError for weights that do not fit the config (naming the tensor, before loading
    any) or a weights file that cannot be read."""
    folder = Path(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise DataError(f"{folder}: no {WEIGHTS_FILE} (expected a folder written by save_pretrained "
                        f"or transformers' save_pretrained)")
    if (folder / PARAMS_FILE).is_file():
        source = folder / PARAMS_FILE
        model_params = load_params(source).model
    elif (folder / HF_CONFIG_FILE).is_file():
        source = folder / HF_CONFIG_FILE
        try:
            config = json.loads(source.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{source}: not valid JSON ({exc})") from None
        model_params = model_params_from_hf_config(config, str(source))
    else:
        raise DataError(f"{folder}: neither {PARAMS_FILE} nor {HF_CONFIG_FILE} describes the model")
    try:
        with torch.device("meta"):  # shapes only: nothing allocated before the weights are known to fit
            _check_weight_shapes(weights, GPT2(model_params), str(source))
        model = GPT2(model_params)
        state = from_hf_state_dict(load_file(weights, device=str(map_location)), model_params)
    except SafetensorError as exc:  # a truncated or foreign file: its header or data cannot be read
        raise DataError(f"{weights}: not a readable safetensors file ({exc})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DataError(f"{weights}: weights do not fit the config (missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]})")
    return model
