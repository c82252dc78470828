"""``time_median`` on CUDA, on the CPU: torch.cuda's device guard, synchronize and events replaced by fakes that
remember which device was current when they ran."""
import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

from fastdit.bench.timing import NOISE_SPREAD, noise_warnings, spread, time_median


class FakeCuda:
    """The current CUDA device (0 at start) and the fakes that read it."""

    def __init__(self, monkeypatch):
        self.current, self.recorded = 0, []
        cuda = self

        @contextlib.contextmanager
        def device(device):
            previous, cuda.current = cuda.current, torch.device(device).index
            try:
                yield
            finally:
                cuda.current = previous

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing

            def record(self):
                cuda.recorded.append(cuda.current)

            def synchronize(self):
                pass

            def elapsed_time(self, end):
                return 2.0  # milliseconds

        monkeypatch.setattr(torch.cuda, "device", device)
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)


def test_cuda_timing_runs_and_records_on_the_given_device(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    calls = []
    seconds = time_median(lambda: calls.append(cuda.current), "cuda:1", repeats=3, warmup=2)
    assert seconds == pytest.approx(2e-3)
    assert calls == [1] * 5  # warm-up and timed calls launch on cuda:1
    assert cuda.recorded == [1] * 6  # a start and an end event per timed call
    assert cuda.current == 0  # the caller's device is current again


def test_noisy_measurements_and_a_loaded_machine_are_flagged():
    assert spread([2.0, 1.0, 4.0]) == 4.0
    quiet = noise_warnings({"a": 1.2, "b": NOISE_SPREAD}, load_average=1.5, cores=2)
    assert quiet == []
    lines = noise_warnings({"a": 1.2, "b": 3.5}, load_average=2.5, cores=2)
    assert lines == ["b: the slowest run took 3.5x the fastest (over 3x): noisy",
                     "the load average is 2.5 on 2 cores: other work shares the machine, and every timing is noisy"]


def test_benchmark_tables_fit_120_columns_and_say_when_they_are_noisy(tmp_path):
    """``pytest benchmarks/ --benchmark-only`` as a user runs it, on one small group."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/kernels/test_modulate.py", "--benchmark-only",
                             "-k", "eager", "--benchmark-max-time=0.001", "--benchmark-min-rounds=2",
                             "--benchmark-json", str(tmp_path / "all.json"), "-p", "no:cacheprovider"],
                            cwd=root, capture_output=True, text=True, timeout=600,
                            # as a user runs it: not as an xdist worker (pytest-benchmark turns itself off in one)
                            env={key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Every line but the session header (pytest-benchmark's settings, and the platform's).
    start = result.stdout.index("collected")
    lines = result.stdout[start:].splitlines()
    assert any(line.startswith("Name (time in") for line in lines), result.stdout
    assert max(map(len, lines)) <= 120, max(lines, key=len)
    # The columns the table leaves out are in the JSON.
    stats = json.loads((tmp_path / "all.json").read_text())["benchmarks"][0]["stats"]
    assert {"max", "mean", "stddev", "iqr"} <= set(stats)
    noisy = noise_warnings({"": max(b["stats"]["max"] / b["stats"]["min"] for b in
                                    json.loads((tmp_path / "all.json").read_text())["benchmarks"])})
    assert bool(noisy) == ("warning: " in result.stdout), result.stdout[-2000:]
