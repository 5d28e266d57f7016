"""Evaluate stage: `gpt2ops evaluate --params CFG --model_dir MODEL [--checkpoint_path CKPT]`.

Scores a trained model on the whole of ``eval_input.data_dir`` (``eval/loss``, ``eval/lm_perplexity``,
``eval/accuracy``, as the reference defines them; ``eval/tokens``: the real tokens scored), or on its
first ``--eval_steps`` batches (``runconfig.eval_steps`` is only for the evaluations during training),
and writes text samples (temperature, top-k from ``runconfig.sample_*``). Output: the ``report``
artifact with ``metrics.json``, ``samples.json``, ``report.md`` and ``report.html``; the result's
details say how many batches of the split were scored (``eval_batches`` of ``split_batches``).
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

import torch
from pydantic import Field, PositiveInt

from gpt2core.config import Params
from gpt2core.errors import DataError
from gpt2core.platform.artifacts import artifact_digest, local_input, local_output
from gpt2core.platform.context import RunContext
from gpt2core.platform.results import StageResult
from gpt2core.platform.tracking import (DATASET_EVALUATION, TAG_CONFIG_HASH, TAG_DATASET_HASH, TAG_MODEL_URI,
                                       stage_run)
from gpt2core.stages.inputs import data_input, local_checkpoint, split_use
from gpt2core.stages.request import ModelRequest

STAGE = "evaluate"


class Request(ModelRequest):
    """The model to score and the config whose eval_input it is scored on."""

    model_dir: str = Field(description="the train stage's model artifact (local or s3://)")
    checkpoint_path: str | None = Field(None, description="evaluate this training checkpoint's weights "
                                                          "instead (file or folder, local or s3://)")
    eval_steps: PositiveInt | None = Field(None, description="score only the first N batches of the eval "
                                                             "split (default: all of it, so scores compare)")


def run(ctx: RunContext, request: Request) -> StageResult:
    """Score the model at ``request.model_dir`` (or the weights of ``request.checkpoint_path``) on
    ``eval_input.data_dir`` and publish the ``report`` artifact."""
    from gpt2core.evaluation import eval_batches, eval_dataloader, evaluate_pass

    cfg = request.load_params()
    report_uri = ctx.artifact_uri(STAGE, "report")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tags = {TAG_CONFIG_HASH: cfg.config_hash(), TAG_MODEL_URI: request.model_dir,
            TAG_DATASET_HASH: artifact_digest(cfg.eval_input.data_dir)}
    with stage_run(STAGE, ctx, params=cfg.to_flat_dict(), tags=tags) as tracked:
        tracked.log_datasets([split_use(cfg.eval_input.data_dir, DATASET_EVALUATION)])
        if not request.checkpoint_path:  # a checkpoint's weights are no registered model
            tracked.log_model_input(request.model_dir)
        started = time.monotonic()
        model = _load_model(cfg, request.model_dir, request.checkpoint_path).to(device)
        with data_input("eval_input.data_dir", cfg.eval_input.data_dir) as eval_dir:
            loader = eval_dataloader(cfg, eval_dir)
            metrics = evaluate_pass(model, cfg, loader, device=device, eval_steps=request.eval_steps)
        scored = {"eval_batches": eval_batches(loader, request.eval_steps), "split_batches": len(loader)}
        samples = _samples(model, cfg, device)
        metrics["eval/seconds"] = time.monotonic() - started
        with local_output(report_uri) as out:
            _write_report(out, metrics, samples, request.model_dir, _scored_text(metrics, **scored))
        tracked.log_metrics(metrics)
    return StageResult(outputs={"report": report_uri}, metrics=metrics, mlflow_run_id=tracked.run_id,
                       details=scored)


def _scored_text(metrics: dict[str, float], *, eval_batches: int, split_batches: int) -> str:
    """What an evaluation scored, in words: ``35,628 tokens in 35 batches: the whole eval split``."""
    extent = ("the whole eval split" if eval_batches == split_batches
              else f"the first {eval_batches} of the eval split's {split_batches} (--eval_steps)")
    return f"{metrics['eval/tokens']:,.0f} tokens in {eval_batches} batches: {extent}"


def _load_model(cfg: Params, model_uri: str, checkpoint_path: str | None):  # noqa: ANN202 - GPT2
    from gpt2core.hf_checkpoint import load_pretrained
    from gpt2core.model import GPT2

    if checkpoint_path:
        path = local_checkpoint(checkpoint_path, Path(cfg.runconfig.model_dir))
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        model = GPT2(cfg.model)
        try:
            model.load_state_dict(state["model"])
        except (KeyError, RuntimeError) as exc:
            raise DataError(f"--checkpoint_path {checkpoint_path}: weights do not fit model config ({exc})") from exc
        return model
    with local_input(model_uri) as folder:
        return load_pretrained(folder)


def _samples(model, cfg: Params, device: torch.device) -> list[dict[str, str]]:  # noqa: ANN001
    from gpt2core.evaluation import sample
    from gpt2core.tokenizer import EOS_ID, get_tokenizer

    r = cfg.runconfig
    tokenizer = get_tokenizer()
    generator = torch.Generator(device=device).manual_seed(r.seed)
    out = []
    for prompt in r.sample_prompts:
        ids = tokenizer.encode(prompt) or [EOS_ID]
        new = sample(model, ids, max_new_tokens=r.sample_max_new_tokens, temperature=r.sample_temperature,
                     top_k=r.sample_top_k, eos_id=EOS_ID, generator=generator)
        out.append({"prompt": prompt, "completion": tokenizer.decode(new)})
    return out


def _write_report(out: Path, metrics: dict[str, float], samples: list[dict[str, str]], model_uri: str,
                  scored: str) -> None:
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "samples.json").write_text(json.dumps(samples, indent=2) + "\n")
    rows = "\n".join(f"| `{k}` | {v:.6g} |" for k, v in metrics.items())
    texts = "\n\n".join(f"**{s['prompt']}**{s['completion']}".replace("\n", "  \n") for s in samples)
    (out / "report.md").write_text(f"# Evaluation\n\nModel: `{model_uri}`\n\nScored: {scored}\n\n"
                                   f"| metric | value |\n|---|---|\n{rows}\n\n## Samples\n\n{texts}\n")
    table = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.6g}</td></tr>" for k, v in metrics.items())
    blocks = "".join(f"<pre><b>{html.escape(s['prompt'])}</b>{html.escape(s['completion'])}</pre>" for s in samples)
    (out / "report.html").write_text(f"<html><body><h1>Evaluation</h1><p>Model: <code>{html.escape(model_uri)}"
                                     f"</code></p><p>Scored: {html.escape(scored)}</p><table>{table}</table>"
                                     f"<h2>Samples</h2>{blocks}</body></html>\n")
