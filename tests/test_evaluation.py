"""Eval metrics as the reference defines them, sampling, and the train -> evaluate stages end to end."""

from __future__ import annotations

import json
import math

import h5py
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from gpt2core.config import load_params
from gpt2core.errors import DataError
from gpt2core.evaluation import eval_batches, eval_dataloader, evaluate, evaluate_pass, sample
from gpt2core.model import GPT2
from gpt2core.precision import autocast_dtype
from gpt2core.errors import ConfigError
from gpt2core.stages import evaluate as evaluate_stage
from gpt2core.stages import promote as promote_stage
from gpt2core.stages import run_stage
from gpt2core.stages import train as train_stage
from gpt2core.platform.context import RunContext

MICRO = {"model.hidden_size": 32, "model.num_hidden_layers": 1, "model.num_heads": 2, "model.filter_size": 128,
         "train_input.max_sequence_length": 64, "eval_input.max_sequence_length": 64}


def micro_model(seed: int = 0) -> GPT2:
    torch.manual_seed(seed)
    return GPT2(load_params("gpt2_tiny", MICRO).model)


def test_metrics_follow_the_reference_definitions():
    model = micro_model().eval()
    torch.manual_seed(1)
    batches = []
    for n_real in (16, 9):  # the second batch is right-padded
        ids = torch.randint(0, 50257, (2, 16), dtype=torch.int32)
        mask = torch.zeros_like(ids)
        mask[:, :n_real] = 1
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": torch.roll(ids, -1, dims=1)})
    metrics = evaluate(model, batches, device=torch.device("cpu"))

    losses, ce_sum, tokens, correct = [], 0.0, 0.0, 0.0
    with torch.no_grad():
        for b in batches:
            logits, loss = model(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
            mask = b["attention_mask"].double()
            ce = F.cross_entropy(logits.transpose(1, 2), b["labels"].long(), reduction="none").double()
            losses.append(loss.item())
            ce_sum += (ce * mask).sum().item()
            tokens += mask.sum().item()
            correct += ((logits.argmax(-1) == b["labels"]).double() * mask).sum().item()
    assert metrics["eval/loss"] == pytest.approx(sum(losses) / 2)
    assert metrics["eval/lm_perplexity"] == pytest.approx(math.exp(ce_sum / tokens))
    assert metrics["eval/accuracy"] == pytest.approx(correct / tokens)
    assert metrics["eval/tokens"] == 16 * 2 + 9 * 2
    # padding is not scored: the per-batch mean differs from the per-token mean of the whole set
    assert metrics["eval/loss"] != pytest.approx(ce_sum / tokens, rel=1e-9)


@pytest.mark.parametrize("mixed, fp16_type, device, expected", [
    (True, "bfloat16", "cuda", torch.bfloat16),
    (True, "float16", "cuda", torch.float16),
    (True, "cbfloat16", "cuda", torch.bfloat16),  # no GPU has the wafer's format; bf16 covers its range
    (False, "float16", "cuda", None),
    (True, "float16", "cpu", None),  # CPU runs are fp32
])
def test_one_mixed_precision_rule(mixed, fp16_type, device, expected):
    params = load_params("gpt2_tiny", {"model.mixed_precision": mixed, "model.fp16_type": fp16_type}).model
    assert autocast_dtype(params, torch.device(device)) == expected
    assert autocast_dtype(params, device) == expected


def test_evaluate_pass_scores_eval_steps_batches_from_the_start(tmp_path):
    rows = torch.randint(0, 50257, (21, 3, 16), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    rows[:, 1] = 1
    with h5py.File(tmp_path / "val.h5", "w") as f:  # 21 rows: batches of 4, the last one of 1 row
        f.create_dataset("data", data=rows.numpy())
    params = load_params("gpt2_tiny", {**MICRO, "eval_input.batch_size": 4, "runconfig.eval_steps": None,
                                        "eval_input.max_sequence_length": 16})
    model, cpu = micro_model(), torch.device("cpu")
    loader = eval_dataloader(params, tmp_path)
    assert len(loader) == 6 and not loader.drop_last
    whole = evaluate_pass(model, params, loader, device=cpu, eval_steps=None)
    assert whole["eval/tokens"] == 21 * 16  # every sequence once
    two = evaluate_pass(model, params, loader, device=cpu, eval_steps=2)
    assert two == evaluate(model, eval_dataloader(params, tmp_path), device=cpu, max_batches=2)
    assert evaluate_pass(model, params, loader, device=cpu, eval_steps=2) == two  # each pass from batch 0
    assert evaluate_pass(model, params, loader, device=cpu, eval_steps=1000) == whole  # never past one epoch
    assert [eval_batches(loader, n) for n in (None, 2, 1000)] == [6, 2, 6]
    halves = [eval_dataloader(params, tmp_path, rank=r, world_size=2) for r in range(2)]
    assert [h.batch_size for h in halves] == [2, 2]


def test_sampling_top_k_temperature_and_eos():
    model = micro_model()
    prompt = [464, 3290, 286]
    greedy = sample(model, prompt, max_new_tokens=6, top_k=1)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert greedy == ids[0, 3:].tolist()

    draw = lambda seed: sample(model, prompt, max_new_tokens=8, temperature=1.5, top_k=50,  # noqa: E731
                               generator=torch.Generator().manual_seed(seed))
    assert draw(0) == draw(0) and draw(0) != draw(1)
    eos = greedy[2]  # stops before the first time it would emit eos
    assert sample(model, prompt, max_new_tokens=6, top_k=1, eos_id=eos) == greedy[:greedy.index(eos)]
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sample(model, prompt, max_new_tokens=1, temperature=0)


def test_train_then_evaluate_stages(tiny_dataset_64, tmp_path):
    ctx = RunContext(pipeline_run_id="run1", artifact_root=str(tmp_path / "artifacts"))
    overrides = {**MICRO, "train_input.data_dir": str(tiny_dataset_64 / "train"),
                 "eval_input.data_dir": str(tiny_dataset_64 / "val"), "runconfig.max_steps": 3,
                 "runconfig.checkpoint_steps": 2, "runconfig.log_steps": 1, "runconfig.eval_steps": 2,
                 "runconfig.sample_max_new_tokens": 5, "runconfig.sample_prompts": ["To be, or not"]}
    trained = run_stage("train", ctx, train_stage.Request(params="gpt2_tiny", overrides=overrides, model_dir=str(tmp_path / "work")))
    model_dir = tmp_path / "artifacts" / "run1" / "train" / "model"
    assert trained.outputs["model"] == str(model_dir)
    assert {p.name for p in model_dir.iterdir()} == {"model.safetensors", "config.json", "params.yaml", "MANIFEST.json"}
    assert load_params(model_dir / "params.yaml").runconfig.max_steps == 3
    checkpoints = {p.name for p in (tmp_path / "artifacts" / "run1" / "train" / "checkpoints").iterdir()}
    assert checkpoints == {"checkpoint_00000002.pt", "checkpoint_00000003.pt", "MANIFEST.json"}
    assert trained.metrics["train/loss"] > 0 and trained.metrics["train/steps"] == 3

    result = run_stage("evaluate", ctx, evaluate_stage.Request(params="gpt2_tiny", model_dir=trained.outputs["model"], overrides=overrides))
    report = tmp_path / "artifacts" / "run1" / "evaluate" / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics == result.metrics
    assert set(metrics) >= {"eval/loss", "eval/lm_perplexity", "eval/accuracy"}
    assert 8 < metrics["eval/loss"] < 11.5 and 0 <= metrics["eval/accuracy"] < 0.2
    samples = json.loads((report / "samples.json").read_text())
    assert samples[0]["prompt"] == "To be, or not" and isinstance(samples[0]["completion"], str)
    assert "To be, or not" in (report / "report.md").read_text() and (report / "report.html").is_file()
    # the stage scores the whole val split, whatever runconfig.eval_steps (2) asks of training's evaluations
    split = json.loads((tiny_dataset_64 / "val" / "data_params.json").read_text())["h5_dataset_stats"]
    batches = math.ceil(split["num_sequences"] / 4)
    assert metrics["eval/tokens"] == split["loss_valid_tokens"] and batches > 2
    assert result.details == {"eval_batches": batches, "split_batches": batches}
    assert (f"Scored: {split['loss_valid_tokens']:,} tokens in {batches} batches: the whole eval split"
            in (report / "report.md").read_text())
    # the runs record the splits they read, with their counts (MLflow dataset inputs)
    uses = {run_id: [(d.dataset.name, json.loads(d.dataset.profile), d.tags[0].value)
                     for d in MlflowClient().get_run(run_id).inputs.dataset_inputs]
            for run_id in (trained.mlflow_run_id, result.mlflow_run_id)}
    profile = {k: split[k] for k in ("num_sequences", "num_tokens", "loss_valid_tokens")} | {"max_seq_length": 64}
    assert uses[result.mlflow_run_id] == [("msl64/val", profile, "evaluation")]
    assert [(name, context) for name, _, context in uses[trained.mlflow_run_id]] == [("msl64/train", "training")]
    capped = run_stage("evaluate", RunContext(pipeline_run_id="capped", artifact_root=ctx.artifact_root),
                       evaluate_stage.Request(params="gpt2_tiny", model_dir=trained.outputs["model"],
                                              overrides=overrides, eval_steps=1))
    assert capped.details == {"eval_batches": 1, "split_batches": batches} and capped.metrics["eval/tokens"] <= 4 * 64
    assert (f"tokens in 1 batches: the first 1 of the eval split's {batches} (--eval_steps)"
            in (tmp_path / "artifacts" / "capped" / "evaluate" / "report" / "report.md").read_text())
    # promotion compares whole-split scores: a capped one is refused
    with pytest.raises(ConfigError, match=rf"the evaluate stage scored 1 of the val split's {batches} batches"):
        run_stage("promote", RunContext(pipeline_run_id="capped", artifact_root=ctx.artifact_root),
                  promote_stage.Request(params="gpt2_tiny", model_dir=trained.outputs["model"],
                                        dataset=str(tiny_dataset_64)))

    # the same weights, read from the final training checkpoint instead, score the same
    from_checkpoint = run_stage("evaluate", ctx, evaluate_stage.Request(
        params="gpt2_tiny", model_dir=trained.outputs["model"], overrides=overrides,
        checkpoint_path=trained.outputs["checkpoints"]))
    assert from_checkpoint.metrics["eval/loss"] == pytest.approx(metrics["eval/loss"])
    # the reference's habit: --model_dir is the folder training ran in (its newest checkpoint), or a file
    for model_dir in (tmp_path / "work", tmp_path / "work" / "checkpoints" / "checkpoint_00000003.pt"):
        scored = run_stage("evaluate", ctx, evaluate_stage.Request(params="gpt2_tiny", model_dir=str(model_dir),
                                                                   overrides=overrides))
        assert scored.metrics["eval/loss"] == pytest.approx(metrics["eval/loss"]), model_dir
    older = run_stage("evaluate", ctx, evaluate_stage.Request(
        params="gpt2_tiny", model_dir=str(tmp_path / "work" / "checkpoints" / "checkpoint_00000002.pt"),
        overrides=overrides))
    assert older.metrics["eval/loss"] != pytest.approx(metrics["eval/loss"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"--model_dir .*empty: no model.safetensors \(a model artifact\) and no "
                                        r"checkpoint_<step>.pt in it or in its checkpoints/"):
        run_stage("evaluate", ctx, evaluate_stage.Request(params="gpt2_tiny", model_dir=str(tmp_path / "empty"),
                                                          overrides=overrides))


def _hf_folder(folder, vocab_size: int, positions: int = 64):
    """A tiny Hugging Face GPT-2 saved as transformers saves it; its top logit is id 50300 when padded."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=positions, vocab_size=vocab_size))
    if vocab_size > 50300:
        with torch.no_grad():  # ../shared/cases/vocab50304-eval-crash: a padded id wins every argmax
            hf.transformer.ln_f.weight.zero_()
            hf.transformer.ln_f.bias.fill_(1.0)
            hf.transformer.wte.weight[50300] = 1.0
    hf.save_pretrained(folder)
    return folder


def test_evaluate_a_padded_vocabulary_model_and_refuse_another_vocabulary(tiny_dataset_64, tmp_path):
    ctx = RunContext(pipeline_run_id="run-padded", artifact_root=str(tmp_path / "artifacts"))
    overrides = {**MICRO, "eval_input.data_dir": str(tiny_dataset_64 / "val"), "runconfig.eval_steps": 2,
                 "runconfig.sample_max_new_tokens": 8}
    padded = _hf_folder(tmp_path / "hf50304", 50304)
    result = run_stage("evaluate", ctx, evaluate_stage.Request(params="gpt2_tiny", model_dir=str(padded),
                                                               overrides=overrides))
    assert math.isfinite(result.metrics["eval/loss"]) and result.metrics["eval/tokens"] > 0
    samples = json.loads((tmp_path / "artifacts" / "run-padded" / "evaluate" / "report" / "samples.json").read_text())
    assert samples[0]["completion"]  # decoded: no sampled id past the tokenizer's 50257
    other = _hf_folder(tmp_path / "hf1000", 1000)
    with pytest.raises(DataError, match=r"--model_dir .*hf1000: the model has vocab_size 1000, the config has "
                                        r"model.vocab_size 50257"):
        run_stage("evaluate", ctx, evaluate_stage.Request(params="gpt2_tiny", model_dir=str(other), overrides=overrides))
    short = _hf_folder(tmp_path / "hf32positions", 50257, positions=32)  # the eval data has 64 tokens a row
    with pytest.raises(DataError, match=r"--model_dir .*hf32positions: the model has 32 positions "
                                        r"\(max_position_embeddings\), eval_input.max_sequence_length is 64"):
        run_stage("evaluate", ctx, evaluate_stage.Request(params="gpt2_tiny", model_dir=str(short), overrides=overrides))
