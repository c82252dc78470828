"""``time_median`` on CUDA, on the CPU: torch.cuda's device guard, synchronize and events replaced by fakes that
remember which device was current when they ran."""
import contextlib

import pytest
import torch

from fastdit.bench.timing import time_median


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
