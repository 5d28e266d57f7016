"""What a Cerebras run needs from the config, checked before the SDK is touched.

Everything here runs in either venv (no SDK import), so a bad setting fails in a second with a
``ConfigError`` naming the key, instead of minutes later inside the SDK with a gRPC traceback.

The cluster settings come from ``runconfig`` under the reference 2.x names (``mgmt_address``,
``num_csx``, ``credentials_path``, ``mount_dirs``, ``python_paths``, ``compile_dir``, ...).
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path

import gpt2core
from gpt2core.config import Params
from gpt2core.errors import ConfigError

BACKENDS = ("CSX", "CPU")
# Half dtypes the wafer runs; the CPU backend only autocasts to bfloat16 (as the Model Zoo does).
CSX_HALF_DTYPES = ("cbfloat16", "bfloat16", "float16")
JOB_PRIORITIES = ("p1", "p2", "p3")
MGMT_ADDRESS = re.compile(r"^(?P<host>[^\s:]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})$")
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class CerebrasSettings:
    """The resolved run settings of one Cerebras job: backend, cluster and precision."""

    backend: str  # "CSX" (a Wafer-Scale Cluster) or "CPU" (the SDK's CPU backend: tests, laptops)
    mgmt_address: str | None
    mgmt_namespace: str | None
    credentials_path: str | None
    num_csx: int
    num_workers_per_csx: int
    mount_dirs: tuple[str, ...]
    python_paths: tuple[str, ...]
    compile_dir: str | None
    job_labels: tuple[str, ...]
    job_priority: str | None
    job_time_sec: int | None
    disable_version_check: bool
    half_dtype: str | None  # None: full float32 (CPU without mixed precision)
    loss_scaling_factor: float | str  # "dynamic" or a static scale (CSX with float16/cbfloat16)

    @property
    def is_csx(self) -> bool:
        return self.backend == "CSX"

    @property
    def uses_grad_scaler(self) -> bool:
        """Loss scaling is for 16-bit floats with a short exponent; bfloat16 and float32 need none."""
        return self.is_csx and self.half_dtype in ("float16", "cbfloat16")


def resolve_settings(params: Params, backend: str, *, need_appliance: bool) -> CerebrasSettings:
    """Check the config for a run on ``backend`` and return its settings.

    ``need_appliance``: the run cannot start without the cluster (training on CSX). Validation
    runs locally; compile lowers locally first and reports a missing address at the boundary.
    """
    backend = backend.upper()
    if backend not in BACKENDS:
        raise ConfigError(f"cerebras backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    r, m, o = params.runconfig, params.model, params.optimizer

    _check_torch_only_options(params, backend)
    if r.num_csx < 1:
        raise ConfigError(f"runconfig.num_csx: expected an integer >= 1, got {r.num_csx}")
    if r.num_workers_per_csx < 0:
        raise ConfigError(f"runconfig.num_workers_per_csx: expected >= 0 (0: the SDK default), "
                          f"got {r.num_workers_per_csx}")
    if backend == "CSX" and params.train_input.batch_size % r.num_csx:
        raise ConfigError(f"train_input.batch_size: {params.train_input.batch_size} is split evenly across "
                          f"runconfig.num_csx={r.num_csx} systems; expected a multiple of {r.num_csx}")
    if r.job_priority is not None and r.job_priority not in JOB_PRIORITIES:
        raise ConfigError(f"runconfig.job_priority: expected one of {JOB_PRIORITIES}, got {r.job_priority!r}")
    if r.job_time_sec is not None and r.job_time_sec < 1:
        raise ConfigError(f"runconfig.job_time_sec: expected a positive number of seconds, got {r.job_time_sec}")
    for i, label in enumerate(r.job_labels):
        if label.count("=") != 1 or not all(label.split("=")):
            raise ConfigError(f"runconfig.job_labels.{i}: expected 'key=value', got {label!r}")
    for key in ("mount_dirs", "python_paths"):
        for i, folder in enumerate(getattr(r, key)):
            if not Path(folder).is_dir():
                raise ConfigError(f"runconfig.{key}.{i}: {folder} is not an existing folder on this machine")
    if r.credentials_path is not None and not Path(r.credentials_path).is_file():
        raise ConfigError(f"runconfig.credentials_path: {r.credentials_path} is not a file (expected the "
                          f"cluster's TLS certificate)")

    if backend == "CSX":
        # The wafer always computes in a 16-bit type: mixed_precision: False cannot be honoured.
        if not m.mixed_precision:
            raise ConfigError("model.mixed_precision: the CSX backend always trains in mixed precision; "
                              "set it to true (with model.fp16_type cbfloat16, bfloat16 or float16)")
        half_dtype = m.fp16_type
        if half_dtype == "cbfloat16" and o.loss_scaling_factor != "dynamic":
            raise ConfigError("optimizer.loss_scaling_factor: cbfloat16 needs dynamic loss scaling; "
                              f"expected 'dynamic', got {o.loss_scaling_factor!r}")
    else:
        if m.mixed_precision and m.fp16_type != "bfloat16":
            raise ConfigError(f"model.fp16_type: the CPU backend autocasts to bfloat16 only, got "
                              f"{m.fp16_type!r} (set bfloat16, or model.mixed_precision: false)")
        half_dtype = "bfloat16" if m.mixed_precision else None

    if r.mgmt_address is not None:
        check_mgmt_address(r.mgmt_address)
    elif need_appliance and backend == "CSX":
        raise ConfigError("runconfig.mgmt_address: not set; training on the CSX backend needs the cluster "
                          "management server as '<host>:<port>' (or use the CPU backend)")

    python_paths = tuple(r.python_paths)
    if backend == "CSX":
        # Appliance workers import gpt2core to build the dataloader (our input_fn lives there).
        package_root = str(Path(gpt2core.__file__).resolve().parent.parent)
        if package_root not in python_paths:
            python_paths += (package_root,)

    return CerebrasSettings(
        backend=backend,
        mgmt_address=r.mgmt_address,
        mgmt_namespace=r.mgmt_namespace,
        credentials_path=r.credentials_path,
        num_csx=r.num_csx,
        num_workers_per_csx=r.num_workers_per_csx,
        mount_dirs=tuple(r.mount_dirs),
        python_paths=python_paths,
        compile_dir=r.compile_dir,
        job_labels=tuple(r.job_labels),
        job_priority=r.job_priority,
        job_time_sec=r.job_time_sec,
        disable_version_check=r.disable_version_check,
        half_dtype=half_dtype,
        loss_scaling_factor=o.loss_scaling_factor,
    )


def _check_torch_only_options(params: Params, backend: str) -> None:
    """Options of our torch trainer that the cstorch flow does not implement: refuse, never ignore."""
    r, o = params.runconfig, params.optimizer
    unsupported = {
        "runconfig.torch_compile": (r.torch_compile, "the SDK compiles the graph itself"),
        "runconfig.activation_checkpointing": (r.activation_checkpointing,
                                               "the cluster manages activation memory itself"),
        "runconfig.parallelism": (r.parallelism != "ddp",
                                  "the cluster scales with runconfig.num_csx, not torch parallelism"),
        "optimizer.grad_accum_steps": (o.grad_accum_steps != 1,
                                       "the CSX compiler picks micro-batches itself; set 1"),
        "runconfig.eval_frequency": (r.eval_frequency is not None,
                                     "the cerebras flow trains only; the evaluate stage scores the model"),
    }
    for key, (is_set, why) in unsupported.items():
        if is_set:
            raise ConfigError(f"{key}: not supported on the Cerebras {backend} backend ({why})")


def check_mgmt_address(address: str, *, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """The address must be '<host>:<port>' and accept a TCP connection: the SDK would otherwise
    retry gRPC for minutes before saying the cluster is unreachable."""
    match = MGMT_ADDRESS.match(address)
    if not match or not 0 < int(match["port"]) < 65536:
        raise ConfigError(f"runconfig.mgmt_address: expected '<host>:<port>', got {address!r}")
    host = match["host"].strip("[]")
    try:
        with socket.create_connection((host, int(match["port"])), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ConfigError(f"runconfig.mgmt_address: cannot reach the cluster management server at "
                          f"{address} ({exc.strerror or exc}); check the address, the port and the "
                          f"network path to the cluster") from None
