"""Throughput and model flops utilisation (MFU = achieved flops / peak flops of the device)."""

from __future__ import annotations

import time

import torch

# Dense bf16/fp16 tensor-core peak (no sparsity), from the vendors' datasheets, SXM parts.
PEAK_FLOPS_16BIT = {
    "B200": 2250e12, "H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12,
    "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12, "V100": 125e12,
}


def peak_flops(device: torch.device, dtype: torch.dtype | None) -> tuple[float, str]:
    """(peak flops/s, where the number comes from) for ``device`` computing in ``dtype``.

    Known GPUs in 16-bit use the datasheet; anything else (CPU, fp32) is measured with a large
    matmul, so MFU still says how much of what the device can do the model gets.
    """
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_FLOPS_16BIT.items():
            if key in name:
                return value, f"{name} datasheet 16-bit dense"
    return measure_matmul_flops(device, dtype or torch.float32), f"measured {dtype or torch.float32} matmul"


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 2048, seconds: float = 0.3) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda _: None)
    a @ b  # warm-up
    sync(device)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        sync(device)  # time finished work, not queued launches
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - start)


class ThroughputMeter:
    """Tokens per second and MFU over the window since the last ``read``."""

    def __init__(self, flops_per_token: int, peak: float):
        self.flops_per_token, self.peak = flops_per_token, peak
        self.tokens, self.start = 0, time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def read(self) -> tuple[float, float]:
        """(tokens/s, mfu) since the previous read; starts a new window."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        tokens_per_s = self.tokens / elapsed
        self.tokens, self.start = 0, time.perf_counter()
        return tokens_per_s, tokens_per_s * self.flops_per_token / self.peak
