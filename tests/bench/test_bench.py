"""`fastdit bench` on the CPU with a tiny model: checks before timing, the report and its files."""
import argparse
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from parity import MODEL_TOLERANCE

import fastdit

from fastdit.bench import workloads as bench_workloads
from fastdit.bench.report import datasheet_tflops
from fastdit.bench.timing import time_median
from fastdit.cli import bench
from fastdit.models import DTYPES

TINY = ["--models", "DiT-S/8", "--image-size", "64", "--batch-sizes", "1", "--repeats", "1", "--warmup", "0",
        "--no-progress"]


def run_bench(out, *arguments):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return bench.run(parser.parse_args(["--out", str(out), *arguments]))


def figures(value):
    """Every {"value", "unit"} figure in a report, wherever it sits."""
    if isinstance(value, dict):
        if "value" in value:
            yield value
        for item in value.values():
            yield from figures(item)
    elif isinstance(value, list):
        for item in value:
            yield from figures(item)


def test_cpu_run_writes_the_three_reports(tmp_path):
    out = tmp_path / "report"
    assert run_bench(out, *TINY, "--device", "cpu") == 0
    # No temporaries left; the marker of a bench run's folder
    assert sorted(os.listdir(out)) == [".fastdit-run.json", "report.json", "report.md", "throughput.png"]
    report = json.loads((out / "report.json").read_text())
    assert report["device"]["type"] == "cpu" and report["device"]["name"]
    assert report["device"]["torch"] == torch.__version__ and report["device"]["triton"]
    assert report["peak"]["gemm"]["unit"] == "TFLOP/s" and report["peak"]["gemm"]["value"] > 0
    assert report["peak"]["copy_bandwidth"]["unit"] == "GB/s" and report["peak"]["copy_bandwidth"]["value"] > 0
    for figure in figures(report):
        assert figure.keys() >= {"value", "unit"} and figure["unit"], figure
    # On the CPU the default is every eager implementation, over every workload; FP8 is inference only.
    skipped = [r for r in report["results"] if r["status"] == "skipped"]
    assert [(r["workload"], r["implementation"]) for r in skipped] == [("training-step", "fastdit-fp8")], skipped
    results = [r for r in report["results"] if r["status"] != "skipped"]
    assert {(r["workload"], r["implementation"]) for r in results} == {
        (workload, implementation) for workload in bench_workloads.WORKLOADS
        for implementation in ("reference-eager-fp32", "reference-eager-bf16", "fastdit-eager", "reference-sdpa-fp32",
                               "reference-sdpa-bf16")} | {("forward", "fastdit-fp8"), ("sampling-step", "fastdit-fp8")}
    for result in results:
        assert result["status"] == "ok", result
        # FP8's error is reported, not bounded by the model tolerance; tests/models/test_fp8.py bounds it.
        bound = 0.15 if result["implementation"] == "fastdit-fp8" else MODEL_TOLERANCE[DTYPES[result["dtype"]]]
        assert result["max_error"]["value"] <= bound, result
        assert result["throughput"]["unit"] == "images/s" and result["throughput"]["value"] > 0
        assert result["achieved"]["value"] > 0 and 0 < result["mfu"]["value"]
        if result["implementation"] == bench_workloads.BASELINE:
            assert result["speedup"]["value"] == 1.0 and result["max_error"]["value"] == 0.0
    markdown = (out / "report.md").read_text()
    for heading in ("## forward", "## sampling-step", "## training-step", "| DiT-S/8 | 1 |", "fastdit-eager"):
        assert heading in markdown
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wrong_output_is_not_timed_and_fails_the_run(tmp_path, monkeypatch, capsys):
    """A deliberately wrong implementation (1% off) fails the check: reported, never timed."""
    correct = bench_workloads.WORKLOAD_BUILDERS["forward"]

    steps = []

    def one_percent_off(models, implementation, inputs):
        workload = correct(models, implementation, inputs)
        if implementation == "fastdit-eager":
            output = workload.output
            workload.output = lambda: {name: 1.01 * value for name, value in output().items()}
            workload.step = lambda: steps.append(1)
        return workload

    monkeypatch.setitem(bench_workloads.WORKLOAD_BUILDERS, "forward", one_percent_off)
    out = tmp_path / "report"
    assert run_bench(out, *TINY, "--workloads", "forward", "--implementations", "fastdit-eager") == 1
    failed = [r for r in json.loads((out / "report.json").read_text())["results"] if r["status"] != "ok"]
    assert [(r["implementation"], r["status"]) for r in failed] == [("fastdit-eager", "parity-failed")]
    assert "differs from the reference by 1.0" in failed[0]["reason"]
    assert not steps  # never timed
    assert "## Not measured" in (out / "report.md").read_text()
    assert "fastdit-eager: fastdit-eager forward: output differs" in capsys.readouterr().err


