"""Timing: through torch.utils.benchmark's Timer (device-synchronised, this process's thread count), the median of
runs filling a time budget or the mean of a fixed number of calls; by hand, the median of single calls timed alone
(decoding steps, which Timer cannot time one by one). One benchmark configuration in this process; the machine's
matmul throughput."""

from __future__ import annotations

import dataclasses
import resource
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.benchmark import Timer


def _timer(fn: Callable[[], object]) -> Timer:
    return Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())


def median_seconds(fn: Callable[[], object], min_run_time: float) -> float:
    """Median seconds of a call of ``fn``: Timer.blocked_autorange, which calls it once to warm up (and size its
    blocks), then in blocks until ``min_run_time`` seconds are spent (at least one timed block)."""
    return _timer(fn).blocked_autorange(min_run_time=min_run_time).median


def mean_seconds(fn: Callable[[], object], number: int) -> float:
    """Mean seconds of ``number`` calls of ``fn`` (Timer.timeit: two warm-up calls first), for calls that differ
    from one another (each decodes the next token, each takes the next batch)."""
    return _timer(fn).timeit(number).mean


def median_of_calls(fn: Callable[[], object], number: int) -> float:
    """Median seconds of ``number`` successive calls of ``fn``, each timed alone (device-synchronised), after two
    warm-up calls: for calls that differ from one another (each decodes the next token), robust to the spikes of a
    shared machine that a mean absorbs. (Timer times blocks of calls, not single ones.)"""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    fn()
    seconds = []
    for _ in range(number):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


@dataclasses.dataclass
class Result:
    method: str
    length: int
    causal: bool
    mode: str  # "forward" (no grad) or "forward+backward"
    seconds: float | None
    peak_mb: float | None
    error: str | None = None


def run_single(method: str, length: int, causal: bool, mode: str, min_run_time: float) -> Result:
    """Time one configuration in this process: median seconds over at least ``min_run_time`` seconds of runs (after
    a warm-up), and peak memory as the growth of max RSS."""
    from .methods import HIDDEN, build, build_model

    torch.manual_seed(0)
    if method.startswith("model:"):  # model:<name>:<variant>
        _, name, variant = method.split(":")
        layer = build_model(name, variant, length)
        x = torch.randint(1000, 2000, (1, length))
    else:
        layer = build(method, length, causal)
        x = torch.randn(1, length, HIDDEN, requires_grad=mode != "forward")
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step():
        if mode == "forward":
            with torch.no_grad():
                layer(x)
        else:
            layer(x).sum().backward()

    seconds = median_seconds(step, min_run_time)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline
    return Result(method, length, causal, mode, seconds, peak_kib / 1024)


def matmul_gflops(size: int = 2048, min_run_time: float = 1.0) -> float:
    """This machine's fp32 matmul throughput (GFLOP/s) with the current thread count."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / median_seconds(lambda: a @ b, min_run_time) / 1e9


def time_forward_backward(layer: torch.nn.Module, length: int, min_run_time: float = 3.0, batch: int = 1) -> float:
    """Median seconds of one forward+backward of ``layer`` on random [batch, length, hidden] input, after a warm-up."""
    hidden = layer.self.query.in_features
    x = torch.randn(batch, length, hidden, requires_grad=True)
    return median_seconds(lambda: layer(x)[0].sum().backward(), min_run_time)
