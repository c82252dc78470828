"""tuning.choose's logic with a fake launch and fake GPU state, and the CPU side of
``python -m fastdit.tools.tune`` (arguments, the no-GPU message, the report)."""
import json
import types

import pytest
import torch
import triton.testing

from fastdit.kernels import runtime, tuning

CUDA = torch.device("cuda", 0)
SPEC = runtime.GPUSpec("Fake GPU", (9, 0), 100_000, 132)
CANDIDATES = [{"BLOCK": 64, "num_warps": 4}, {"BLOCK": 128, "num_warps": 8}, {"BLOCK": 32, "num_warps": 4},
              {"BLOCK": 256, "num_warps": 8}, {"BLOCK": 16, "num_warps": 2}]
# What each candidate compiles to (spill bytes, shared memory) and how long it runs (ms).
COMPILED = {64: (0, 40_000), 128: (0, 80_000), 32: (0, 20_000), 256: (0, 200_000), 16: (24, 10_000)}
TIMES = {64: 3.0, 128: 1.0, 32: 2.0, 256: 0.1, 16: 0.1}
LAST = []


class FakeKernel:
    """A launch function: records the blocks it ran, in order, here and in LAST (for do_bench)."""

    def __init__(self):
        self.launched = []

    def __call__(self, config):
        self.launched.append(config["BLOCK"])
        LAST[:] = [config["BLOCK"]]
        spills, shared = COMPILED[config["BLOCK"]]
        return types.SimpleNamespace(n_spills=spills, metadata=types.SimpleNamespace(shared=shared))


@pytest.fixture
def gpu(monkeypatch):
    """A compiled-kernel world on the CPU: tuning on, a fake GPU, no capture, do_bench timing the fake."""
    monkeypatch.setattr(tuning, "TRITON_INTERPRET", False)
    monkeypatch.delenv("FASTDIT_AUTOTUNE", raising=False)
    monkeypatch.delenv("FASTDIT_TUNING_CACHE", raising=False)
    monkeypatch.setattr(tuning, "gpu_spec", lambda device: SPEC)
    monkeypatch.setattr(tuning, "_chosen", {})
    monkeypatch.setattr(tuning, "_report", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    timed = []

    def do_bench(fn, **kwargs):
        fn()
        timed.append(LAST[0])
        return TIMES[LAST[0]]

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    return timed


def test_interpreted_launches_the_default_only(monkeypatch):
    monkeypatch.setattr(tuning, "TRITON_INTERPRET", True)
    kernel = FakeKernel()
    assert tuning.choose("op", ("k",), CANDIDATES, kernel, CUDA) == CANDIDATES[0]
    assert kernel.launched == [64]


def test_autotune_off_launches_the_default_only(gpu, monkeypatch):
    monkeypatch.setenv("FASTDIT_AUTOTUNE", "0")
    kernel = FakeKernel()
    assert tuning.choose("op", ("k",), CANDIDATES, kernel, CUDA) == CANDIDATES[0]
    assert kernel.launched == [64] and not gpu


def test_tuning_prunes_spills_and_oversized_shared_memory_and_keeps_the_fastest(gpu):
    kernel = FakeKernel()
    chosen = tuning.choose("op", ("k",), CANDIDATES, kernel, CUDA)
    # 256 (200 KB of shared memory) and 16 (24 B of spills) are faster but pruned.
    assert chosen == {"BLOCK": 128, "num_warps": 8}
    # Each once to compile and check, those that pass once more timed, then the chosen one.
    assert kernel.launched == [64, 64, 128, 128, 32, 32, 256, 16, 128]
    assert gpu == [64, 128, 32]
    (entry,) = tuning.report().values()
    pruned = {result["config"]["BLOCK"]: result["pruned"] for result in entry["candidates"] if "pruned" in result}
    assert pruned == {256: "0 spills, 200000 B shared memory", 16: "24 spills, 10000 B shared memory"}
    assert {result["config"]["BLOCK"]: result["ms"] for result in entry["candidates"] if "ms" in result} == {
        64: 3.0, 128: 1.0, 32: 2.0}


def test_a_candidate_that_fails_to_launch_is_pruned(gpu):
    def launch(config):
        if config["BLOCK"] == 128:
            raise RuntimeError("out of resources: shared memory\nmore detail")
        return FakeKernel()(config)

    assert tuning.choose("op", ("k",), CANDIDATES, launch, CUDA) == {"BLOCK": 32, "num_warps": 4}
    (entry,) = tuning.report().values()
    assert {"config": CANDIDATES[1], "pruned": "RuntimeError: out of resources: shared memory"} in entry["candidates"]


def test_a_tuned_key_is_not_timed_again(gpu):
    tuning.choose("op", ("k",), CANDIDATES, FakeKernel(), CUDA)
    timed = len(gpu)
    kernel = FakeKernel()
    assert tuning.choose("op", ("k",), CANDIDATES, kernel, CUDA) == {"BLOCK": 128, "num_warps": 8}
    assert kernel.launched == [128] and len(gpu) == timed
    # Another shape class is tuned on its own.
    tuning.choose("op", ("other",), CANDIDATES, FakeKernel(), CUDA)
    assert len(tuning.report()) == 2


def test_nothing_is_timed_while_capturing(gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    kernel = FakeKernel()
    assert tuning.choose("op", ("k",), CANDIDATES, kernel, CUDA) == CANDIDATES[0]
    assert kernel.launched == [64] and not gpu and not tuning.report()
    # Outside the capture the key is tuned: the default was not remembered as a choice.
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert tuning.choose("op", ("k",), CANDIDATES, FakeKernel(), CUDA) == {"BLOCK": 128, "num_warps": 8}


def test_choices_persist_in_the_cache_file(gpu, monkeypatch, tmp_path):
    cache = tmp_path / "tuning.json"
    monkeypatch.setenv("FASTDIT_TUNING_CACHE", str(cache))
    tuning.choose("op", ("k",), CANDIDATES, FakeKernel(), CUDA)
    stored = json.loads(cache.read_text())
    assert [entry["chosen"] for entry in stored.values()] == [{"BLOCK": 128, "num_warps": 8}]
    # A new process (fresh in-memory state) reads the choice instead of timing again.
    monkeypatch.setattr(tuning, "_chosen", {})
    timed = len(gpu)
    kernel = FakeKernel()
    assert tuning.choose("op", ("k",), CANDIDATES, kernel, CUDA) == {"BLOCK": 128, "num_warps": 8}
    assert kernel.launched == [128] and len(gpu) == timed
    assert not list(tmp_path.glob("*.tmp"))


def test_simulate_launches_every_candidate_with_the_default_last(monkeypatch):
    monkeypatch.setattr(tuning, "TRITON_INTERPRET", False)
    seen = []

    def launch(config):
        seen.append((config["BLOCK"], tuning.current_candidate()))

    with runtime.simulate(runtime.TARGETS[80]):
        assert tuning.choose("op", ("k",), CANDIDATES[:3], launch, torch.device("meta")) == CANDIDATES[0]
    assert seen == [(32, ("op", 2, False)), (128, ("op", 1, False)), (64, ("op", 0, True))]
    assert tuning.current_candidate() is None


def test_no_candidates_is_an_error():
    with pytest.raises(ValueError, match="op: no candidate launch configurations"):
        tuning.choose("op", ("k",), [], FakeKernel(), CUDA)
