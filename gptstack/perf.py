"""Measured matmul peak of this machine, for MFU. Measured once, cached per device/dtype/threads."""
from __future__ import annotations

import json
import os
import time

import torch

from .data.tokens import cache_dir


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}-{torch.get_num_threads()}threads"


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 0, seconds: float = 0.5) -> float:
    """FLOP/s of a square matmul, best of a few timed runs after warm-up."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):
        a @ b
    sync()
    best, spent = float("inf"), 0.0
    while spent < seconds:
        t0 = time.perf_counter()
        a @ b
        sync()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return 2 * n**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    key = f"{device_name(device)}|{dtype}|torch{torch.__version__}"
    path = cache_dir() / "peak_flops.json"
    try:
        table = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        table = {}
    if key not in table:
        table[key] = measure_matmul_flops(device, dtype)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1))
        os.replace(tmp, path)
    return table[key]
