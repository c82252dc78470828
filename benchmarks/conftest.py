"""pytest-benchmark suite of fastdit: run ``pytest benchmarks/ --benchmark-only`` from the repository root.

One group per operation, one row per implementation (``reference-...`` the baselines,
``fastdit-...``, ``sdpa-...``). Sizes follow the device: DiT's real shapes on a CUDA GPU, tiny
ones on the CPU, where the fused ops take their torch path unless ``TRITON_INTERPRET=1`` (each
group's name and extra_info say which path ran). Every benchmark checks its output against the
reference first; the timed function synchronises the device; warm-up (and compiling) happens
before timing. torch.compile rows are skipped on the CPU unless ``--compile-on-cpu``.
"""
import os
import sys
import textwrap
import time

import pytest
import torch

# Appended, not prepended: tests/ holds files named like the benchmarks (test_model.py).
sys.path.append(os.path.join(os.path.dirname(__file__), os.pardir, "tests"))  # tests/parity.py, the tolerances

from harness import (  # noqa: E402
    DEVICE,
    DTYPE,
    KERNEL_PATH,
    ON_GPU,
    ModelCase,
    check_outputs,
    op_implementation,
    op_tolerance,
    synchronize,
)

from fastdit.bench.timing import noise_warnings  # noqa: E402
from fastdit.bench.workloads import (  # noqa: E402
    WORKLOAD_BUILDERS,
    check_parity,
    dtype_name,
    implementation_dtype,
    true_fp32,
    unavailable_reason,
)
from fastdit.models.flops import named_shape, workload_flops  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _true_fp32():
    with true_fp32():
        yield


def pytest_addoption(parser):
    parser.addoption("--compile-on-cpu", action="store_true",
                     help="also time the torch.compile rows on the CPU (compiling takes minutes there)")


def pytest_report_header(config):
    return f"fastdit benchmarks on {DEVICE} ({dtype_name(DTYPE)}), fused ops: {KERNEL_PATH}"


SPREADS = {}  # "group: row" -> slowest / fastest round, for the noise warning


@pytest.hookimpl(hookwrapper=True)
def pytest_benchmark_group_stats(config, benchmarks, group_by):
    """Notes each row's spread as pytest-benchmark groups the rows (flat dicts of their statistics) for its table."""
    yield
    for bench in benchmarks:
        if bench["source"] != "NOW" and bench["min"] > 0:  # this run's rows, not --benchmark-compare's
            SPREADS[f"{bench['group']}: {bench['name']}"] = bench["max"] / bench["min"]


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables
def pytest_terminal_summary(terminalreporter):
    for line in noise_warnings(SPREADS) if SPREADS else ():
        # Within the tables' 120 columns: a row's name and its group's are long.
        for part in textwrap.wrap(f"warning: {line}", width=120, subsequent_indent="  "):
            terminalreporter.write_line(part, yellow=True)


@pytest.fixture
def skip_unless_available(request):
    """``skip_unless_available(implementation, workload=None)``: skip what does not run here."""

    def check(implementation, workload=None):
        reason = unavailable_reason(implementation, DEVICE, workload, request.config.getoption("--compile-on-cpu"))
        if reason is not None:
            pytest.skip(reason)

    return check


def synchronized_perf_counter() -> float:
    synchronize()
    return time.perf_counter()


@pytest.fixture
def measure(benchmark, request):
    """``measure(fn, group, rounds=None, flops=None, bytes_moved=None, images=None, **info)``: warm fn up, time it
    with the device synchronised inside, and record FLOPs, bytes, images and their rates in extra_info.
    ``rounds``: a fixed number of rounds (for long steps); default: pytest-benchmark calibrates."""

    def run(fn, group, rounds=None, flops=None, bytes_moved=None, images=None, **info):
        for _ in range(2):  # compiling, autotuning, CUDA-graph recording, the allocator
            fn()
        synchronize()
        # pytest-benchmark times a round (its calibrated loop of calls, or one long step) between
        # two timer calls. A timer that synchronises the device makes that the GPU's time for the
        # whole loop, with one sync per round rather than per call: a sync per call would time the
        # host's launch overhead of microsecond kernels, not the kernels.
        if not hasattr(benchmark, "_timer"):
            raise RuntimeError("pytest-benchmark no longer has the _timer attribute that the GPU timing replaces")
        benchmark._timer = synchronized_perf_counter
        benchmark.group = group
        # The row's parameters (implementation, dtype): its group already names the operation and the shape.
        benchmark.name = request.node.callspec.id if hasattr(request.node, "callspec") else request.node.name
        benchmark.extra_info.update(device=torch.cuda.get_device_name() if ON_GPU else "cpu", fused_ops=KERNEL_PATH,
                                    **info)
        if rounds is None:
            benchmark(fn)
        else:
            benchmark.pedantic(fn, rounds=rounds, warmup_rounds=0, iterations=1)
        if benchmark.stats is None:  # --benchmark-disable: ran once, untimed
            return
        seconds = benchmark.stats.stats.median
        for name, amount, unit, scale in (("flops", flops, "TFLOP/s", 1e12), ("bytes", bytes_moved, "GB/s", 1e9),
                                          ("images", images, "images/s", 1)):
            if amount is not None:
                benchmark.extra_info[name] = amount
                benchmark.extra_info[unit] = amount / seconds / scale

    return run


@pytest.fixture
def benchmark_op(measure, skip_unless_available):
    """``benchmark_op(implementation, reference_op, fastdit_op, inputs, expected, group, flops=None,
    elements_moved=None)``: run ``implementation`` of one op on ``inputs``, check it against
    ``expected`` (the op's fp32 torch reference), then time it. ``elements_moved``: elements read
    and written at the least (bytes follow from the implementation's dtype)."""

    def run(implementation, reference_op, fastdit_op, inputs, expected, group, flops=None, elements_moved=None):
        skip_unless_available(implementation)
        fn, dtype = op_implementation(implementation, reference_op, fastdit_op, inputs)
        error = check_outputs(fn(), expected, op_tolerance(implementation, dtype), implementation)
        bytes_moved = None if elements_moved is None else elements_moved * dtype.itemsize
        measure(fn, group, flops=flops, bytes_moved=bytes_moved, dtype=dtype_name(dtype), max_error=error)

    return run


@pytest.fixture(scope="module")
def model_case(request):
    """A ModelCase, indirectly parametrized with (model name, image size, batch); one per module."""
    case = ModelCase(*request.param)
    yield case
    case.close()
    torch._dynamo.reset()  # its compiled graphs, too: and the next models compile afresh, under no recompile limit
    if ON_GPU:
        torch.cuda.empty_cache()


@pytest.fixture
def benchmark_workload(measure, skip_unless_available):
    """``benchmark_workload(case, workload, implementation, rounds)``: check one workload of
    ``fastdit.bench.workloads`` against the reference, then time its step."""

    def run(case, workload, implementation, rounds):
        skip_unless_available(implementation, workload)
        dtype = implementation_dtype(implementation, DTYPE)
        work = WORKLOAD_BUILDERS[workload](case.models, implementation, case.inputs)
        error = check_parity(work.output(), case.expected(workload), dtype, f"{implementation} {workload}")
        shape = named_shape(case.name, case.image_size // 8)
        measure(work.step, case.group(workload), rounds=rounds, flops=workload_flops(shape, workload) * work.images,
                images=work.images, dtype=dtype_name(dtype), max_error=error)

    return run
