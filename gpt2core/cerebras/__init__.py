"""The Cerebras target: validate, compile and train GPT-2 with the Cerebras PyTorch SDK (cstorch).

    from gpt2core import cerebras
    report = cerebras.validate(params, data_dir=train_dir, work_dir=tmp)    # validate_only, local
    report = cerebras.compile(params, data_dir=train_dir, work_dir=tmp)     # compile_only: needs mgmt_address
    result = cerebras.train(params, data_dir=train_dir, model_dir=out, checkpoint_dir=ckpts,
                            work_dir=tmp, on_metrics=lambda metrics, step: ...)

The SDK pins torch 2.4, so it cannot live beside the main venv's torch. Each call therefore runs
``python -m gpt2core.cerebras`` (``gpt2core/cerebras/__main__.py``) in a Python that has the SDK:
this one when ``cerebras.pytorch`` imports here (the cerebras container image), otherwise
``$GPT2OPS_CEREBRAS_PYTHON`` or the repo's ``.venv-cerebras/bin/python``. A child process per call
also gives every run the fresh SDK backend it needs (the SDK allows one backend per process).
The request and the result travel as files (``gpt2core.platform.child_process``, the result in the
format of every stage's result.json); metrics stream back while training; errors come back as the
same ``gpt2core.errors`` class.

``backend`` is ``"CSX"`` (a Wafer-Scale Cluster, settings from ``runconfig``) or ``"CPU"`` (the
SDK's CPU backend: same flow, no appliance; for tests and laptops). Left out, it is
``$GPT2OPS_CEREBRAS_BACKEND`` or CSX: whether an appliance exists is a property of where a stage
runs, not of the model, so the pipeline's ``target cerebras`` stays one target.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gpt2core
from gpt2core.cerebras.settings import resolve_settings
from gpt2core.config import Params
from gpt2core.errors import ConfigError
from gpt2core.platform.child_process import run_child_module
from gpt2core.platform.settings import settings

log = logging.getLogger(__name__)

ENV_PYTHON = "GPT2OPS_CEREBRAS_PYTHON"
ENV_BACKEND = "GPT2OPS_CEREBRAS_BACKEND"
REPO_ROOT = Path(gpt2core.__file__).resolve().parent.parent
VENV_PYTHON = REPO_ROOT / ".venv-cerebras" / "bin" / "python"
METRICS_PREFIX = "@gpt2ops-metrics "
MetricsCallback = Callable[[dict[str, float], int], None]

SETUP_HINT = f"run {REPO_ROOT / 'scripts' / 'setup-cerebras-venv.sh'} (about 5 minutes), or set {ENV_PYTHON}"


def sdk_importable() -> bool:
    """True where ``cerebras.pytorch`` is installed in this Python (the cerebras image)."""
    try:
        return importlib.util.find_spec("cerebras.pytorch") is not None
    except ModuleNotFoundError:
        return False


def sdk_python() -> str:
    """The Python that runs the cstorch flow."""
    configured = settings().cerebras_python
    if configured:
        if not Path(configured).is_file():
            raise ConfigError(f"{ENV_PYTHON}={configured}: no such Python executable")
        return str(configured)
    if sdk_importable():
        return sys.executable
    if VENV_PYTHON.is_file():
        return str(VENV_PYTHON)
    raise ConfigError(f"target cerebras: the Cerebras SDK (cerebras-pytorch) is not installed here and "
                      f"{VENV_PYTHON} does not exist; create it: {SETUP_HINT}")


def default_backend() -> str:
    return settings().cerebras_backend


def validate(params: Params, *, data_dir: str | Path, work_dir: str | Path, backend: str | None = None) -> dict[str, Any]:
    """Trace, lower and validate one training step (CSX: the SDK's validate_only, which runs on
    this machine; CPU: one real step). Returns the report."""
    return _run("validate", params, {"data_dir": str(data_dir), "work_dir": str(work_dir), "backend": backend})


def compile(params: Params, *, data_dir: str | Path, work_dir: str | Path,  # noqa: A001 - the stage's name
            backend: str | None = None) -> dict[str, Any]:
    """compile_only: lower here, compile on the appliance (``runconfig.mgmt_address``; without it a
    ConfigError names the setting once lowering is done). Local artifacts: ``work_dir/cerebras_logs``."""
    return _run("compile", params, {"data_dir": str(data_dir), "work_dir": str(work_dir), "backend": backend})


def train(params: Params, *, data_dir: str | Path, model_dir: str | Path, checkpoint_dir: str | Path,
          work_dir: str | Path, backend: str | None = None, on_metrics: MetricsCallback | None = None,
          checkpoint_sha256: str | None = None) -> dict[str, Any]:
    """Train; cstorch checkpoints go to ``checkpoint_dir``, the final model (safetensors, our
    saved-model layout) to ``model_dir``, with a Model Zoo params YAML of the same run beside it.
    ``runconfig.checkpoint_path``, when set, is resumed from only if its sha256 is
    ``checkpoint_sha256`` (SDK checkpoints are unpickled: ``flow.load_checkpoint``)."""
    return _run("train", params, {"data_dir": str(data_dir), "model_dir": str(model_dir),
                                  "checkpoint_dir": str(checkpoint_dir), "work_dir": str(work_dir),
                                  "backend": backend, "checkpoint_sha256": checkpoint_sha256},
                on_metrics=on_metrics)


def convert_checkpoint(checkpoint: str | Path, params: Params, out_dir: str | Path, *, sha256: str | None) -> Path:
    """A cstorch checkpoint (``.mdl``) as our standard saved-model folder; loaded only if its sha256
    is ``sha256`` (``flow.load_checkpoint``)."""
    result = _run("convert", params, {"checkpoint": str(checkpoint), "out_dir": str(out_dir), "sha256": sha256})
    return Path(result["model_dir"])


def _run(op: str, params: Params, args: dict[str, Any], *, on_metrics: MetricsCallback | None = None) -> dict[str, Any]:
    if "backend" in args:
        args["backend"] = default_backend() if args["backend"] is None else args["backend"].upper()
        # Config mistakes fail here in a second, before the SDK's slow start in the child.
        resolve_settings(params, args["backend"], need_appliance=(op == "train"))
    python = sdk_python()
    env = {}
    if (REPO_ROOT / "pyproject.toml").is_file():
        # A checkout: the child imports this very gpt2core, whatever the SDK venv has installed.
        # (Installed, REPO_ROOT is the main venv's site-packages, whose torch 2.13 would shadow
        # the SDK's 2.4: the image installs the same gpt2ops into the SDK venv instead.)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)

    def metrics_line(line: str) -> bool:
        if not line.startswith(METRICS_PREFIX):
            return False
        if on_metrics:
            record = json.loads(line[len(METRICS_PREFIX):])
            on_metrics(record["metrics"], record["step"])
        return True

    return run_child_module(python, "gpt2core.cerebras", {"op": op, "params": params.to_dict(), "args": args},
                            what=f"cerebras {op}", env=env, on_line=metrics_line)
