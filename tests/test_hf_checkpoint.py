"""Hugging Face GPT2LMHeadModel <-> ours: identical logits both ways, and saved folders both load."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2core.config import load_params
from gpt2core.errors import ConfigError, DataError
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


@pytest.mark.parametrize("damage, error, message", [
    (lambda f: (f / "config.json").write_text('{"n_embd": 64,'), ConfigError, r"config.json: not valid JSON"),
    (lambda f: (f / "config.json").write_text("[1, 2]"), ConfigError,
     r"config.json: expected a JSON object of GPT2Config keys, got a list"),
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:100]), DataError,
     r"model.safetensors: not a readable safetensors file"),
])
def test_a_damaged_hf_folder_is_one_error_naming_the_file(tmp_path, damage, error, message):
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(tmp_path)
    damage(tmp_path)
    with pytest.raises(error, match=message):
        load_pretrained(tmp_path)


def test_a_checkpoint_with_pickled_code_is_refused_without_torchs_unsafe_advice(tmp_path):
    from gpt2core.training.checkpoint import read_checkpoint

    torch.save({"model": {}, "extra": object()}, tmp_path / "c.pt")
    with pytest.raises(DataError, match=r"c.pt: holds pickled objects other than tensors") as caught:
        read_checkpoint(tmp_path / "c.pt")
    assert "weights_only" not in str(caught.value).replace("weights-only", "")


def _padded_hf(tmp_path, **config) -> tuple[GPT2LMHeadModel, object]:
    """A tiny HF GPT-2 with nanoGPT's padded vocabulary (50304 rows), saved to tmp_path / "hf"."""
    torch.manual_seed(3)
    hf = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=64, vocab_size=50304,
                                    **config)).eval()
    with torch.no_grad():  # every position's hidden state all ones: the extra id 50300 wins unmasked
        hf.transformer.ln_f.weight.zero_()
        hf.transformer.ln_f.bias.fill_(1.0)
        hf.transformer.wte.weight[50300] = 1.0
    hf.save_pretrained(tmp_path / "hf")
    return hf, tmp_path / "hf"


def test_a_padded_hf_vocabulary_loads_masked_and_exports_back(tmp_path):
    hf, folder = _padded_hf(tmp_path)
    ours = load_pretrained(folder).eval()
    assert (ours.params.vocab_size, ours.params.padded_vocab_size) == (50257, 50304)
    ids = torch.randint(0, 50257, (2, 12))
    with torch.no_grad():
        logits, _ = ours(ids)
    expected = hf_logits(hf, ids)
    torch.testing.assert_close(logits[..., :50257], expected[..., :50257], rtol=1e-5, atol=1e-5)
    assert torch.isinf(logits[..., 50257:]).all() and (expected.argmax(-1) == 50300).all()
    seq = {"train_input.max_sequence_length": 64, "eval_input.max_sequence_length": 64}
    save_pretrained(ours, load_params("gpt2_tiny", seq).model_copy(update={"model": ours.params}), tmp_path / "ours")
    assert load_params(tmp_path / "ours" / "params.yaml").model.padded_vocab_size == 50304
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["vocab_size"] == 50304
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    torch.testing.assert_close(hf_logits(again, ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config, message", [
    ({"scale_attn_weights": False}, r"config.json: scale_attn_weights: False is not implemented"),
    ({"scale_attn_by_inverse_layer_idx": True}, r"config.json: scale_attn_by_inverse_layer_idx: True is not"),
    ({"add_cross_attention": True}, r"config.json: add_cross_attention: True is not implemented"),
    ({"activation_function": "relu"}, r"config.json: activation_function: expected one of gelu, gelu_new, "),
])
def test_hf_config_keys_that_change_the_computation_are_refused_naming_key_and_file(tmp_path, config, message):
    _, folder = _padded_hf(tmp_path, **config)
    with pytest.raises(ConfigError, match=rf"{folder}/{message}"):
        load_pretrained(folder)


def test_weights_that_do_not_fit_their_config_are_refused_before_loading(tmp_path):
    _, folder = _padded_hf(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 50257}))  # the rows say 50304
    with pytest.raises(DataError, match=r"model.safetensors: transformer.wte.weight has shape \[50304, 32\], but "
                                        r".*config.json \(its vocab_size\) makes \[50257, 32\]"):
        load_pretrained(folder)
