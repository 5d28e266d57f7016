"""Hugging Face GPT2LMHeadModel <-> ours: identical logits both ways, and saved folders both load."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2core.config import load_params
from gpt2core.errors import DataError
from gpt2core.hf_checkpoint import (
    from_hf_state_dict, hf_config, load_pretrained, model_params_from_hf_config, save_pretrained,
    to_hf_state_dict,
)
from gpt2core.model import GPT2

SMALL = {"model.hidden_size": 64, "model.num_heads": 4, "model.filter_size": 256,
         "model.num_hidden_layers": 2, "model.vocab_size": 1000, "train_input.vocab_size": 1000,
         "eval_input.vocab_size": 1000}


def small_params(nonlinearity: str = "gelu_new"):
    return load_params("gpt2_tiny", {**SMALL, "model.nonlinearity": nonlinearity})


def hf_logits(hf: GPT2LMHeadModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids).logits


@pytest.mark.parametrize("nonlinearity", ["gelu_new", "gelu"])
def test_export_to_hf_gives_identical_logits(nonlinearity):
    params = small_params(nonlinearity)
    torch.manual_seed(0)
    ours = GPT2(params.model).eval()
    hf = GPT2LMHeadModel(GPT2Config(**hf_config(params.model))).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours.state_dict(), params.model), strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied: HF fills it from wte
    hf.tie_weights()
    ids = torch.randint(0, 1000, (2, 32))
    with torch.no_grad():
        logits, _ = ours(ids)
    torch.testing.assert_close(logits, hf_logits(hf, ids), rtol=1e-5, atol=1e-5)


def test_import_from_hf_gives_identical_logits():
    params = small_params()
    torch.manual_seed(1)
    hf = GPT2LMHeadModel(GPT2Config(**hf_config(params.model))).eval()
    model_params = model_params_from_hf_config(hf.config.to_dict())
    ours = GPT2(model_params).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), model_params))
    ids = torch.randint(0, 1000, (3, 20))
    with torch.no_grad():
        logits, _ = ours(ids)
    torch.testing.assert_close(logits, hf_logits(hf, ids), rtol=1e-5, atol=1e-5)


def test_saved_folder_loads_in_transformers_and_back(tmp_path):
    params = small_params()
    torch.manual_seed(2)
    ours = GPT2(params.model).eval()
    save_pretrained(ours, params, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["n_inner"] == 256
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    again = load_pretrained(tmp_path).eval()
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        logits, _ = ours(ids)
        torch.testing.assert_close(again(ids)[0], logits)
    torch.testing.assert_close(hf_logits(hf, ids), logits, rtol=1e-5, atol=1e-5)
    # An HF-written folder (no params.yaml) loads too.
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(hf_dir)
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(hf_dir).eval()(ids)[0], logits, rtol=1e-5, atol=1e-5)


def test_architectures_hf_cannot_hold_skip_config_json(tmp_path):
    params = load_params("gpt2_tiny", {**SMALL, "model.use_bias_in_output": True})
    model = GPT2(params.model)
    save_pretrained(model, params, tmp_path)
    assert not (tmp_path / "config.json").exists()
    torch.testing.assert_close(load_pretrained(tmp_path).lm_head.bias, model.lm_head.bias)


def test_missing_weights_are_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no model.safetensors"):
        load_pretrained(tmp_path)
