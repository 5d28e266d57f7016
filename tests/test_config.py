"""The typed Cerebras YAML: bundled configs, both key generations, overrides, and every error."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError

from gpt2core.config import (Params, configs_dir, load_params, no_effect_keys, params_from_dict,
                             parse_override, schedule_overrun)
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


# config_hash is tagged on MLflow runs and registered model versions: these values were computed
# before the config moved to pydantic and must never change (a changed hash orphans every run).
PINNED_HASHES = {
    "gpt2_large": "960ca5bec29527b9",
    "gpt2_medium": "68defee25dff1e3d",
    "gpt2_small": "2dcc7867f09f37c8",
    "gpt2_tiny": "61ac345f6e39d653",
    "gpt2_xl": "efa6960efd50d0bc",
}


@pytest.mark.parametrize("name", sorted(PINNED_HASHES))
def test_config_hash_of_bundled_configs_is_pinned(name):
    assert load_params(name).config_hash() == PINNED_HASHES[name]


def _schedule_1x(raw: dict) -> dict:
    opt = raw["optimizer"]
    opt["weight_decay_rate"] = opt.pop("weight_decay")
    opt["beta1"], opt["beta2"] = opt.pop("betas")
    opt["learning_rate"][0]["steps"] = opt["learning_rate"][0].pop("total_iters")
    opt["learning_rate"][1]["decay_steps"] = opt["learning_rate"][1].pop("total_iters")
    return raw


@pytest.mark.parametrize("edit, pinned", [
    (_schedule_1x, PINNED_HASHES["gpt2_tiny"]),
    (lambda r: r["optimizer"].update(learning_rate=1), "7d7320f109e3c650"),  # an int where a number goes
    (lambda r: r["optimizer"].update(learning_rate=[  # 1.x ExponentialDecay with decay_steps
        {"scheduler": "ExponentialDecay", "initial_learning_rate": 1, "decay_rate": 0.5, "decay_steps": 100,
         "staircase": True}]), "33295739c5db1f2c"),
    (lambda r: r["optimizer"].update(learning_rate=[  # 1.x steps, a YAML "1e-3" string
        {"scheduler": "Linear", "initial_learning_rate": 0, "end_learning_rate": "1e-3", "steps": 10},
        {"scheduler": "Constant", "learning_rate": 1e-3}]), "90ae56f79fb5284a"),
    (lambda r: r["model"].update(initializer={"name": "truncated_normal", "mean": 0, "std": 0.02, "a": -0.04,
                                              "b": 0.04}, embedding_initializer={"name": "normal", "std": 1}),
     "9152f464726f930c"),
])
def test_config_hash_of_1x_and_loose_configs_is_pinned(edit, pinned):
    raw = tiny_raw()
    edit(raw)
    assert params_from_dict(raw).config_hash() == pinned


def test_1x_exponential_decay_reads_as_exponential():
    raw = tiny_raw()
    raw["optimizer"]["learning_rate"] = [{"scheduler": "ExponentialDecay", "initial_learning_rate": 1e-3,
                                          "decay_rate": 0.5, "decay_steps": 100}]
    entry = params_from_dict(raw).optimizer.learning_rate[0]
    assert (entry.scheduler, entry.total_iters, entry.decay_rate) == ("Exponential", 100, 0.5)
    raw["optimizer"]["learning_rate"][0]["total_iters"] = 100
    with pytest.raises(ConfigError, match=r"optimizer\.learning_rate\.0\.decay_steps and "
                                          r"optimizer\.learning_rate\.0\.total_iters are the same setting"):
        params_from_dict(raw)


THREE_ENTRY_SCHEDULE = [
    {"scheduler": "Linear", "initial_learning_rate": 0.0, "end_learning_rate": 1e-3, "total_iters": 10},
    {"scheduler": "Exponential", "initial_learning_rate": 1e-3, "decay_rate": 0.5, "total_iters": 100},
    {"scheduler": "CosineDecay", "initial_learning_rate": 1e-3, "end_learning_rate": 1e-4, "total_iters": 100},
    {"scheduler": "Constant", "learning_rate": 1e-4},
]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), -1e-3])
@pytest.mark.parametrize("index, key", [(i, k) for i, entry in enumerate(THREE_ENTRY_SCHEDULE)
                                        for k in entry if k not in ("scheduler", "total_iters")])
def test_every_learning_rate_of_every_scheduler_entry_is_finite_and_non_negative(index, key, bad):
    schedule = [dict(entry) for entry in THREE_ENTRY_SCHEDULE]
    assert load_params("gpt2_tiny", {"optimizer.learning_rate": schedule}).optimizer.learning_rate[3].start_lr == 1e-4
    schedule[index][key] = bad
    with pytest.raises(ConfigError, match=rf"^gpt2_tiny: optimizer\.learning_rate\.{index}\.{key}: "
                                          r"expected a finite number >= 0 or null, got "):
        load_params("gpt2_tiny", {"optimizer.learning_rate": schedule})


@pytest.mark.parametrize("override", [
    "optimizer.learning_rate.0.end_learning_rate=.nan",  # ../shared/cases/nan-lr-accepted
    "optimizer.learning_rate.1.end_learning_rate=-1e-3",
    "optimizer.learning_rate.1.initial_learning_rate=.inf",
    "optimizer.learning_rate.0.total_iters=0",
    "optimizer.learning_rate.1.total_iters=2.0",
])
def test_bad_scheduler_values_from_the_command_line_name_the_key(override):
    key, value = parse_override(override)
    with pytest.raises(ConfigError, match=rf"^gpt2_tiny: {re.escape(key)}: expected "):
        load_params("gpt2_tiny", {key: value})


def test_a_constant_learning_rate_is_finite_and_non_negative():
    for bad in (float("nan"), -1.0):
        with pytest.raises(ConfigError, match=r"optimizer\.learning_rate: expected a finite number >= 0 "
                                              r"or a non-empty list of SchedulerParams mappings, got "):
            load_params("gpt2_tiny", {"optimizer.learning_rate": bad})
    with pytest.raises(ConfigError, match=r"optimizer\.learning_rate: expected a number or a non-empty list"):
        load_params("gpt2_tiny", {"optimizer.learning_rate": []})


def _numeric_keys(section: type[BaseModel], prefix: str) -> list[tuple[str, type]]:
    """Every int and float key under ``section`` (nested sections included), with its type."""
    found = []
    for name, field in section.model_fields.items():
        args = [a for a in typing.get_args(field.annotation) if a is not type(None)] or [field.annotation]
        arm = args[0]
        if isinstance(arm, type) and issubclass(arm, BaseModel):
            found += _numeric_keys(arm, f"{prefix}{name}.")
        elif arm in (int, float) or typing.get_origin(arm) is typing.Annotated and arm.__origin__ in (int, float):
            found.append((f"{prefix}{name}", arm if arm in (int, float) else arm.__origin__))
    return found


NUMERIC_KEYS = [(f"{section}.{key}", tp) for section, model in Params.model_fields.items()
                for key, tp in _numeric_keys(model.annotation, "")]


def test_the_numeric_key_list_covers_the_sections():
    keys = dict(NUMERIC_KEYS)
    assert keys["model.initializer.std"] is float and keys["runconfig.sample_top_k"] is int
    assert keys["optimizer.eps"] is float and keys["train_input.prefetch_factor"] is int
    assert len(keys) > 40


@pytest.mark.parametrize("key, tp", NUMERIC_KEYS)
def test_every_numeric_key_refuses_non_finite_negative_and_wrong_type_values(key, tp):
    base = {"model.initializer": {}, "model.embedding_initializer": {}, "model.output_layer_initializer": {}}
    bad_values = [-1, True, "7"] + ([float("nan"), float("inf"), float("-inf")] if tp is float else [5.0])
    if key.endswith(("initializer.mean", "initializer.a", "initializer.b")):
        bad_values.remove(-1)  # a mean and truncation bounds may be negative
    for bad in bad_values:
        with pytest.raises(ConfigError, match=rf"^gpt2_tiny: {re.escape(key)}: expected "):
            load_params("gpt2_tiny", {**base, key: bad})


@pytest.mark.parametrize("key, value, expected", [
    ("model.dropout_rate", 1.0, "a finite number in [0, 1)"),
    ("model.embedding_dropout_rate", -0.1, "a finite number in [0, 1) or null"),
    ("model.layer_norm_epsilon", 0, "a finite number > 0"),
    ("optimizer.eps", 0.0, "a finite number > 0"),
    ("optimizer.betas.1", 1.0, "a finite number in [0, 1)"),
    ("optimizer.weight_decay", -0.1, "a finite number >= 0"),
    ("optimizer.max_gradient_norm", 0, "a finite number > 0 or null"),
    ("optimizer.loss_scaling_factor", -128, "a finite number > 0 or 'dynamic'"),
    ("optimizer.grad_accum_steps", 0, "an integer > 0"),
    ("train_input.batch_size", 0, "an integer > 0"),
    ("eval_input.num_workers", -1, "an integer >= 0"),
    ("train_input.prefetch_factor", 0, "an integer > 0 or null"),
    ("runconfig.checkpoint_steps", -5, "an integer >= 0"),
    ("runconfig.keep_last_checkpoints", 0, "an integer > 0"),
    ("runconfig.sample_temperature", 0.0, "a finite number > 0"),
    ("runconfig.sample_top_k", 0, "an integer > 0 or null"),
])
def test_ranges_are_named_with_the_key(key, value, expected):
    with pytest.raises(ConfigError, match=rf"^gpt2_tiny: {re.escape(key)}: expected {re.escape(expected)}, got "):
        load_params("gpt2_tiny", {key: value})


def test_a_float_for_an_integer_key_is_refused():
    with pytest.raises(ConfigError, match=r"runconfig\.max_steps: expected an integer, got float 5\.0"):
        load_params("gpt2_tiny", {"runconfig.max_steps": 5.0})
    with pytest.raises(ConfigError, match=r"train_input\.batch_size: expected an integer, got float 4\.0"):
        load_params("gpt2_tiny", {"train_input.batch_size": 4.0})


def test_semantic_cross_checks_name_the_key():
    with pytest.raises(ConfigError, match=r"eval_input\.vocab_size: 5 differs from model\.vocab_size 50257"):
        load_params("gpt2_tiny", {"eval_input.vocab_size": 5})
    with pytest.raises(ConfigError, match=r"optimizer\.optimizer_type: expected AdamW or Adam, got 'SGD'"):
        load_params("gpt2_tiny", {"optimizer.optimizer_type": "SGD"})
    with pytest.raises(ConfigError, match=r"model\.initializer\.b: expected a < b"):
        load_params("gpt2_tiny", {"model.initializer": {"name": "truncated_normal", "a": 0.1, "b": -0.1}})
    with pytest.raises(ConfigError, match=r"optimizer\.learning_rate\.0\.total_iters: missing required key "
                                          r"\(only the last scheduler may run until max_steps\)"):
        load_params("gpt2_tiny", {"optimizer.learning_rate": [{"scheduler": "Constant", "learning_rate": 0.1},
                                                              {"scheduler": "Constant", "learning_rate": 0.01}]})
    with pytest.raises(ConfigError, match=r"optimizer\.learning_rate\.1\.decay_rate: missing required key for "
                                          r"Exponential"):
        load_params("gpt2_tiny", {"optimizer.learning_rate.1": {"scheduler": "Exponential",
                                                                "initial_learning_rate": 0.1, "total_iters": 5}})


def test_model_stays_mutable_and_checked():
    params = load_params("gpt2_tiny")
    params.runconfig.checkpoint_path = "/tmp/checkpoint_5.mdl"
    assert params.runconfig.checkpoint_path == "/tmp/checkpoint_5.mdl"
    with pytest.raises(PydanticValidationError):
        params.runconfig.max_steps = -1


# Keys of the GPT-2 configs the Model Zoo published (1.6 to 2.3), in configs written here with those
# keys and values: each loads, means what its release meant, and the ones that change nothing on a
# target are listed for that target.
def _model_zoo_1x_raw() -> dict:
    raw = tiny_raw()
    raw["model"].pop("loss_scaling", None)
    raw["model"].update(allow_multireplica=False, precision_opt_level=1, mixed_precision=True,
                        loss_weight=1 / 2048)  # no loss_scaling: the 1.6-1.7 loss, sum / batch * loss_weight
    raw["train_input"].update(repeat=True, data_processor="GptHDF5DataProcessor")
    opt = raw["optimizer"]
    for key in ("betas", "eps", "correct_bias"):
        opt.pop(key, None)
    opt.update(beta1=0.9, beta2=0.95, epsilon=1.0e-8, use_bias_correction=True, disable_lr_steps_reset=False,
               weight_decay_rate=opt.pop("weight_decay"), initial_loss_scale=2147483648.0,
               max_loss_scale=2147483648.0)
    opt["learning_rate"] = [
        {"scheduler": "Linear", "initial_learning_rate": 0.0, "end_learning_rate": 6e-4, "steps": 16},
        {"scheduler": "Linear", "initial_learning_rate": 6e-4, "end_learning_rate": 0.0, "alpha": 0.1,
         "decay_steps": 150, "steps": 150}]  # both step keys, equal (1.7 small_ws)
    raw["runconfig"].update(show_debug_metrics=False, save_losses=True, validate_only=False, compile_only=False,
                            mode="train")
    return raw


def test_model_zoo_1x_keys_load_with_their_meaning():
    p = params_from_dict(_model_zoo_1x_raw())
    assert p.model.loss_scaling == "batch_size" and p.model.loss_weight == 1 / 2048
    assert (p.optimizer.betas, p.optimizer.eps, p.optimizer.correct_bias) == ((0.9, 0.95), 1e-8, True)
    second = p.optimizer.learning_rate[1]
    assert (second.total_iters, second.alpha, second.end_learning_rate) == (150, 0.1, 0.0)
    assert p.model.allow_multireplica is False and p.optimizer.disable_lr_steps_reset is False
    # loss_scaling given: loss_weight keeps its 2.x meaning (num_tokens ignores it)
    raw = _model_zoo_1x_raw()
    raw["model"]["loss_scaling"] = "num_tokens"
    assert params_from_dict(raw).model.loss_scaling == "num_tokens"


def test_alpha_leaves_the_schedule_as_the_pytorch_reference_runs_it():
    import torch

    from gpt2core.training.schedule import build_lr_scheduler

    def lrs(schedule: list[dict]) -> list[float]:
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        learning_rate = params_from_dict({**tiny_raw(), "optimizer": {"learning_rate": schedule}}
                                         ).optimizer.learning_rate
        scheduler = build_lr_scheduler(optimizer, learning_rate)
        out = []
        for _ in range(200):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out

    with_alpha = _model_zoo_1x_raw()["optimizer"]["learning_rate"]
    without = [{k: v for k, v in e.items() if k not in ("alpha", "decay_steps")} for e in with_alpha]
    assert lrs(with_alpha) == lrs(without)
    assert lrs(with_alpha)[-1] == 0.0  # decays to end_learning_rate, not to alpha * initial


def test_no_effect_keys_are_listed_per_target():
    p = params_from_dict(_model_zoo_1x_raw())
    listed = {target: [line.split(":")[0] for line in no_effect_keys(p, target)] for target in ("cpu", "gpu",
                                                                                                "cerebras")}
    assert listed["gpu"] == ["train_input.data_processor", "train_input.repeat", "eval_input.data_processor",
                             "model.precision_opt_level", "model.allow_multireplica",
                             "optimizer.learning_rate.1.alpha", "optimizer.initial_loss_scale",
                             "optimizer.max_loss_scale", "optimizer.disable_lr_steps_reset", "runconfig.mode",
                             "runconfig.validate_only", "runconfig.compile_only", "runconfig.show_debug_metrics"]
    assert listed["cpu"] == listed["gpu"][:3] + ["model.mixed_precision"] + listed["gpu"][3:]
    assert "model.allow_multireplica" in listed["cerebras"] and "optimizer.max_loss_scale" not in listed["cerebras"]
    line = no_effect_keys(p, "gpu")[4]
    assert line.startswith("model.allow_multireplica: accepted, no effect on target gpu (")
    # a key that does act on the target is not listed: fp16 loss scaling on a float16 GPU run
    fp16 = params_from_dict({**_model_zoo_1x_raw(),
                             "model": {**_model_zoo_1x_raw()["model"], "fp16_type": "float16"}})
    assert "optimizer.initial_loss_scale" not in " ".join(no_effect_keys(fp16, "gpu"))
    assert "optimizer.initial_loss_scale" in " ".join(no_effect_keys(fp16, "cpu"))
    # keys left at their defaults are not listed
    section = {"data_dir": "d", "batch_size": 4, "max_sequence_length": 128}
    assert no_effect_keys(params_from_dict({**tiny_raw(), "train_input": section, "eval_input": section}),
                          "cpu") == ["model.mixed_precision: accepted, no effect on target cpu (CPU runs are fp32)"]


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["model"].update(allow_multireplca=False),
     r"model\.allow_multireplca: unknown key; did you mean model\.allow_multireplica\?"),
    (lambda r: r["optimizer"]["learning_rate"][1].update(alpah=0.1),
     r"optimizer\.learning_rate\.1\.alpah: unknown key; did you mean optimizer\.learning_rate\.1\.alpha\?"),
    (lambda r: r["optimizer"].update(disable_lr_step_reset=True), r"did you mean optimizer\.disable_lr_steps_reset"),
    (lambda r: r["optimizer"]["learning_rate"][1].update(steps=140),
     r"optimizer\.learning_rate\.1\.steps 140 and optimizer\.learning_rate\.1\.decay_steps 150 differ"),
    (lambda r: r["optimizer"].update(eps=1e-6), r"optimizer\.epsilon and optimizer\.eps are the same setting"),
    (lambda r: r["optimizer"]["learning_rate"][1].update(alpha=-1),
     r"optimizer\.learning_rate\.1\.alpha: expected a finite number >= 0 or null"),
])
def test_model_zoo_keys_still_refuse_typos_and_contradictions(edit, message):
    raw = _model_zoo_1x_raw()
    edit(raw)
    with pytest.raises(ConfigError, match=message):
        params_from_dict(raw)


def test_keys_of_older_releases_stay_out_of_the_hash_until_given():
    tiny = load_params("gpt2_tiny")
    assert "allow_multireplica" not in tiny.to_dict()["model"]
    assert "alpha" not in tiny.to_dict()["optimizer"]["learning_rate"][0]
    given = params_from_dict({**tiny_raw(), "model": {**tiny_raw()["model"], "allow_multireplica": False}})
    assert given.to_dict()["model"]["allow_multireplica"] is False
    assert params_from_dict(given.to_dict()) == given


def test_every_gpt2_config_of_every_model_zoo_release_loads():
    """The published files themselves, read from a Model Zoo mirror when one is present."""
    from modelzoo_mirror import gpt2_configs

    configs = gpt2_configs()
    assert len(configs) >= 30  # 1.6 to 2.3 (2.4 and later ship no GPT-2 config)
    for name, text in configs.items():
        params = params_from_dict(yaml.safe_load(text), source=name)
        assert params.model.vocab_size == 50257, name


def test_max_steps_past_the_end_of_a_decaying_schedule_is_named():
    params = load_params("gpt2_tiny")  # Linear 20 + CosineDecay 280 to 3e-4, max_steps 300
    assert schedule_overrun(params.optimizer, 300) is None
    message = schedule_overrun(params.optimizer, 1500)
    assert message == ("runconfig.max_steps 1500 runs past the end of the learning-rate schedule at step 300 (the "
                       "sum of optimizer.learning_rate total_iters): steps 301-1500 train at its final rate 0.0003; "
                       "to decay over the whole run set the last entry's total_iters to 1480")
    # schedules that never end: a constant rate, a last Constant entry, a last Exponential entry
    for schedule in (1e-3, [{"scheduler": "Linear", "initial_learning_rate": 0, "end_learning_rate": 1e-3,
                             "total_iters": 10}, {"scheduler": "Constant", "learning_rate": 1e-3}],
                     [{"scheduler": "Exponential", "initial_learning_rate": 1e-3, "decay_rate": 0.5,
                       "total_iters": 10}]):
        assert schedule_overrun(load_params("gpt2_tiny", {"optimizer.learning_rate": schedule}).optimizer,
                                1500) is None
