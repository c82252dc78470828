"""The steps of benchmarks/device_check.sh, most valuable first, each with its budget in seconds.

benchmarks/README.md derives each budget (process start, model builds, kernel compiles, compiles of the
compiled baselines, the timed runs). The CPU mode (``cpu=True``) runs the same steps and writers on small
models, so the tests can stop and resume a whole run in seconds; it leaves out what only a GPU runs (the
compiled baselines, which take minutes to compile on a CPU, and CUDA graphs, which bench skips itself)."""
import dataclasses
import importlib.util
import os
import pathlib

import fastdit
from fastdit.bench.torchao_baseline import TORCHAO_FP8
from fastdit.bench.workloads import BASELINE, RELEASE

MODEL = "DiT-XL/2"
# The CUDA tests: kernel and model parity on the GPU (tests/tools, the AOT check, compiles on the host).
GPU_TESTS = ("tests/kernels", "tests/models/test_gpu.py", "tests/models/test_dit.py", "tests/models/test_dit_grad.py",
             "tests/models/test_block_designs.py", "tests/diffusion/test_sampling.py", "tests/diffusion/test_cuda_graphs.py")
CPU_TESTS = ("tests/bench/test_archive.py",)  # quick, and no timing a busy machine could upset
CPU_IMPLEMENTATIONS = (BASELINE, RELEASE, "fastdit-eager")
# The fused GELU's and the single adaLN GEMM's switches, each timed off against the same run's fastdit-eager (on):
# (step, variable).
SWITCH_STEPS = (("no-fused-gelu", "FASTDIT_FUSED_GELU"), ("no-one-adaln-gemm", "FASTDIT_ONE_ADALN_GEMM"))


@dataclasses.dataclass
class Step:
    """``argv`` runs under ``timeout -s INT`` with ``budget`` seconds; a bench step writes report.json under
    ``folder`` (relative to the scratch folder); ``skip``: why the step does not run."""

    name: str
    budget: int
    argv: list[str]
    folder: str | None = None
    env: dict = dataclasses.field(default_factory=dict)
    skip: str | None = None


def reads_switch(variable: str) -> bool:
    """Whether the model or the kernels read the environment variable ``variable`` (a switch that may not exist
    yet; the bench names it too, so only the code it would switch is searched)."""
    root = pathlib.Path(fastdit.__file__).parent
    return any(variable in path.read_text() for folder in ("models", "kernels") for path in python_files(root / folder))


def python_files(root: pathlib.Path) -> list[pathlib.Path]:
    """The .py files under ``root``, through symbolic links (a checkout's fastdit/kernels is one), sorted."""
    return sorted(pathlib.Path(folder, name) for folder, _, names in os.walk(root, followlinks=True)
                  for name in names if name.endswith(".py"))


def plan(python: str, cpu: bool, scratch: str) -> list[Step]:
    model, small = ("DiT-S/2", (32, 64)) if cpu else (MODEL, (256, 512))
    batch = (lambda n: 1) if cpu else (lambda n: n)
    repeats = ["--repeats", "1", "--warmup", "0"] if cpu else ["--repeats", "5", "--warmup", "1"]

    def bench(name, budget, size, batches, workloads, implementations, env=None):
        if cpu:  # the fewest rows that exercise every writer; compiling on a CPU takes minutes
            implementations = [i for i in implementations if i in CPU_IMPLEMENTATIONS] or [BASELINE]
        folder = f"bench/{name}"
        argv = [python, "-m", "fastdit", "bench", "--models", model, "--image-size", str(size), "--dtype", "bf16",
                "--batch-sizes", *map(str, map(batch, batches)), "--workloads", *workloads,
                "--implementations", *implementations, *repeats, "--no-progress", "--no-plot", "--resume",
                "--out", f"{scratch}/{folder}"]
        return Step(name, budget, argv, folder, env or {})

    eager = ["reference-eager-fp32", "reference-sdpa-fp32", "reference-eager-bf16", "reference-sdpa-bf16",
             "fastdit-eager", "fastdit-cudagraphs"]
    steps = [
        Step("probe", 30, [python, "-m", "fastdit.bench.probe", f"{scratch}/probe.json"] + (["--cpu"] if cpu else [])),
        bench("256", 150, small[0], [64], ["forward", "sampling-step", "training-step"], eager + ["fastdit-fp8"]),
        bench("256-compiled-forward", 180, small[0], [64], ["forward"], ["reference-compiled"]),
        # torchao's FP8 (compiled like the reference above): the baseline of fastdit-fp8's forward in step 256.
        bench("256-torchao-fp8", 180, small[0], [64], ["forward"], [TORCHAO_FP8]),
        bench("batch-1", 150, small[0], [1], ["sampling-step", "sampling-run"], ["fastdit-compiled", "fastdit-cudagraphs"]),
        Step("attention-512", 40, [python, "-m", "fastdit.bench.attention", "--image-size", str(small[1]),
                                   "--batch", str(batch(16)), *repeats, "--resume", "--out", f"{scratch}/attention"],
             "attention"),
    ]
    for name, variable in SWITCH_STEPS:
        step = bench(f"256-{name}", 60, small[0], [64], ["forward", "training-step"], ["fastdit-eager"], {variable: "0"})
        if not reads_switch(variable):
            step.skip = f"{variable} is not read by this checkout's fastdit (it predates the switch)"
        steps.append(step)
    tests = CPU_TESTS if cpu else GPU_TESTS
    # pytest.ini asks for xdist: 4 workers compile the kernels side by side where it is installed; without it,
    # the ini's xdist options are dropped.
    workers = ["-n", "4"] if importlib.util.find_spec("xdist") and not cpu else ["-n", "0"] if cpu else ["-o", "addopts="]
    steps += [
        Step("tests", 180, [python, "-m", "pytest", *tests, *workers, "-rfE", "-m", "not slow", "-p", "no:cacheprovider",
                            f"--junitxml={scratch}/tests/junit.xml"],
             "tests", {"FASTDIT_AUTOTUNE": "0"}),
        bench("512", 120, small[1], [16], ["forward", "sampling-step"], eager),
        # The fp32 reference's training step at 512 px, batch 16, needs about 72 GB of activations beside the
        # weights, states and copies: batch 4 leaves a quarter of that (benchmarks/README.md).
        bench("512-training", 60, small[1], [4], ["training-step"], ["reference-eager-bf16", "fastdit-eager"]),
        bench("256-compiled-training", 300, small[0], [64], ["training-step"], ["reference-compiled"]),
    ]
    return steps
