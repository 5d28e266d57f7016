"""Compile stage: `gpt2ops compile --params CFG --target gpu`.

The reference's compile_only: ``torch.compile`` the training step on the target device, warm it up,
and publish the compiler caches (``torch.compiler.save_cache_artifacts``) as the ``compile_cache``
artifact; the train stage loads them (``gpt2core.compilation.load_compile_cache``) and starts warm.
Reports the first-step time cold (empty caches) and warm (caches loaded) in a new process. A config
with ``runconfig.torch_compile: false`` trains eagerly, so then only a report saying so is published
(``--set runconfig.torch_compile=true`` compiles). The cerebras target compiles on the appliance through ``gpt2core.cerebras`` and publishes its report.
"""

from __future__ import annotations

import json


from gpt2core.compilation import compile_training_step, write_report, write_skipped_report
from gpt2core.platform.artifacts import local_input, local_output
from gpt2core.platform.context import RunContext
from gpt2core.platform.results import StageResult
from gpt2core.platform.tracking import TAG_CONFIG_HASH, stage_run
from gpt2core.stages.inputs import require_input
from gpt2core.stages.request import TrainingRequest

STAGE = "compile"


class Request(TrainingRequest):
    """The config to compile the training step of, and for which target (TrainingRequest's fields)."""


def run(ctx: RunContext, request: Request) -> StageResult:
    """Compile the training step of ``request.params`` for its target and publish the compiler
    caches as the ``compile_cache`` artifact."""
    cfg = request.load_params()
    target = request.target
    if target == "cerebras":  # the SDK compiles against the data: check it is there before any work
        require_input("train_input.data_dir", cfg.train_input.data_dir)
    cache_uri = ctx.artifact_uri(STAGE, "compile_cache")
    with stage_run(STAGE, ctx, params={**cfg.to_flat_dict(), "compile.target": target},
                   tags={TAG_CONFIG_HASH: cfg.config_hash()}) as tracked:
        with local_output(cache_uri) as out:
            if target == "cerebras":
                metrics = _compile_cerebras(cfg, out)
            elif not cfg.runconfig.torch_compile:
                # Training follows the config and runs eagerly: compiling here would be wasted time.
                write_skipped_report(out, "runconfig.torch_compile is false: training runs eagerly")
                metrics = {}
            else:
                report = compile_training_step(cfg, target, out)
                write_report(report, out)
                metrics = {"compile/cold_s": report.cold_s, "compile/warm_s": report.warm_s,
                           "compile/speedup": report.speedup, "compile/step_s": report.step_s,
                           "compile/cold_cpu_s": report.cold_cpu_s, "compile/warm_cpu_s": report.warm_cpu_s,
                           "compile/cache_mb": report.cache_bytes / 1e6}
            tracked.log_artifact(out, "compile_cache")
        tracked.log_metrics(metrics)
    return StageResult(outputs={"compile_cache": cache_uri}, metrics=metrics, mlflow_run_id=tracked.run_id)


def _compile_cerebras(cfg, out) -> dict[str, float]:  # noqa: ANN001 - Params, Path
    from gpt2core import cerebras

    with local_input(cfg.train_input.data_dir) as data_dir:
        # work_dir=out: the SDK's cerebras_logs/ (traced MLIR, the appliance's compile logs) is
        # published with the report; the compiled program itself stays in the cluster's compile
        # cache (runconfig.compile_dir), where the train job of the same config finds it.
        report = cerebras.compile(cfg, data_dir=data_dir, work_dir=out)
    (out / "cerebras_compile_report.json").write_text(json.dumps(report, indent=1, default=str))
    return {f"compile/{k}": float(v) for k, v in report.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
