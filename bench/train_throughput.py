"""Training throughput of our GPT-2 next to Hugging Face GPT2LMHeadModel, in the same run.

Both models get the same architecture (from a bundled config), batch, sequence length, dtype and
optimizer (AdamW); a step is forward + loss + backward + optimizer step on random token ids.
Measurements alternate between the two models round by round, so load from other processes hits
both alike; the median step time of each is reported. Prints one JSON object.

    python bench/train_throughput.py                                      # CPU eager, gpt2_tiny
    python bench/train_throughput.py --params gpt2_small --device cuda --dtype bfloat16 --compile \
        --batch 16 --seq 1024                                             # GPU (see bench/gpu_bench.sh)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt2core.config import load_params  # noqa: E402
from gpt2core.hf_checkpoint import hf_config  # noqa: E402
from gpt2core.model import GPT2  # noqa: E402
from gpt2core.training.metrics import peak_flops  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_ours(params, device):
    model = GPT2(params.model).to(device)
    model.fused_head_loss = True  # as the trainer runs it
    return model, lambda ids, labels: model(ids, labels=labels)[1]


def build_hf(params, device):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(**hf_config(params.model))
    config._attn_implementation = "sdpa"  # the fastest attention HF has for GPT-2, as ours uses
    model = GPT2LMHeadModel(config).to(device)
    # HF shifts labels inside; pass the unshifted ids so both compute the same next-token loss.
    return model, lambda ids, labels: model(input_ids=ids, labels=ids).loss


def make_step(model, loss_fn, dtype, device, compile_model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    forward = torch.compile(loss_fn) if compile_model else loss_fn
    autocast = dtype != torch.float32

    def step(ids, labels):
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            loss = forward(ids, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def timed(step, ids, labels, n):
    times = []
    for _ in range(n):
        start = time.perf_counter()
        loss = step(ids, labels)
        loss.item()  # waits for the device
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="gpt2_tiny", help="config: bundled name, YAML path or s3:// URI")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=None, help="default: train_input.max_sequence_length")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model (compilation happens here)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    parser.add_argument("--peer", choices=("hf", "none"), default="hf")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout of both models (0: deterministic)")
    args = parser.parse_args()

    params = load_params(args.params, {f"model.{k}": args.dropout for k in
                                       ("dropout_rate", "embedding_dropout_rate", "attention_dropout_rate")})
    seq = args.seq or params.train_input.max_sequence_length
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    ids = torch.randint(0, params.model.vocab_size, (args.batch, seq), device=device)
    labels = torch.roll(ids, -1, dims=1)

    builders = {"ours": build_ours} | ({"hf": build_hf} if args.peer == "hf" else {})
    steps, models = {}, {}
    for name, build in builders.items():
        model, loss_fn = build(params, device)
        models[name] = model
        steps[name] = make_step(model, loss_fn, dtype, device, args.compile)
        timed(steps[name], ids, labels, args.warmup)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):  # alternate, so background load affects both alike
        for name, step in steps.items():
            times[name] += timed(step, ids, labels, args.steps)

    flops_per_token = models["ours"].flops_per_token(seq)
    peak, peak_source = peak_flops(device, dtype if dtype != torch.float32 else None)
    results = {}
    for name, t in times.items():
        tokens_per_s = args.batch * seq / statistics.median(t)
        results[name] = {"tokens_per_s": round(tokens_per_s, 1), "median_step_s": round(statistics.median(t), 5),
                         "mfu": round(tokens_per_s * flops_per_token / peak, 4),
                         "params": sum(p.numel() for p in models[name].parameters())}
    out = {
        "bench": "train_throughput", "params": args.params, "batch": args.batch, "seq": seq,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "dtype": args.dtype, "compile": args.compile,
        "torch": torch.__version__, "peak_flops": peak, "peak_source": peak_source,
        "flops_per_token": flops_per_token, **results,
    }
    if "hf" in results:
        out["ratio_ours_vs_hf"] = round(results["ours"]["tokens_per_s"] / results["hf"]["tokens_per_s"], 3)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
