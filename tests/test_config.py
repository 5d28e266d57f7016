"""The typed Cerebras YAML: bundled configs, both key generations, overrides, and every error."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gpt2core.config import configs_dir, load_params, params_from_dict, parse_override
from gpt2core.errors import ConfigError

REFERENCE_ARCHITECTURES = {  # hidden, layers, heads (GPT-2 paper / HF configs)
    "gpt2_small": (768, 12, 12),
    "gpt2_medium": (1024, 24, 16),
    "gpt2_large": (1280, 36, 20),
    "gpt2_xl": (1600, 48, 16),
}


def tiny_raw() -> dict:
    return yaml.safe_load((configs_dir() / "gpt2_tiny.yaml").read_text())


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("name", sorted(REFERENCE_ARCHITECTURES))
def test_bundled_sizes_have_reference_architectures(name):
    m = load_params(name).model
    assert (m.hidden_size, m.num_hidden_layers, m.num_heads) == REFERENCE_ARCHITECTURES[name]
    assert m.filter_size == 4 * m.hidden_size
    assert (m.max_position_embeddings, m.vocab_size) == (1024, 50257)
    assert m.share_embedding_weights and not m.use_bias_in_output


def test_name_path_and_yaml_round_trip_agree(tmp_path):
    by_name = load_params("gpt2_tiny")
    assert load_params(configs_dir() / "gpt2_tiny.yaml") == by_name
    again = load_params(write(tmp_path, yaml.safe_load(by_name.to_yaml())))
    assert again == by_name and again.config_hash() == by_name.config_hash()


def test_1x_keys_read_as_2x(tmp_path):
    raw = tiny_raw()
    opt = raw["optimizer"]
    opt["weight_decay_rate"] = opt.pop("weight_decay")
    opt["beta1"], opt["beta2"] = opt.pop("betas")
    opt["learning_rate"][0]["steps"] = opt["learning_rate"][0].pop("total_iters")
    opt["learning_rate"][1]["decay_steps"] = opt["learning_rate"][1].pop("total_iters")
    old = load_params(write(tmp_path, raw))
    assert old == load_params("gpt2_tiny")
    assert old.config_hash() == load_params("gpt2_tiny").config_hash()
    assert "weight_decay:" in old.to_yaml() and "weight_decay_rate" not in old.to_yaml()


def test_overrides_are_dotted_and_type_checked():
    p = load_params("gpt2_tiny", {"train_input.data_dir": "/x/train", "runconfig.max_steps": 7,
                                  "optimizer.learning_rate.1.end_learning_rate": 0.0})
    assert (p.train_input.data_dir, p.runconfig.max_steps) == ("/x/train", 7)
    assert p.optimizer.learning_rate[1].end_learning_rate == 0.0
    with pytest.raises(ConfigError, match=r"runconfig\.max_steps: expected an integer, got str"):
        load_params("gpt2_tiny", {"runconfig.max_steps": "many"})
    with pytest.raises(ConfigError, match=r"runconfig\.max_step: unknown key; did you mean runconfig\.max_steps"):
        load_params("gpt2_tiny", {"runconfig.max_step": 3})
    assert parse_override("runconfig.max_steps=50") == ("runconfig.max_steps", 50)
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        parse_override("max_steps")


def test_flat_dict_has_dotted_keys():
    flat = load_params("gpt2_tiny").to_flat_dict()
    assert flat["model.hidden_size"] == 64
    assert flat["optimizer.learning_rate.1.scheduler"] == "CosineDecay"
    assert flat["optimizer.betas"] == [0.9, 0.95]


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["model"].update(hiden_size=64), r"model\.hiden_size: unknown key; did you mean model\.hidden_size\?"),
    (lambda r: r["model"].pop("num_heads"), r"model\.num_heads: missing required key \(an integer\)"),
    (lambda r: r["model"].update(hidden_size="big"), r"model\.hidden_size: expected an integer, got str 'big'"),
    (lambda r: r["model"].update(share_embedding_weights=1), r"model\.share_embedding_weights: expected a boolean"),
    (lambda r: r["optimizer"].update(betas=[0.9]), r"optimizer\.betas: expected a list of 2 numbers"),
    (lambda r: r["optimizer"].update(beta1=0.8), r"beta1/beta2 and optimizer\.betas are the same setting"),
    (lambda r: r["optimizer"]["learning_rate"][1].update(scheduler="Cosine"),
     r"optimizer\.learning_rate\.1\.scheduler: expected one of .*did you mean CosineDecay\?"),
    (lambda r: r["optimizer"]["learning_rate"][0].pop("total_iters"),
     r"optimizer\.learning_rate\.0\.total_iters: missing required key"),
    (lambda r: r["optimizer"]["learning_rate"][0].update(end_learning_rat=1.0),
     r"optimizer\.learning_rate\.0\.end_learning_rat: unknown key; did you mean"),
    (lambda r: r.update(optimiser={}), r"optimiser: unknown key; did you mean optimizer\?"),
    (lambda r: r.pop("runconfig"), r"runconfig: missing required key"),
    (lambda r: r["model"].update(num_heads=5), r"model\.num_heads: model\.hidden_size 64 must be divisible"),
    (lambda r: r["train_input"].update(max_sequence_length=4096),
     r"train_input\.max_sequence_length: expected 1\.\.model\.max_position_embeddings"),
    (lambda r: r["model"].update(nonlinearity="relu"), r"model\.nonlinearity: expected one of"),
    (lambda r: r.update(model=[1, 2]), r"model: expected a mapping of ModelParams keys, got list"),
])
def test_errors_name_the_key_path(edit, message):
    raw = tiny_raw()
    edit(raw)
    with pytest.raises(ConfigError, match=message):
        params_from_dict(raw)


def test_scientific_notation_without_dot_is_a_number():
    raw = tiny_raw()
    raw["model"]["layer_norm_epsilon"] = "1e-6"  # what PyYAML makes of `1e-6`
    assert params_from_dict(raw).model.layer_norm_epsilon == 1e-6


def test_constant_learning_rate_and_missing_file():
    assert load_params("gpt2_tiny", {"optimizer.learning_rate": 1e-3}).optimizer.learning_rate == 1e-3
    with pytest.raises(ConfigError, match=r"gpt2_nano: no such config file .*gpt2_tiny"):
        load_params("gpt2_nano")
