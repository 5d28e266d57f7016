"""``python -m gpt2core.cerebras``: the cstorch side of ``gpt2core.cerebras`` (runs where the SDK is).

Two ways in:
- ``--request request.json --result result.json``: what ``gpt2core.cerebras`` runs
  (``gpt2core.platform.child_process``); metrics are printed as ``@gpt2ops-metrics {json}`` lines,
  the outcome (or the error) goes to result.json;
- ``convert --checkpoint ckpt.mdl --params params.yaml --out DIR``: convert a Cerebras checkpoint
  into our saved-model folder by hand (needs the SDK);
- ``modelzoo --params CFG --out params.yaml [--train_data_dir D --eval_data_dir D]``: write the
  config as a Model Zoo 2.x ``trainer:`` YAML (no SDK needed).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from gpt2core.cerebras import METRICS_PREFIX
from gpt2core.config import load_params, params_from_dict
from gpt2core.errors import Gpt2opsError
from gpt2core.platform.child_process import child_main


def emit_metrics(metrics: dict[str, float], step: int) -> None:
    print(METRICS_PREFIX + json.dumps({"step": step, "metrics": metrics}), flush=True)


def execute(op: str, params: Any, args: dict[str, Any]) -> dict[str, Any]:
    from gpt2core.cerebras import flow, modelzoo

    if op in ("validate", "compile"):
        return flow.trace_one_step(params, args["data_dir"], args["work_dir"], backend_name=args["backend"], mode=op)
    if op == "train":
        result = flow.train(params, args["data_dir"], model_dir=args["model_dir"],
                            checkpoint_dir=args["checkpoint_dir"], work_dir=args["work_dir"],
                            backend_name=args["backend"], on_metrics=emit_metrics,
                            checkpoint_sha256=args.get("checkpoint_sha256"))
        result["modelzoo_params"] = str(modelzoo.write_modelzoo_params(
            params, Path(args["model_dir"]) / modelzoo.MODELZOO_PARAMS_FILE, train_data_dir=args["data_dir"],
            backend=args["backend"]))
        return result
    if op == "convert":
        return {"model_dir": str(flow.convert_checkpoint(args["checkpoint"], params, args["out_dir"],
                                                         sha256=args.get("sha256")))}
    raise ValueError(f"unknown operation {op!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt2core.cerebras", description=__doc__.splitlines()[0])
    parser.add_argument("op", nargs="?", choices=["convert", "modelzoo"],
                        help="convert a checkpoint, or export a Model Zoo params YAML, by hand")
    parser.add_argument("--request", help="request JSON written by gpt2core.cerebras")
    parser.add_argument("--result", help="where to write the outcome JSON")
    parser.add_argument("--checkpoint", help="convert: the cstorch checkpoint (.mdl)")
    parser.add_argument("--sha256", help="convert: the checkpoint's sha256 (its artifact's MANIFEST.json lists "
                                         "it): the file is loaded, which unpickles it, only if it matches")
    parser.add_argument("--params", help="convert: the run's params YAML")
    parser.add_argument("--out", help="convert: output folder; modelzoo: output YAML file")
    parser.add_argument("--train_data_dir", help="modelzoo: training HDF5 folder (default: the config's)")
    parser.add_argument("--eval_data_dir", help="modelzoo: eval HDF5 folder (default: the config's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.op == "modelzoo":
        from gpt2core.cerebras.modelzoo import write_modelzoo_params

        if not (args.params and args.out):
            parser.error("modelzoo needs --params and --out")
        try:
            print(write_modelzoo_params(load_params(args.params), args.out, train_data_dir=args.train_data_dir,
                                        eval_data_dir=args.eval_data_dir))
        except Gpt2opsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.op == "convert":
        if not (args.checkpoint and args.params and args.out and args.sha256):
            parser.error("convert needs --checkpoint, --sha256, --params and --out")
        try:
            result = execute("convert", load_params(args.params), {"checkpoint": args.checkpoint, "out_dir": args.out,
                                                                   "sha256": args.sha256})
            print(result["model_dir"])
        except Gpt2opsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0

    if not (args.request and args.result):
        parser.error("--request and --result are required")
    return child_main(lambda request: execute(request["op"], params_from_dict(request["params"], source="cerebras request"),
                                              request["args"]),
                      ["--request", args.request, "--result", args.result])


if __name__ == "__main__":
    sys.exit(main())
