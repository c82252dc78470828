"""Timing a piece of work on a device: what `fastdit bench` and `fastdit demo` report."""
import contextlib
import statistics
import time

import torch


def time_median(fn, device, repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of one ``fn()`` over ``repeats`` timed calls, after ``warmup`` untimed ones
    (compilation, autotuning, allocator). On CUDA, events around each call time the GPU's work."""
    device = torch.device(device)
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats: expected >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    # Events record on the current device's stream and Triton launches on the current device, whatever
    # device the tensors are on: make ``device`` current, or "cuda:1" would time GPU 0.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        for _ in range(warmup):
            fn()
        times = []
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
        else:
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
    return statistics.median(times)
