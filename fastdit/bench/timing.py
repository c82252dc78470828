"""Timing a piece of work on a device: what `fastdit bench` and `fastdit demo` report."""
import contextlib
import os
import statistics
import time

import torch

# A measurement whose slowest timed run took more than NOISE_SPREAD times its fastest is flagged as noisy, as is
# every measurement taken while the 1-minute load average exceeds the core count: the median then also
# measures the machine's other work.
NOISE_SPREAD = 3.0


def time_median(fn, device, repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of one ``fn()`` over ``repeats`` timed calls, after ``warmup`` untimed ones
    (compilation, autotuning, allocator). On CUDA, events around each call time the GPU's work."""
    return statistics.median(time_runs(fn, device, repeats, warmup))


def spread(times) -> float:
    """Slowest over fastest timed run."""
    return max(times) / min(times) if min(times) > 0 else float("inf")


def noise_warnings(spreads: dict, load_average: float | None = None, cores: int | None = None) -> list[str]:
    """One line for each measurement (name -> ``spread``) over NOISE_SPREAD, and one if the 1-minute load average
    (default: now) exceeds the cores (default: this machine's)."""
    lines = [f"{name}: the slowest run took {value:.1f}x the fastest (over {NOISE_SPREAD:g}x): noisy"
             for name, value in spreads.items() if value > NOISE_SPREAD]
    load_average = os.getloadavg()[0] if load_average is None else load_average
    cores = (os.cpu_count() or 1) if cores is None else cores
    if load_average > cores:
        lines.append(f"the load average is {load_average:.1f} on {cores} cores: other work shares the machine, and "
                     "every timing is noisy")
    return lines


def time_runs(fn, device, repeats: int = 5, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` timed ``fn()`` calls, after ``warmup`` untimed ones (compilation,
    autotuning, allocator). On CUDA, events around each call time the GPU's work."""
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
    return times
