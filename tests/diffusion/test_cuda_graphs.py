"""The CUDA-graph runner (``fastdit.diffusion.cuda_graphs``) on the CPU, with torch.cuda's device guard, streams
and graphs faked: the loop over static buffers equals the eager loop, a step is captured once per key, on the
tensors' device, and a failed capture is remembered and leaves the stream as it was. On a GPU the real capture is
checked by tests/diffusion/test_sampling.py's CUDA tests."""
import contextlib
import functools

import pytest
import torch
from test_gaussian import tiny_dit

from fastdit.diffusion import cuda_graphs
from fastdit.diffusion.denoising import GuidedDenoiser, ImageNoise, run_eager
from fastdit.diffusion.samplers import make_solver


class FakeCapture:
    """The CUDA-graph loop on the CPU: torch.cuda's device guard is replaced by one that remembers the current
    device, and "capture" returns the step function itself, so each replay runs it on the static buffers.
    ``devices`` lists the device current at each warm-up, capture and replay."""

    def __init__(self, monkeypatch):
        self.current, self.devices, self.captures, self.warm_ups = None, [], 0, 0
        fake = self

        @contextlib.contextmanager
        def device(device):
            previous, fake.current = fake.current, torch.device(device)
            try:
                yield
            finally:
                fake.current = previous

        def warm_up(fn, device):
            fake.warm_ups += 1
            fake.devices.append(("warm-up", fake.current))
            fn()

        def capture(fn, device):
            fake.captures += 1
            fake.devices.append(("capture", fake.current))

            def replay():
                fake.devices.append(("replay", fake.current))
                fn()

            return replay

        monkeypatch.setattr(torch.cuda, "device", device)
        monkeypatch.setattr(cuda_graphs, "warm_up", warm_up)
        monkeypatch.setattr(cuda_graphs, "capture", capture)


def _graph_and_eager(model, labels, sampler, steps, eta, cfg_scale, seed):
    denoiser = GuidedDenoiser(model, torch.tensor(labels), model.num_classes, cfg_scale, 3, 4, torch.float32)
    solver = make_solver(sampler, steps, eta)
    runs = []
    for run in (functools.partial(cuda_graphs.run_cuda_graph, model), run_eager):
        noise = ImageNoise(seed, 0, len(labels), (4, 8, 8))
        with torch.no_grad():
            runs.append(run(denoiser, solver, noise, noise.next(), iter))
    return runs


@pytest.mark.parametrize("sampler, steps, eta", [("ddpm", 8, 0.0), ("ddim", 6, 0.5), ("dpm++", 7, 0.0)])
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_graph_loop_on_static_buffers_equals_eager(sampler, steps, eta, cfg_scale, monkeypatch):
    """The CUDA-graph loop's bookkeeping (step 0 as warm-up, per-step loads into static buffers, state copies)."""
    FakeCapture(monkeypatch)
    graphed, eager = _graph_and_eager(tiny_dit(), [4, 0, 2], sampler, steps, eta, cfg_scale, 8)
    assert torch.equal(graphed, eager)


def test_a_step_is_captured_once_per_shape_and_settings(monkeypatch):
    """Capture synchronises and allocates: batches of one shape and settings share one captured step, and each
    call still samples its own labels, noise and number of steps."""
    fake, model = FakeCapture(monkeypatch), tiny_dit()
    calls = [([4, 0, 2], "dpm++", 7, 3.0, 8), ([1, 1, 9], "dpm++", 7, 3.0, 9), ([5, 6, 7], "dpm++", 4, 3.0, 8)]
    for call in calls:
        graphed, eager = _graph_and_eager(model, *call[:2], call[2], 0.0, *call[3:])
        assert torch.equal(graphed, eager), call
    assert fake.captures == fake.warm_ups == 1
    for labels, sampler, steps, cfg_scale in (([4, 0], "dpm++", 7, 3.0), ([4, 0, 2], "ddim", 7, 3.0),
                                              ([4, 0, 2], "dpm++", 7, 1.0)):
        graphed, eager = _graph_and_eager(model, labels, sampler, steps, 0.0, cfg_scale, 8)
        assert torch.equal(graphed, eager), (labels, sampler, cfg_scale)
    assert fake.captures == 4  # a new batch size, solver or guidance scale is a new step
    with torch.no_grad():
        model.pos_embed = torch.nn.Parameter(model.pos_embed.clone(), requires_grad=False)
    _graph_and_eager(model, [4, 0, 2], "dpm++", 7, 0.0, 3.0, 8)
    assert fake.captures == 5  # weights at a new address: the old step would read freed memory


