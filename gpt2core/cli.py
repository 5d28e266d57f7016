"""The `gpt2ops` command: one subcommand per pipeline stage, plus local runs and pipeline management.

A stage's flags are its request's fields (``gpt2core.stages.<stage>.Request``) plus the run context
(``--pipeline_run_id``, ``--artifact_root``, ...); the stage runs through the launcher
(``gpt2core.launch``), writes its ``result.json`` (and with ``--result_file PATH`` a local copy, for
an orchestrator that reads a task's outputs from a file) and prints the result. Modules are imported
lazily, so `gpt2ops preprocess` does not pay for importing torch or MLflow, and so the library itself
never imports kfp or hera: only `run`, `pipeline` and `argo` (in the `pipelines` package) do.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import NoReturn

from gpt2core.stages import STAGES

# Subcommands that are not stages: name -> (module, one-line help). Each module defines
# add_<name>_arguments(parser) or add_arguments(parser), and main_<name>(args) or main(args).
COMMANDS: dict[str, tuple[str, str]] = {
    "compare": ("gpt2core.compare", "compare MLflow runs side by side"),
    "run": ("pipelines.cli", "run the whole pipeline locally (kfp.local)"),
    "pipeline": ("pipelines.cli", "compile | upload | submit | schedule against a KFP endpoint"),
    "argo": ("pipelines.argo_cli", "render | submit | schedule the Argo WorkflowTemplate"),
    "pipeline-run": ("gpt2core.pipeline_run", "start | record | end the MLflow parent run of a pipeline run"),
}
# Stages that the launcher can run on several processes or nodes (the others run in this process).
DISTRIBUTED_STAGES = ("train",)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser (its subcommands' parsers too), a bad flag reported as the one line every
    gpt2ops error is, instead of the usage block: ``gpt2ops train: error: argument --max_steps: ...``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="gpt2ops", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Only the module of the chosen subcommand is imported; the others get a help line only.
    chosen = next((a for a in argv if a in STAGES or a in COMMANDS), None)
    for name, help_text in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            _add_stage_arguments(p, name)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            (getattr(module, f"add_{name}_arguments", None) or module.add_arguments)(p)
            p.set_defaults(_main=getattr(module, f"main_{name}", None) or module.main)
    return parser


def _add_stage_arguments(parser: argparse.ArgumentParser, stage: str) -> None:
    from gpt2core.stages import stage_module
    from gpt2core.stages.request import add_context_arguments

    stage_module(stage).Request.add_arguments(parser)
    if stage in DISTRIBUTED_STAGES:
        g = parser.add_argument_group("launch")
        g.add_argument("--nproc_per_node", type=int, default=1,
                       help="processes on this node, one per GPU (torchrun; default 1: this process)")
        g.add_argument("--num_nodes", type=int, default=1,
                       help="nodes: past 1 a Kubeflow Trainer TrainJob runs the stage (default 1)")
    add_context_arguments(parser)
    parser.add_argument("--result_file", metavar="PATH",
                        help="also write the stage's result (what <artifact_root>/<run>/<stage>/result.json "
                             "holds, a failure included) to this local file: an orchestrator that reads a "
                             "task's outputs from a file in its container (Argo) reads them there")
    parser.set_defaults(_main=lambda args: _run_stage_command(stage, args))


def _run_stage_command(stage: str, args: argparse.Namespace) -> int:
    from gpt2core.launch import launch
    from gpt2core.platform.context import process_rank
    from gpt2core.platform.results import StageResult, write_result
    from gpt2core.stages import stage_module
    from gpt2core.stages.request import context_from_args

    # Only this process writes --result_file: the flag is not among those a launcher passes to the
    # processes it starts (request.to_args() and the run context).
    try:
        request = stage_module(stage).Request.from_args(args)
        result = launch(stage, context_from_args(args), request,
                        nproc_per_node=getattr(args, "nproc_per_node", 1), num_nodes=getattr(args, "num_nodes", 1))
    except Exception as exc:
        if args.result_file:
            write_result(args.result_file, StageResult.failure(stage, exc))
        raise
    if process_rank() == 0:
        if args.result_file:
            write_result(args.result_file, result)
        print(result.model_dump_json(indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = args._main(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line for users; --log-level DEBUG for the trace
        from gpt2core.errors import Gpt2opsError

        if not isinstance(exc, Gpt2opsError):
            raise
        logging.getLogger("gpt2ops").debug("error", exc_info=True)
        print(f"gpt2ops {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
