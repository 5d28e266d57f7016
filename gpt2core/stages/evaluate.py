"""Evaluate stage: `gpt2ops evaluate --params CFG --model_dir MODEL [--checkpoint_path CKPT]`.

``--model_dir`` is what the reference's ``--mode eval --model_dir D`` takes and more: the folder
``gpt2ops train --model_dir D`` trained in (its newest checkpoint, as the reference loads the newest
``checkpoint_<step>.mdl`` of D), a checkpoint file, or a model artifact (``model.safetensors``, ours or
a Hugging Face GPT-2 folder); local or s3://. A model whose vocabulary differs from the config's
``model.vocab_size`` is refused before anything is scored.

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
import logging
import time
from pathlib import Path

import torch
from pydantic import Field, PositiveInt

from gpt2core.checkpoint_names import FOLDER as CHECKPOINTS, TORCH
from gpt2core.config import Params
from gpt2core.errors import DataError, one_line
from gpt2core.platform.artifacts import artifact_digest, local_input, local_output
from gpt2core.platform.context import RunContext
from gpt2core.platform.results import StageResult
from gpt2core.platform.tracking import (DATASET_EVALUATION, TAG_CONFIG_HASH, TAG_DATASET_HASH, TAG_MODEL_URI,
                                       stage_run)
from gpt2core.stages.inputs import data_input, local_checkpoint, require_input, split_use
from gpt2core.stages.request import ModelRequest

log = logging.getLogger(__name__)

STAGE = "evaluate"


class Request(ModelRequest):
    """The model to score and the config whose eval_input it is scored on."""

    model_dir: str = Field(description="the model to score: the train stage's model artifact, the folder "
                                       "`gpt2ops train --model_dir` trained in (its newest checkpoint), or a "
                                       "checkpoint file (local or s3://)")
    checkpoint_path: str | None = Field(None, description="evaluate this training checkpoint's weights "
                                                          "instead (file or folder, local or s3://)")
    eval_steps: PositiveInt | None = Field(None, description="score only the first N batches of the eval "
                                                             "split (default: all of it, so scores compare)")


def run(ctx: RunContext, request: Request) -> StageResult:
    """Score the model at ``request.model_dir`` (or the weights of ``request.checkpoint_path``) on
    ``eval_input.data_dir`` and publish the ``report`` artifact."""
    from gpt2core.evaluation import eval_batches, eval_dataloader, evaluate_pass

    cfg = request.load_params()
    require_input("eval_input.data_dir", cfg.eval_input.data_dir)  # before any work
    if request.checkpoint_path:
        require_input("--checkpoint_path", request.checkpoint_path, folder=False)
    else:
        require_input("--model_dir", request.model_dir, folder=False)  # a folder or a checkpoint file
    report_uri = ctx.artifact_uri(STAGE, "report")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tags = {TAG_CONFIG_HASH: cfg.config_hash(), TAG_MODEL_URI: request.model_dir,
            TAG_DATASET_HASH: artifact_digest(cfg.eval_input.data_dir)}
    with stage_run(STAGE, ctx, params=cfg.to_flat_dict(), tags=tags) as tracked:
        tracked.log_datasets([split_use(cfg.eval_input.data_dir, DATASET_EVALUATION)])
        if not request.checkpoint_path:  # a checkpoint's weights are no registered model
            tracked.log_model_input(request.model_dir)
        started = time.monotonic()
        with data_input("eval_input.data_dir", cfg.eval_input.data_dir) as eval_dir:
            loader = eval_dataloader(cfg, eval_dir)  # data that does not fit the config fails before the model loads
            model = _load_model(cfg, request.model_dir, request.checkpoint_path).to(device)
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
    """The model at ``checkpoint_path`` (a training checkpoint: the config's architecture), else at
    ``model_uri`` (see the module docstring)."""
    from gpt2core.checkpoint_names import list_checkpoints
    from gpt2core.hf_checkpoint import WEIGHTS_FILE, load_pretrained

    scratch = Path(cfg.runconfig.model_dir)
    if checkpoint_path:
        return _from_checkpoint(cfg, local_checkpoint(checkpoint_path, scratch), f"--checkpoint_path {checkpoint_path}")
    if model_uri.endswith(TORCH):
        return _from_checkpoint(cfg, local_checkpoint(model_uri, scratch), f"--model_dir {model_uri}")
    with local_input(model_uri) as folder:
        if (folder / WEIGHTS_FILE).is_file():
            model = load_pretrained(folder)
            _check_model_fits(cfg, model, model_uri)
            return model
        newest = (list_checkpoints(folder / CHECKPOINTS) or list_checkpoints(folder))[-1:]
        if not newest:
            raise DataError(f"--model_dir {model_uri}: no {WEIGHTS_FILE} (a model artifact) and no "
                            f"checkpoint_<step>{TORCH} in it or in its {CHECKPOINTS}/ (the folder of `gpt2ops train "
                            f"--model_dir`)")
        log.info("--model_dir %s: evaluating its newest checkpoint, %s", model_uri, newest[0].name)
        return _from_checkpoint(cfg, newest[0], f"--model_dir {model_uri}")


def _from_checkpoint(cfg: Params, path: Path, flag: str):  # noqa: ANN202 - GPT2
    from gpt2core.model import GPT2
    from gpt2core.training.checkpoint import read_checkpoint

    state = read_checkpoint(path, name=f"{flag}: {path.name}")
    model = GPT2(cfg.model)
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError, TypeError) as exc:
        raise DataError(f"{flag}: {path.name}: weights do not fit the model of --params ({one_line(exc)})") from exc
    return model


def _check_model_fits(cfg: Params, model, model_uri: str) -> None:  # noqa: ANN001 - GPT2
    """A loaded model (its own config, not --params) can score the config's eval data: the same
    vocabulary (the data's and the samples' ids; a padded embedding is fine, its extra ids are
    masked) and positions for eval_input.max_sequence_length tokens. DataError naming both."""
    if model.params.vocab_size != cfg.model.vocab_size:
        rows = model.params.embedding_rows
        raise DataError(f"--model_dir {model_uri}: the model has vocab_size {model.params.vocab_size}"
                        + (f" (embedding rows {rows})" if rows != model.params.vocab_size else "")
                        + f", the config has model.vocab_size {cfg.model.vocab_size}; evaluate it with a config "
                          f"of its vocabulary")
    positions, length = model.params.max_position_embeddings, cfg.eval_input.max_sequence_length
    if length > positions:
        raise DataError(f"--model_dir {model_uri}: the model has {positions} positions "
                        f"(max_position_embeddings), eval_input.max_sequence_length is {length}; evaluate it "
                        f"on data of at most {positions} tokens per sequence")


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