def test_the_graph_loop_runs_on_the_tensors_device(monkeypatch):
    """Capture and replay use the current device: a model on cuda:1 must not record on GPU 0's stream."""
    fake = FakeCapture(monkeypatch)
    _graph_and_eager(tiny_dit(), [4, 0], "ddim", 5, 0.0, 1.0, 8)
    cpu = torch.device("cpu")  # the tensors' device here
    assert fake.devices == [("warm-up", cpu), ("capture", cpu)] + [("replay", cpu)] * 4
    assert fake.current is None  # the caller's device is current again


def test_a_failed_capture_is_remembered(monkeypatch):
    fake = FakeCapture(monkeypatch)

    def capture(fn, device):
        raise cuda_graphs.GraphCaptureError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graphs, "capture", capture)
    for _ in range(2):
        with pytest.raises(cuda_graphs.GraphCaptureError, match="operation not permitted"):
            _graph_and_eager(tiny_dit(), [4, 0], "ddim", 5, 0.0, 1.0, 8)
    model = tiny_dit()
    for _ in range(2):
        with pytest.raises(cuda_graphs.GraphCaptureError, match="operation not permitted"):
            _graph_and_eager(model, [4, 0], "ddim", 5, 0.0, 1.0, 8)
    assert fake.warm_ups == 3  # the second try on the same model and shape fails at once


class FakeStreams:
    """torch.cuda's streams and graphs on the CPU: ``current`` is this thread's stream; a capture that the
    captured function breaks makes ``capture_end`` raise, as CUDA invalidates such a capture."""

    def __init__(self, monkeypatch):
        fake = self

        class Stream:
            def __init__(self, device=None):
                pass

            def wait_stream(self, other):
                pass

        self.default = Stream()
        self.current, self.broken = self.default, False

        @contextlib.contextmanager
        def stream(stream):
            previous, fake.current = fake.current, stream
            try:
                yield
            finally:
                fake.current = previous

        class CUDAGraph:
            def capture_begin(self, *args, **kwargs):
                fake.captured_on = fake.current

            def capture_end(self):
                if fake.broken:
                    raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

            def replay(self):
                pass

        for name, value in (("Stream", Stream), ("stream", stream), ("CUDAGraph", CUDAGraph),
                            ("current_stream", lambda device=None: fake.current),
                            ("synchronize", lambda device=None: None), ("empty_cache", lambda: None)):
            monkeypatch.setattr(torch.cuda, name, value)
        monkeypatch.setattr(torch._C, "_host_emptyCache", lambda: None, raising=False)  # torch.cuda.graph calls it


def test_a_failed_capture_restores_the_stream_and_reports_its_cause(monkeypatch):
    streams = FakeStreams(monkeypatch)

    def uncapturable():
        streams.broken = True
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")

    with pytest.raises(cuda_graphs.GraphCaptureError) as info:
        cuda_graphs.capture(uncapturable, torch.device("cuda", 0))
    assert str(info.value) == "CUDA error: operation not permitted when stream is capturing"
    assert "not permitted" in str(info.value.__cause__)
    assert streams.current is streams.default
    streams.broken = False
    assert callable(cuda_graphs.capture(lambda: None, torch.device("cuda", 0)))
    assert streams.captured_on is not streams.default and streams.current is streams.default
