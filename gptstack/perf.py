"""Measured matmul peak of this machine, for MFU: the best measurement so far, per device/dtype/threads."""
from __future__ import annotations

import contextlib
import json
import os
import time
import types

import torch

from .data.tokens import cache_dir


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}-{torch.get_num_threads()}threads"


def matmul_dtype(precision: str) -> torch.dtype:
    """The dtype a Trainer precision's matmuls take (fp32-tf32 is fp32 under a faster matmul mode)."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 0, seconds: float = 1.0) -> float:
    """FLOP/s of a square matmul, best of the timed runs after warm-up (the best, since other
    processes on the machine only ever slow a run down)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    g = torch.Generator(device).manual_seed(0)  # not the global RNG: training's dropout draws from it
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
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


_measured: dict[str, float] = {}  # this process's measurement per key


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The peak for `dtype` under the process's current fp32 matmul mode (TF32 or not, see
    train.trainer.use_matmul_precision): the best of every measurement on this machine so far.
    Each process measures once, because a measurement taken while other processes load the
    machine comes out low and would make MFU read above 100%; the cache keeps the maximum."""
    mode = torch.get_float32_matmul_precision() if dtype == torch.float32 else ""
    key = f"{device_name(device)}|{dtype}{'|' + mode if mode else ''}|torch{torch.__version__}"
    path = cache_dir() / "peak_flops.json"
    try:
        table = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        table = {}
    if key not in _measured:
        _measured[key] = measure_matmul_flops(device, dtype, seconds=0.3)
        if _measured[key] > table.get(key, 0.0):
            table[key] = _measured[key]
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(table, indent=1))
            os.replace(tmp, path)
    return max(table.get(key, 0.0), _measured[key])


# The peak a measurement reached before a block inside it (`peak_rss_within`) reset the OS's high-water mark: the
# outer measurement's peak is the larger of that and the mark afterwards.
_peak_before_block = 0.0


def _clear_high_water_mark() -> bool:
    """Linux: /proc/self/clear_refs, value 5, resets the address space's high-water mark (VmHWM). False where that is
    unavailable: the peak then runs on from the process's start."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _high_water_mark_mb() -> float:
    """Linux: VmHWM, this address space's own mark (ru_maxrss would also count the parent's memory at fork, carried
    through exec); elsewhere ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # KiB
    except (OSError, StopIteration):
        import resource
        import sys
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 1024 / (1024 if sys.platform == "darwin" else 1)  # macOS counts bytes, Linux KiB


def reset_peak_rss() -> bool:
    """Start a new peak resident-set measurement for this process; False where the OS cannot (see above)."""
    global _peak_before_block
    _peak_before_block = 0.0
    return _clear_high_water_mark()


def peak_rss_mb() -> float:
    """This process's peak resident memory (MiB) since the last `reset_peak_rss`, or since it started."""
    return max(_peak_before_block, _high_water_mark_mb())


@contextlib.contextmanager
def peak_rss_within():
    """The block's own peak resident memory, as `.mb` once it ends (None where the OS cannot reset the mark); the
    measurement around it (`peak_rss_mb`) still counts the block and what came before it."""
    global _peak_before_block
    before = peak_rss_mb()
    block = types.SimpleNamespace(mb=None)
    own = _clear_high_water_mark()
    try:
        yield block
    finally:
        block.mb = _high_water_mark_mb() if own else None
        _peak_before_block = max(_peak_before_block, before)
