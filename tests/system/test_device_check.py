"""benchmarks/device_check.sh on the CPU: its plan and budgets, its refusals (one line, exit 2), and, in its
CPU mode (the same steps and writers on small models), a run stopped by SIGTERM that keeps every finished
measurement in its archive and a --resume that completes it to the report of an uninterrupted run."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastdit.bench import archive, unpack

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "device_check.sh")
PROG = "benchmarks/device_check.sh"
ORDER = ["probe", "256", "256-compiled-forward", "256-torchao-fp8", "batch-1", "attention-512", "256-no-fused-gelu",
         "256-no-one-adaln-gemm", "tests", "512", "512-training", "256-compiled-training"]


def environment():
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    return env


def run(*arguments, timeout=120):
    return subprocess.run(["bash", SCRIPT, *arguments], capture_output=True, text=True, env=environment(),
                          timeout=timeout)


def plan(*arguments):
    """{step: (budget, what)} from a dry run."""
    result = run("--dry-run", *arguments)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    steps = {}
    for line in lines[1:-1]:
        name, budget, what = re.match(r"  (\S+) +(\d+)s  (.*)", line).groups()
        steps[name] = (int(budget), what)
    total = sum(budget for budget, what in steps.values() if not what.startswith("skipped"))
    assert lines[-1] == f"total budget: {total}s"
    return steps


def test_the_plan_runs_the_steps_in_order_of_value_with_the_budgets_of_the_readme():
    steps = plan()
    assert list(steps) == ORDER
    for name, (_, what) in steps.items():
        if " fastdit bench " in what:
            assert "--models DiT-XL/2" in what and "--resume" in what and "--no-plot" in what, name
            assert f"--out $SCRATCH/bench/{name}" in what
    tests = steps["tests"][1]
    assert tests.startswith("FASTDIT_AUTOTUNE=0 ") and " -rfE " in tests and "--maxfail" not in tests
    for path in tests.split(" -m pytest ")[1].split(" -")[0].split():
        assert os.path.exists(os.path.join(ROOT, path)), path
    assert "--image-size 512 --dtype bf16 --batch-sizes 4 --workloads training-step" in steps["512-training"][1]
    assert "--batch-sizes 1 --workloads sampling-step sampling-run" in steps["batch-1"][1]
    # benchmarks/README.md states each budget and its arithmetic: its table must be the plan's.
    readme = open(os.path.join(ROOT, "benchmarks", "README.md")).read()
    table = dict(re.findall(r"^\| \d+ \| `([\w-]+)` \| (\d+) s \|", readme, re.MULTILINE))
    assert {name: int(budget) for name, budget in table.items()} == {name: budget for name, (budget, _) in steps.items()}


def test_the_cpu_mode_runs_the_same_steps():
    assert list(plan("--cpu")) == ORDER


def a_manifest(**identity):
    return {"identity": {**archive.code_identity(), **identity}, "mode": "cpu", "steps": {}}


@pytest.fixture
def archives(tmp_path):
    """Archives a --resume must refuse: damaged, not an archive, from another fastdit, from another GPU."""
    (tmp_path / "scratch").mkdir()
    made = {}
    for name, manifest in (("other-fastdit", a_manifest(sources="0" * 64)),
                           ("other-gpu", a_manifest(device="NVIDIA H100 80GB HBM3"))):
        made[name] = tmp_path / f"{name}.tar.gz"
        archive.write(tmp_path / "scratch", made[name], manifest)
    made["damaged"] = tmp_path / "damaged.tar.gz"
    made["damaged"].write_bytes(made["other-gpu"].read_bytes()[:200])
    made["not-an-archive"] = tmp_path / "notes.txt"
    made["not-an-archive"].write_text("hello\n")
    return made


@pytest.mark.parametrize("arguments, message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    ([], r"--out: no directory given and \$OUT is not set"),
    (["--out", "OUT", "--time-limit", "10"], "--time-limit: expected >= 60, --grace >= 1 and --budget-scale > 0, "
                                             "got 10, 20 and 1.0"),
    (["--out", "OUT", "--cpu", "--resume", "damaged"], r"--resume: \S+damaged.tar.gz is damaged or not a device-check"),
    (["--out", "OUT", "--cpu", "--resume", "not-an-archive"], r"--resume: \S+notes.txt is damaged or not a device-che"),
    (["--out", "OUT", "--cpu", "--resume", "other-fastdit"], r"--resume: \S+ was written with sources '0000.*"
                                                             r"cannot be merged"),
    (["--out", "OUT", "--cpu", "--resume", "other-gpu"], r"--resume: \S+ was measured on 'NVIDIA H100 80GB HBM3', "
                                                         r"this device is .*cannot be merged"),
])
def test_bad_input_is_one_line_and_exit_2(arguments, message, archives, tmp_path):
    arguments = [str(archives.get(a, tmp_path / "out" if a == "OUT" else a)) for a in arguments]
    result = run(*arguments)
    assert result.returncode == 2, result.stdout + result.stderr
    assert re.fullmatch(f"{re.escape(PROG)}: error: .*{message}.*\n", result.stderr), result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_one_line_and_exit_2(tmp_path):
    result = run("--out", str(tmp_path))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"{PROG}: error: no CUDA device: torch ") and "--cpu" in result.stderr


def rows(report):
    """What a report measured, without the figures that vary from run to run."""
    return [(r["step"], r["model"], r["image_size"], r["batch_size"], r["workload"], r["implementation"], r["status"])
            for r in report["results"]]


@pytest.mark.slow
def test_a_stopped_run_keeps_its_archive_and_resume_completes_it(tmp_path):
    # No step may time out here: budgets for a CPU shared with other work.
    roomy = ["--cpu", "--time-limit", "20000", "--budget-scale", "20"]
    whole = run(*roomy, "--out", str(tmp_path / "whole"), timeout=6000)
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr

    out = tmp_path / "stopped"
    process = subprocess.Popen(["bash", SCRIPT, *roomy, "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment())
    for line in process.stdout:  # SIGTERM once the batch-1 step has kept its first measurement
        if line.startswith("=== batch-1 ("):
            report = os.path.join(line.split(" --out ")[1].split()[0], "report.json")
            while not os.path.exists(report):
                time.sleep(0.2)
            process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    assert sorted(os.listdir(out)) == ["device_check.log", "device_check.tar.gz"]
    last = "device_check: stopped by SIGTERM during step batch-1; device_check.tar.gz holds every finished measurement"
    assert (out / "device_check.log").read_text().splitlines()[-1].startswith(last)
    manifest, opened = archive.read(out / "device_check.tar.gz")
    assert opened.extractfile("device_check.log").read().decode().splitlines()[-1].startswith(last)
    statuses = {name: step["status"] for name, step in manifest["steps"].items()}
    assert statuses == {"probe": "ok", "256": "ok", "256-compiled-forward": "ok", "256-torchao-fp8": "ok",
                        "batch-1": "stopped (SIGTERM)"}
    assert "bench/256/report.json" in opened.getnames()

    resumed = run(*roomy, "--out", str(tmp_path / "resumed"), "--resume", str(out / "device_check.tar.gz"),
                  timeout=6000)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr
    assert "=== 256: kept from the resumed archive (ok)" in resumed.stdout
    reports = {}
    for name in ("whole", "resumed"):
        assert unpack.main([str(tmp_path / name / "device_check.tar.gz"), "--docs", str(tmp_path / f"docs-{name}")]) == 0
        written = sorted(os.listdir(tmp_path / f"docs-{name}" / "benchmarks"))
        assert [os.path.splitext(file)[1] for file in written] == [".json", ".md", ".png"]
        reports[name] = json.loads((tmp_path / f"docs-{name}" / "benchmarks" / written[0]).read_text())
        assert (tmp_path / f"docs-{name}" / "performance.md").exists()
    assert rows(reports["resumed"]) == rows(reports["whole"]) and rows(reports["whole"])
    assert list(reports["resumed"]["steps"]) == ORDER
