"""benchmarks/device_check.sh on the CPU: its plan, its arguments, its refusal without a GPU, and the
report it writes from `fastdit bench` reports (run from a copy of the script, so the checkout is untouched)."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from fastdit.bench.workloads import IMPLEMENTATIONS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "device_check.sh")
PROG = "benchmarks/device_check.sh"


def run(*arguments, script=SCRIPT, env=None, timeout=120):
    environment = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    environment.pop("OUT", None)
    return subprocess.run(["bash", script, *arguments], capture_output=True, text=True, env=environment,
                          timeout=timeout)


def plan(result):
    """{step: (seconds or None when skipped, command)} from a dry run's output."""
    steps = {}
    for line in result.stdout.splitlines()[1:-1]:
        name, rest = line.split(None, 1)
        seconds = re.match(r"(\d+)s  (.*)", rest)
        steps[name] = (int(seconds[1]), seconds[2]) if seconds else (None, rest)
    return steps


def test_dry_run_prints_the_plan_within_8_minutes(tmp_path):
    result = run("--dry-run", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    steps = plan(result)
    assert list(steps) == ["install", "tests", "bench-256", "bench-512", "bench-256-compiled", "tuning", "aot",
                           "report", "roofline"]
    total = sum(seconds for seconds, _ in steps.values())
    assert result.stdout.splitlines()[-1] == f"total budget: {total}s" and total <= 470  # + the probe < 8 min
    out = str(tmp_path / "out")
    assert steps["install"][1].endswith("-m pip install --no-build-isolation --no-deps -q -e .")
    assert "--image-size 256 --batch-sizes 1 64" in steps["bench-256"][1]
    assert "--image-size 512 --batch-sizes 16" in steps["bench-512"][1]
    assert steps["tuning"][1].endswith(f"-m fastdit.tools.tune --json {out}/tuning.json")
    assert "-m fastdit.tools.aot --arch $ARCH" in steps["aot"][1] and f"--json {out}/kernels.json" in steps["aot"][1]
    assert "--bench-json docs/benchmarks/$GPU.json" in steps["roofline"][1]
    named = set()
    for name in ("bench-256", "bench-512", "bench-256-compiled"):
        command = steps[name][1]
        assert "--models DiT-XL/2" in command and f"--out {out}/bench/" in command
        named |= set(command.split("--implementations ")[1].split(" --")[0].split())
    # The baselines (reference-eager-fp32 always runs) and every fastdit implementation.
    assert named | {"reference-eager-fp32"} == set(IMPLEMENTATIONS)
    for path in steps["tests"][1].split(" -q ")[0].split()[3:]:
        assert os.path.exists(os.path.join(ROOT, path)), path


def test_quick_halves_the_budget_and_drops_the_compiled_baselines():
    full, quick = plan(run("--dry-run")), plan(run("--dry-run", "--quick"))
    assert quick["bench-256-compiled"] == (None, "skipped (--quick)")
    assert sum(s for s, _ in quick.values() if s) <= sum(s for s, _ in full.values()) * 0.6
    assert "--repeats 3" in quick["bench-256"][1] and "--repeats 5" in full["bench-256"][1]
    assert "$OUT/bench/256" in full["bench-256"][1]  # no --out: the device's $OUT


@pytest.mark.parametrize("arguments, message", [
    (["--bogus"], "unknown argument '--bogus' (expected --out DIR, --quick, --dry-run, --report-only)"),
    (["--out"], "--out: expected a directory after it"),
    ([], "--out: no directory given and $OUT is not set"),
    (["--out", "/tmp/a b", "--dry-run"], "--out: expected a path without spaces, got '/tmp/a b'"),
])
def test_bad_arguments_are_one_line_and_exit_2(arguments, message):
    result = run(*arguments)
    assert result.returncode == 2 and result.stderr == f"{PROG}: error: {message}\n", result.stderr
    assert result.stdout == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_one_line_and_nothing_written(tmp_path):
    result = run("--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"{PROG}: error: no CUDA device: torch ") and result.stderr.count("\n") == 1
    assert "--dry-run" in result.stderr and not (tmp_path / "out").exists()


def bench_report(image_size, batch, name="NVIDIA H100 80GB HBM3"):
    """A `fastdit bench` report.json as bench_report.build writes it, for a GPU run."""
    def result(implementation, seconds, dtype):
        return {"model": "DiT-XL/2", "image_size": image_size, "batch_size": batch, "workload": "forward",
                "implementation": implementation, "dtype": dtype, "kernel_path": "triton", "status": "ok",
                "max_error": {"value": 1e-3, "unit": "relative max error"},
                "time": {"value": seconds, "unit": "s per step (median)"},
                "throughput": {"value": batch / seconds, "unit": "images/s"},
                "achieved": {"value": 100.0, "unit": "TFLOP/s"}, "mfu": {"value": 0.1, "unit": "fraction"},
                "speedup": {"value": 99.0, "unit": "x reference-eager-fp32"}}

    return {"created": "2026-01-01T00:00:00+00:00", "command": f"fastdit bench --image-size {image_size}",
            "device": {"type": "cuda", "name": name, "kernel_path": "triton", "torch": "2.13.0", "triton": "3.9.0"},
            "settings": {"device": "cuda", "dtype": "bf16", "image_size": image_size, "batch_sizes": [batch],
                         "repeats": 5, "warmup": 1},
            "peak": {"gemm": {"value": 700.0, "unit": "TFLOP/s", "dtype": "bf16", "shape": [8192] * 3},
                     "copy_bandwidth": {"value": 4000.0, "unit": "GB/s"}, "datasheet": None},
            "results": [result("reference-eager-fp32", 1.0, "fp32"), result("fastdit-cudagraphs", 0.1, "bf16")]}


@pytest.fixture
def checkout(tmp_path):
    """A copy of the script in an otherwise empty tree: the report lands in tmp_path/docs."""
    os.makedirs(tmp_path / "benchmarks")
    shutil.copy(SCRIPT, tmp_path / "benchmarks")
    return tmp_path


def test_report_only_merges_the_bench_reports(checkout):
    out = checkout / "out"
    for directory, size, batch in (("256", 256, 64), ("512", 512, 16)):
        os.makedirs(out / "bench" / directory)
        (out / "bench" / directory / "report.json").write_text(json.dumps(bench_report(size, batch)))
    result = run("--report-only", "--out", str(out), script=str(checkout / "benchmarks" / "device_check.sh"),
                 env={"BUDGET_SCALE": "10"})
    assert result.returncode == 0, result.stdout + result.stderr
    slug = "nvidia-h100-80gb-hbm3"
    for suffix in ("json", "md", "png"):
        assert (checkout / "docs" / "benchmarks" / f"{slug}.{suffix}").read_bytes() == \
               (out / "docs" / "benchmarks" / f"{slug}.{suffix}").read_bytes()
    merged = json.loads((out / "docs" / "benchmarks" / f"{slug}.json").read_text())
    assert merged["device"]["name"] == "NVIDIA H100 80GB HBM3" and merged["peak"]["gemm"]["value"] == 700.0
    assert [(r["image_size"], r["implementation"]) for r in merged["results"]] == [
        (256, "reference-eager-fp32"), (256, "fastdit-cudagraphs"), (512, "reference-eager-fp32"),
        (512, "fastdit-cudagraphs")]
    assert [r["speedup"]["value"] for r in merged["results"]] == pytest.approx([1, 10, 1, 10])
    markdown = (out / "docs" / "benchmarks" / f"{slug}.md").read_text()
    assert markdown.startswith("# fastdit bench: NVIDIA H100 80GB HBM3\n")
    assert "## bench/256: `fastdit bench --image-size 256`" in markdown and "## bench/512:" in markdown
    performance = (out / "docs" / "performance.md").read_text()
    assert f"--bench-json docs/benchmarks/{slug}.json" in performance.splitlines()[2]
    assert "| measured NVIDIA H100 80GB HBM3 | 700.0 | 4.00 |" in performance
    assert "| fastdit-cudagraphs | 512 px | 16 | forward | 100.00 ms |" in performance
    assert re.search(r"\| report +\| ok +\| +\d+ \|", result.stdout)
    assert re.search(r"\| roofline +\| ok +\| +\d+ \|", result.stdout)
    assert "| roofline" in (out / "device_check.log").read_text()


def test_a_failed_step_is_noted_the_rest_run_and_the_exit_is_1(checkout):
    out = checkout / "out"
    result = run("--report-only", "--out", str(out), script=str(checkout / "benchmarks" / "device_check.sh"),
                 env={"BUDGET_SCALE": "10"})
    assert result.returncode == 1
    assert "report: no bench report under" in result.stdout
    assert re.search(r"\| report +\| failed \(1\) +\|", result.stdout)
    assert re.search(r"\| roofline +\| skipped \(no report\) +\| +0 \|", result.stdout)


def test_a_step_past_its_budget_is_stopped(checkout):
    """The report step's budget is 15 s: a python that hangs is killed, and the run goes on."""
    hang = checkout / "hang"
    hang.write_text("#!/bin/sh\nsleep 120\n")
    hang.chmod(0o755)
    result = run("--report-only", "--out", str(checkout / "out"), script=str(checkout / "benchmarks" / "device_check.sh"),
                 env={"PYTHON": str(hang)}, timeout=60)
    assert result.returncode == 1
    assert re.search(r"\| report +\| timeout +\| +1[5-9] \|", result.stdout), result.stdout
