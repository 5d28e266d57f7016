"""The `gpt2ops` command: one subcommand per pipeline stage, plus local runs and KFP management.

Subcommand modules are imported lazily so `gpt2ops preprocess` does not pay for importing torch or
MLflow, and so the library itself never imports kfp: only `run` and `pipeline` (which live in the
`pipelines` package) do.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> (module, one-line help). Each module defines add_arguments(parser) and main(args).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "download": ("gpt2core.stages.download", "fetch a raw text corpus into an artifact"),
    "preprocess": ("gpt2core.stages.preprocess", "tokenize a corpus into Cerebras-layout HDF5"),
    "validate": ("gpt2core.stages.validate", "check config, data and memory before training"),
    "compile": ("gpt2core.stages.compile", "compile the training step and save compiler caches"),
    "train": ("gpt2core.stages.train", "train a GPT-2 model"),
    "evaluate": ("gpt2core.stages.evaluate", "evaluate a checkpoint and sample text"),
    "compare": ("gpt2core.stages.compare", "compare MLflow runs side by side"),
    "run": ("pipelines.cli", "run the whole pipeline locally (kfp.local)"),
    "pipeline": ("pipelines.cli", "compile | upload | submit | schedule against a KFP endpoint"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2ops", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Only the module of the chosen subcommand is imported; the others get a help line only.
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            add = getattr(module, f"add_{name}_arguments", None) or module.add_arguments
            add(p)
            p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module = args._module
    run = getattr(module, f"main_{args.command}", None) or module.main
    try:
        result = run(args)
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
