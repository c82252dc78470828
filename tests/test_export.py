"""`fastdit export` and the C++ runner `fastdit-run` (native/fastdit_run.cpp, CMakeLists.txt).

The bundled digits model is exported once (10 DDIM steps, batch 4) and the runner built once per test session,
into temporary directories that the pytest-xdist workers share (under a file lock: whichever worker comes first
does the work). The runner's samples are checked against ``fastdit.sample(..., sampler="ddim")`` for the same
weights, noise and labels; bad arguments of both commands must fail with one line on stderr, exit status 2 and
nothing written. Only a machine without a C++ compiler skips the runner.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from filelock import FileLock

import fastdit
from fastdit import images, reference
from fastdit.models.checkpoint import model_config
from fastdit.cli import main
from fastdit.parity import relative_max_error
from fastdit.sample_cli import BUNDLED_MODEL
from fastdit.samplers import make_solver
from fastdit.sampling import ImageNoise

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, BATCH, CFG_SCALE = 10, 4, 4.0
SHAPE = (1, 16, 16)  # the digits model: 16x16 grey pixels
LABELS = [3, 1, 4, 1, 5, 9]  # more than one batch: the runner pads the last one


def once_per_session(tmp_path_factory, name, make):
    """The directory ``name`` of this test session, filled by ``make(directory)`` by the first worker to ask.
    (pytest-xdist's xdist_group would keep these tests on one worker, but with pytest 9 it is silently ignored.)"""
    base = tmp_path_factory.getbasetemp()
    directory = (base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / name  # the workers' common parent
    with FileLock(f"{directory}.lock"):
        if not (directory / "done").exists():
            directory.mkdir(exist_ok=True)
            make(directory)
            (directory / "done").touch()
    return directory


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    def export(directory):
        out = directory / "digits.pt2"
        assert main(["export", "--steps", str(STEPS), "--batch-size", str(BATCH), "--out", str(out)]) == 0

    return once_per_session(tmp_path_factory, "export", export) / "digits.pt2"


def run_checked(command, cwd, env=None):
    result = subprocess.run(command, check=False, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(map(str, command))} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    if not any(shutil.which(name) for name in ("c++", "g++", "clang++")):
        pytest.skip("no C++ compiler (c++, g++ or clang++) to build fastdit-run")
    # cmake and ninja from PyPI (pip install 'fastdit[native]') live beside this Python.
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    cmake = shutil.which("cmake", path=path)
    assert cmake, "cmake not found: pip install 'fastdit[native]' (cmake and ninja from PyPI)"
    generator = ["-G", "Ninja"] if shutil.which("ninja", path=path) else []
    env = {**os.environ, "PATH": path}

    def build(directory):
        run_checked([cmake, "-S", REPOSITORY, "-B", str(directory), *generator,
                     f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"], cwd=directory, env=env)
        run_checked([cmake, "--build", str(directory)], cwd=directory, env=env)

    return str(once_per_session(tmp_path_factory, "build", build) / "fastdit-run")


def run_native(runner, *arguments, cwd):
    # One thread, as conftest.py gives the tests: on two busy cores libtorch's spinning threads cost seconds.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([runner, *map(str, arguments)], check=False, cwd=cwd, env=env, capture_output=True,
                          text=True)


def test_constants_are_the_ddim_solvers(package):
    constants = json.loads(package.with_suffix(".json").read_text())
    solver = make_solver("ddim", STEPS)
    assert constants["timesteps"] == solver.timesteps.tolist()
    # The runner's coefficients, from the exported alphas as native/fastdit_run.cpp computes them.
    abar = torch.tensor(constants["alphas_cumprod"], dtype=torch.float64)
    abar_prev = torch.tensor(constants["alphas_cumprod_prev"], dtype=torch.float64)
    a = torch.sqrt(abar_prev) * torch.sqrt(1.0 / abar)
    b = torch.sqrt(1.0 - abar_prev) - torch.sqrt(abar_prev) * torch.sqrt(1.0 / abar - 1.0)
    assert torch.equal(torch.stack([a, b], dim=1), solver.coefficients[:, :2])
    assert (constants["eta"], constants["clip_denoised"], constants["cfg_scale"]) == (0.0, False, CFG_SCALE)
    assert (constants["batch_size"], constants["in_channels"], constants["input_size"]) == (BATCH, *SHAPE[:2])
    assert (constants["num_classes"], constants["null_class"], constants["guidance_channels"]) == (10, 10, 1)


def test_runner_matches_fastdit_sample(package, runner, tmp_path):
    noise = torch.randn(len(LABELS), *SHAPE, generator=torch.Generator().manual_seed(1))
    np.save(tmp_path / "noise.npy", noise.numpy())
    result = run_native(runner, package, "--out", "out.npy", "--labels", *LABELS, "--noise", "noise.npy",
                        "--image", "grid.pgm", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    native = torch.from_numpy(np.load(tmp_path / "out.npy"))
    fast = fastdit.load(BUNDLED_MODEL)
    plain = reference.DiT(**model_config(fast))
    plain.load_state_dict(fast.state_dict(), strict=True)
    # Every image on the reference DiT (the exported graph); the first also on the fast model, whose kernels
    # would take minutes for all of them in Triton's interpreter (TRITON_INTERPRET=1).
    for model, count in ((plain, len(LABELS)), (fast, 1)):
        expected = fastdit.sample(model, LABELS[:count], sampler="ddim", steps=STEPS, cfg_scale=CFG_SCALE,
                                  guidance_channels=None, noise=noise[:count])
        assert relative_max_error(native[:count], expected) <= 1e-4
    grid = images.grid(images.to_uint8(native))
    header = f"P5\n{grid.shape[1]} {grid.shape[0]}\n255\n".encode()
    assert (tmp_path / "grid.pgm").read_bytes() == header + grid.tobytes()


@pytest.mark.parametrize("seed", [0, 2**33 + 7])  # 2**33 + 7: a seed of two 32-bit words for SeedSequence
def test_runner_seed_draws_fastdit_sample_noise(package, runner, tmp_path, seed):
    np.save(tmp_path / "noise.npy", ImageNoise(seed, 0, len(LABELS), SHAPE).next().numpy())
    for out, source in (("seeded.npy", ["--seed", seed]), ("given.npy", ["--noise", "noise.npy"])):
        result = run_native(runner, package, "--out", out, *source, "--labels", *LABELS, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    assert np.array_equal(np.load(tmp_path / "seeded.npy"), np.load(tmp_path / "given.npy"))


def test_runner_help(runner, tmp_path):
    result = run_native(runner, "--help", cwd=tmp_path)
    assert result.returncode == 0 and "--noise NOISE.npy" in result.stdout and "--seed S" in result.stdout


@pytest.fixture
def bad_inputs(package, tmp_path):
    """Files for the error cases, in tmp_path: noise of the wrong shape, dtype and count, and packages whose
    constants say what the runner cannot do or whose .pt2 is not a package."""
    np.save(tmp_path / "noise3.npy", np.zeros((3, *SHAPE), np.float32))
    np.save(tmp_path / "wrong_shape.npy", np.zeros((2, 3, 16, 16), np.float32))
    np.save(tmp_path / "float64.npy", np.zeros((2, *SHAPE)))
    constants = json.loads(package.with_suffix(".json").read_text())
    for name, change in {"latent": {"pixels": False, "in_channels": 4}, "eta": {"eta": 0.5}, "garbage": {}}.items():
        (tmp_path / f"{name}.pt2").write_bytes(b"not a package")
        (tmp_path / f"{name}.json").write_text(json.dumps({**constants, **change}))
    (tmp_path / "alone.pt2").write_bytes(b"no constants beside it")
    return tmp_path


@pytest.mark.parametrize("arguments, message", [
    ([], "no package given"),
    (["missing.pt2", "--out", "o.npy"], "package not found"),
    (["noise3.npy", "--out", "o.npy"], "expected a package ending in .pt2"),
    (["PACKAGE"], "--out: required"),
    (["PACKAGE", "--out", "o.npy", "--labels", "10"], "class ids must be in [0, 9]"),
    (["PACKAGE", "--out", "o.npy", "--labels", "-1"], "class ids must be in [0, 9]"),
    (["PACKAGE", "--out", "o.npy", "--labels", "two"], "--labels: expected an integer, got 'two'"),
    (["PACKAGE", "--out", "o.npy", "--labels"], "--labels: expected one or more class ids"),
    (["PACKAGE", "--out", "o.npy", "--seed", "-3"], "--seed: expected an integer >= 0"),
    (["PACKAGE", "--out", "o.npy", "--seed", "1", "--noise", "noise3.npy"], "pass one, not both"),
    (["PACKAGE", "--out", "o.npy", "--noise", "wrong_shape.npy"], "--noise: expected shape (N, 1, 16, 16)"),
    (["PACKAGE", "--out", "o.npy", "--noise", "float64.npy"], "expected float32"),
    (["PACKAGE", "--out", "o.npy", "--noise", "absent.npy"], "--noise file not found"),
    (["PACKAGE", "--out", "o.npy", "--noise", "noise3.npy", "--labels", "1", "2"], "2 labels for 3 noise images"),
    (["PACKAGE", "--out", "o.npy", "--steps", "5"], "unknown option --steps"),
    (["PACKAGE", "PACKAGE", "--out", "o.npy"], "one MODEL.pt2 only"),
    (["alone.pt2", "--out", "o.npy"], "constants file (fastdit export writes it beside the .pt2) not found"),
    (["latent.pt2", "--out", "o.npy", "--image", "grid.pgm"], "--image: this model samples latents"),
    (["eta.pt2", "--out", "o.npy"], "eta > 0"),
    (["garbage.pt2", "--out", "o.npy"], "cannot load package garbage.pt2"),
])
def test_runner_errors(runner, package, bad_inputs, arguments, message):
    arguments = [str(package) if argument == "PACKAGE" else argument for argument in arguments]
    result = run_native(runner, *arguments, cwd=bad_inputs)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastdit-run: error: ") and message in lines[0], result.stderr
    assert not (bad_inputs / "o.npy").exists()


@pytest.mark.parametrize("arguments, message", [
    (["--out", "model.onnx"], "--out: expected a package path ending in .pt2"),
    (["--model", "DiT-Q/2", "--out", "m.pt2"], "--model: unknown model 'DiT-Q/2'"),
    (["--ckpt", "missing.pt", "--out", "m.pt2"], "checkpoint not found: missing.pt"),
    (["--steps", "0", "--out", "m.pt2"], "--steps: expected an integer in [1, 1000]"),
    (["--cfg-scale", "-1", "--out", "m.pt2"], "--cfg-scale: expected a finite number >= 0"),
    (["--batch-size", "0", "--out", "m.pt2"], "--batch-size: expected an integer >= 1"),
    (["--image-size", "32", "--out", "m.pt2"], "--image-size: this model makes 16 px images, got 32"),
    (["--device", "nonsense", "--out", "m.pt2"], "--device: expected a torch device"),
    pytest.param(["--device", "cuda", "--out", "m.pt2"], "--device cuda: this machine has no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")),
])
def test_export_errors(tmp_path, monkeypatch, capsys, arguments, message):
    monkeypatch.chdir(tmp_path)
    assert main(["export", *arguments]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastdit export: error: ") and message in lines[0], lines
    assert os.listdir(tmp_path) == []


def test_export_needs_out(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export"])
    assert exit_info.value.code == 2 and "--out" in capsys.readouterr().err
