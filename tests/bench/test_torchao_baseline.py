"""The torchao FP8 baseline of `fastdit bench`: where it cannot run, the row says why instead of failing.
The row itself runs only on an sm_89+ GPU with torchao installed (the device run carries its wheel)."""
import importlib.util
import json

import pytest
import torch

from fastdit.bench import torchao_baseline, workloads
from test_bench import TINY, run_bench


def test_without_torchao_the_reason_says_how_to_install_it(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "torchao" else real_find_spec(name, *args))
    assert torchao_baseline.unavailable_reason(torch.device("cpu")) == (
        "torchao is not installed (pip install --no-deps torchao; fastdit does not depend on it)")


def test_with_torchao_on_the_cpu_the_reason_names_the_gpus_it_needs(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: object())
    assert torchao_baseline.unavailable_reason(torch.device("cpu")) == (
        "torchao's FP8 runs on CUDA GPUs of compute capability 8.9 or newer only")


def test_training_is_not_measured_whatever_is_installed():
    assert workloads.unavailable_reason("torchao-fp8", torch.device("cpu"), "training-step") == (
        "not measured: FP8 is an inference path")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skipped row on a machine without a GPU")
def test_bench_reports_the_row_as_skipped_with_its_reason(tmp_path):
    out = tmp_path / "report"
    assert run_bench(out, *TINY, "--device", "cpu", "--workloads", "forward", "--implementations", "torchao-fp8") == 0
    results = json.loads((out / "report.json").read_text())["results"]
    assert [(r["implementation"], r["status"]) for r in results] == [
        ("reference-eager-fp32", "ok"), ("torchao-fp8", "skipped")]
    assert results[1]["reason"] == torchao_baseline.unavailable_reason(torch.device("cpu"))
