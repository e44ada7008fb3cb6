"""Shared measuring for the benchmark scripts: wall time and peak memory of a call, each call in
a fresh process so that one measurement's memory does not hide in another's peak."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import resource
import statistics
import time
from collections.abc import Callable


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _run(setup: Callable, call: Callable, repeats: int, warmup: int) -> dict:
    import torch

    inputs = setup()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    baseline = _resident_bytes()
    result, seconds = None, []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        result = call(*inputs)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return {
        "seconds": statistics.median(seconds),
        "peak_mib": max(peak, 0) / 2**20,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "result": result,
    }


def measure(setup: Callable, call: Callable, repeats: int = 3, warmup: int = 1) -> dict:
    """Median wall time of ``call(*setup())`` over ``repeats`` after ``warmup`` calls, and the
    peak resident memory it added above what ``setup`` left (MiB), in a fresh process.

    ``setup`` and ``call`` must be module-level functions (they are sent to the process).
    """
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_run, setup, call, repeats, warmup).result()


def relative_error(actual, expected) -> float:
    import torch

    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    return float(torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected))