def test_unavailable_implementations_are_reported_as_skipped(tmp_path):
    out = tmp_path / "report"
    assert run_bench(out, *TINY, "--device", "cpu", "--workloads", "forward",
                     "--implementations", "fastdit-cudagraphs") == 0
    results = json.loads((out / "report.json").read_text())["results"]
    assert [(r["implementation"], r["status"]) for r in results] == [
        ("reference-eager-fp32", "ok"), ("fastdit-cudagraphs", "skipped")]
    assert results[1]["reason"] == "CUDA graphs need a CUDA device"


@pytest.mark.parametrize("arguments, message", [
    (["--image-size", "60"], "--image-size: expected a positive multiple of 8"),
    (["--models", "DiT-S/8", "--image-size", "32"], "--image-size 32 does not fit DiT-S/8: input_size"),
    (["--batch-sizes", "0"], "--batch-sizes: expected positive integers, got \\[0\\]"),
    (["--repeats", "0"], "--repeats: expected >= 1"),
])
def test_bad_arguments_name_the_option(tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        run_bench(tmp_path, "--device", "cpu", *arguments)


def test_a_folder_of_other_files_is_refused_before_measuring(tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("measured before --out was checked")

    monkeypatch.setattr(bench, "measure_gemm_tflops", no_work)
    (tmp_path / "report.md").write_text("my notes")
    (tmp_path / "thesis.tex").write_text("")
    with pytest.raises(ValueError, match=r"holds files that no `fastdit bench` run wrote \(report.md, thesis.tex\)"):
        run_bench(tmp_path, *TINY, "--device", "cpu")
    assert (tmp_path / "report.md").read_text() == "my notes"


def test_time_median_warms_up_then_takes_the_median():
    calls = []
    assert time_median(lambda: calls.append(1), "cpu", repeats=3, warmup=2) >= 0
    assert len(calls) == 5
    with pytest.raises(ValueError, match="repeats: expected >= 1"):
        time_median(lambda: None, "cpu", repeats=0)


def test_datasheet_peaks_by_device_name():
    assert datasheet_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert datasheet_tflops("NVIDIA H100 PCIe") == 756.0
    assert datasheet_tflops("NVIDIA H200") == 989.0
    assert datasheet_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert datasheet_tflops("NVIDIA H100 NVL") is None  # a variant the table does not state
    assert datasheet_tflops("NVIDIA GeForce RTX 4090") is None


def test_importing_fastdit_does_not_import_matplotlib(tmp_path):
    code = "import sys, fastdit, fastdit.cli.bench; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=tmp_path).returncode == 0  # the installed fastdit


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_run_with_cuda_graphs(tmp_path):
    out = tmp_path / "report"
    assert run_bench(out, "--device", "cuda", "--models", "DiT-S/2", "--image-size", "256", "--batch-sizes", "4",
                     "--repeats", "3", "--warmup", "1", "--no-progress", "--implementations", "reference-eager-bf16",
                     "fastdit-eager", "fastdit-cudagraphs") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["device"]["cuda"] and report["peak"]["gemm"]["dtype"] == "bf16"
    statuses = {(r["workload"], r["implementation"]): r["status"] for r in report["results"]}
    assert statuses.pop(("training-step", "fastdit-cudagraphs")) == "skipped"
    assert set(statuses.values()) == {"ok"}


def test_the_report_is_kept_after_each_measurement_and_a_resume_measures_only_the_rest(tmp_path, monkeypatch):
    """SIGTERM during the second measurement: report.json holds the first and says what was stopped, the exit
    status is 143; --resume then measures only what the report lacks, and keeps the rows it had as they were."""
    measured, measure = [], bench._measure

    def measure_then_stop(models, inputs, workload, implementation, *rest):
        measured.append((workload, implementation))
        if len(measured) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as a time limit's timeout would, mid-measurement
        return measure(models, inputs, workload, implementation, *rest)

    monkeypatch.setattr(bench, "_measure", measure_then_stop)
    rows = ["--workloads", "forward", "--implementations", "reference-eager-fp32", "fastdit-eager", "--no-plot",
            "--device", "cpu"]
    assert run_bench(tmp_path, *TINY, *rows) == 128 + signal.SIGTERM
    stopped = json.loads((tmp_path / "report.json").read_text())
    assert [r["implementation"] for r in stopped["results"]] == ["reference-eager-fp32"]
    assert stopped["stopped"] == {"signal": "SIGTERM", "during": "DiT-S/8 x1 forward fastdit-eager"}
    measured.clear()
    assert run_bench(tmp_path, *TINY, *rows, "--resume") == 0
    assert measured == [("forward", "fastdit-eager")]
    resumed = json.loads((tmp_path / "report.json").read_text())
    assert resumed["results"][0] == {**stopped["results"][0], "speedup": resumed["results"][0]["speedup"]}
    assert [r["implementation"] for r in resumed["results"]] == ["reference-eager-fp32", "fastdit-eager"]
    assert "stopped" not in resumed and resumed["peak"] == stopped["peak"]
    with pytest.raises(ValueError, match=r"--resume: .*report.json was measured with repeats=1, this run has repeats=2"):
        run_bench(tmp_path, *TINY, *rows, "--resume", "--repeats", "2")
