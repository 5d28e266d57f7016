#!/usr/bin/env bash
# One short GPU measurement: gpt2-small training at sequence 1024 in bf16 with torch.compile, our
# model next to Hugging Face GPT2LMHeadModel (same architecture, batch, dtype), tokens/s and MFU
# against the device's bf16 dense peak (H100/H200: 989 TFLOP/s). Installs nothing: needs torch,
# pyyaml and safetensors (and transformers for the peer; pass --peer none without it).
# Takes about 3 minutes on an H100/H200, most of it compiling. Prints one JSON object.
#
#   bash bench/gpu_bench.sh                 # defaults below
#   bash bench/gpu_bench.sh --batch 16      # any bench/train_throughput.py flag overrides
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name())" >&2
exec "$PYTHON" bench/train_throughput.py --params gpt2_small --device cuda --dtype bfloat16 --compile \
    --batch 32 --seq 1024 --warmup 3 --rounds 3 --steps 10 "$@"
