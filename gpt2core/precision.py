"""The mixed-precision rule of the torch paths: what training, evaluation and the compile stage's
timed step autocast to. (The Cerebras target sets its precision with the SDK:
``gpt2core/cerebras/settings.py``.)"""

from __future__ import annotations

import torch

from gpt2core.config import ModelParams


def autocast_dtype(params: ModelParams, device: torch.device | str) -> torch.dtype | None:
    """The dtype to autocast to on ``device``, or None for fp32.

    With ``model.mixed_precision`` on a GPU: ``model.fp16_type`` float16 -> torch.float16 (the
    trainer then scales the loss); bfloat16 -> torch.bfloat16; cbfloat16, the wafer's own 16-bit
    format that GPUs lack -> torch.bfloat16, whose exponent range covers it. On CPU always None:
    CPU runs are fp32, exact and reproducible."""
    if torch.device(device).type != "cuda" or not params.mixed_precision:
        return None
    return torch.float16 if params.fp16_type == "float16" else torch.bfloat16
