"""Measuring: clocks, the memory a step adds at its peak, FLOPs and the machine's matmul rate."""

from __future__ import annotations

import ctypes
import ctypes.util
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    synchronize(device)
    return time.perf_counter()


PHASES = ("data", "forward", "backward", "optimizer", "ema")  # of a bare-loop step


def _proc_status_mb(field: str) -> float | None:
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.exists() else []
    values = [int(line.split()[1]) for line in lines if line.startswith(field + ":")]
    return values[0] / 1024 if values else None


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]  # fmt: skip


def malloc_in_use() -> Callable[[], int] | None:
    """Bytes glibc's malloc has handed out and not had back (mallinfo2: heap + mmapped blocks),
    whether or not freed memory is kept in the process; None without glibc >= 2.33."""
    try:
        mallinfo2 = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2

    def in_use() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd

    return in_use


class PeakMemory:
    """Memory a block adds at its peak above what was in use when it began, in MB (so the
    interpreter, torch and earlier runs' leftovers do not count): max_memory_allocated on a GPU;
    on the CPU the bytes malloc has handed out, polled every ``every_s`` by a thread (RSS would
    count freed memory the process keeps: keep_freed_memory); without glibc the RSS high-water
    mark (VmHWM, reset through /proc/self/clear_refs; Linux). The poll takes malloc's lock, so
    call :meth:`stop` before timing anything (leaving the block stops it too)."""

    def __init__(self, device: torch.device, every_s: float = 0.002) -> None:
        self.device, self.every_s, self.result, self.before = device, every_s, {}, None
        self.in_use = malloc_in_use() if device.type == "cpu" else None
        self.done, self.poller, self.peak = threading.Event(), None, 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            self.before = torch.cuda.memory_allocated(self.device) / 2**20
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.in_use is not None:
            self.before = self.in_use() / 2**20
            self.poller = threading.Thread(target=self._poll, daemon=True)
            self.poller.start()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.before = _proc_status_mb("VmRSS")
            except OSError:
                pass
        return self

    def _poll(self) -> None:
        while not self.done.wait(self.every_s):
            self.peak = max(self.peak, self.in_use())

    def stop(self) -> None:
        if self.done.is_set() or self.before is None:
            return
        self.done.set()
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.poller is not None:
            self.poller.join()
            peak = max(self.peak, self.in_use()) / 2**20
        else:
            peak = _proc_status_mb("VmHWM")
        self.result["peak_mb"] = peak - self.before

    def __exit__(self, *exc) -> None:
        self.stop()


def matmul_gflops(device: torch.device, n: int = 2048, reps: int = 10) -> float:
    """The machine's dense float32 rate: median of ``reps`` n×n matmuls."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    times = []
    for _ in range(reps + 2):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times[2:]) / 1e9


def train_flops(net: nn.Module, batch: int, shape: tuple[int, int, int]) -> float:
    """FLOPs of one forward + backward at ``batch`` (counted at batch 2, linear in the batch)."""
    device = next(net.parameters()).device
    x = torch.randn(2, *shape, device=device)
    t = torch.randint(0, 1000, (2,), device=device)
    with FlopCounterMode(display=False) as counter:
        net(x, t).square().mean().backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops() * batch / 2


def summary(times: list[float], batch: int) -> dict:
    median = statistics.median(times)
    return {"step_ms": 1000 * median, "images_per_s": batch / median, "steps_timed": len(times)}
