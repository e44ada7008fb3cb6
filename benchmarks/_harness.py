"""Shared measuring for the benchmark scripts: wall time and peak memory of a call, each call in
a fresh process so that one measurement's memory does not hide in another's peak; and the
baseline every speed ratio is taken against, the empirical NTK by ``torch.func`` as users
write it."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import resource
import statistics
import time
import warnings
from collections.abc import Callable

JACOBIAN_GIB = "ENTK_BENCH_JACOBIAN_GIB"  # the baseline's Jacobians, GiB, for fresh processes


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


def torch_func(model, x, output_fn=None, max_bytes=None):
    """The trace eNTK by ``torch.func`` as users write it: ``vmap(jacrev(...))`` over the
    points (a loop of ``jacrev`` where ``vmap`` cannot run the model), ``J J^T``. Returns
    ``(kernel, lower_bound)``: with ``lower_bound`` the Jacobians did not fit ``max_bytes`` and
    only the diagonal blocks of chunks of points were contracted (the rest is left zero).

    ``x`` is a tensor of points or a dict of them (keyword arguments of the model); the
    outputs are ``output_fn(model(...))``, else the model's ``.logits``, else what it returns.
    """
    import torch
    from torch.func import functional_call, jacrev, vmap
    from torch.utils._pytree import tree_flatten, tree_map

    max_bytes = max_bytes or int(float(os.environ.get(JACOBIAN_GIB, 3)) * 2**30)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def f(p, xi):
        one = tree_map(lambda t: t[None], xi)
        args, kwargs = ((), one) if isinstance(one, dict) else ((one,), {})
        raw = functional_call(model, (p, buffers), args, kwargs)
        out = output_fn(raw) if output_fn is not None else getattr(raw, "logits", raw)
        return out[0]

    leaves = tree_flatten(x)[0]
    n = leaves[0].shape[0]
    c = f(params, tree_map(lambda t: t[0], x)).shape[0]
    size = sum(p.numel() for p in params.values())
    per_point = c * size * 4
    chunk = max(1, min(n, max_bytes // per_point))

    def jacobians(lo, hi):
        part = tree_map(lambda t: t[lo:hi], x)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore")
            try:
                jac = vmap(jacrev(f), in_dims=(None, 0))(params, part)
            except RuntimeError:  # data-dependent code vmap cannot run: one point at a time
                rows = [jacrev(f)(params, tree_map(lambda t, i=i: t[i], part))
                        for i in range(hi - lo)]  # fmt: skip
                jac = {k: torch.stack([r[k] for r in rows]) for k in params}
        return torch.cat([jac[k].reshape(hi - lo, -1) for k in params], dim=1)

    kernel = torch.zeros(n, n)
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        j = jacobians(lo, hi)
        kernel[lo:hi, lo:hi] = j @ j.T
        del j
    return kernel, chunk < n
