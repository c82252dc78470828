"""`fastdit export` and the C++ runner `fastdit-run` (native/, CMakeLists.txt).

The bundled digits model is exported once (10 DDIM steps, batch 4) and the runner built once per test session,
into temporary directories that the pytest-xdist workers share (under a file lock: whichever worker comes first
does the work); both take about a minute, so those tests are marked slow. The runner's samples are checked
against ``fastdit.sample(..., sampler="ddim")`` for the same weights, noise and labels, with the schedule it
reads from the export; bad arguments of both commands must fail with one line on stderr, exit status 2 and
nothing written, and export's before anything is compiled. Only a machine without a C++ compiler skips the
runner.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from filelock import FileLock

import fastdit
from fastdit import images
from fastdit import reference
from fastdit.cli import main
from fastdit.cli.export import FORMAT_VERSION, schedule_paths
from fastdit.cli.options import BUNDLED_MODEL
from fastdit.diffusion.denoising import ImageNoise
from fastdit.diffusion.samplers import make_solver
from fastdit.models.checkpoint import model_config
from fastdit.models.parity import relative_max_error

REPOSITORY = next(path for path in pathlib.Path(__file__).resolve().parents if (path / "CMakeLists.txt").exists())
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
        run_checked([cmake, "-S", str(REPOSITORY), "-B", str(directory), *generator,
                     f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"], cwd=directory, env=env)
        run_checked([cmake, "--build", str(directory)], cwd=directory, env=env)

    return str(once_per_session(tmp_path_factory, "build", build) / "fastdit-run")


def run_native(runner, *arguments, cwd):
    # One thread, as conftest.py gives the tests: on two busy cores libtorch's spinning threads cost seconds.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([runner, *map(str, arguments)], check=False, cwd=cwd, env=env, capture_output=True,
                          text=True)


@pytest.mark.slow
def test_export_holds_the_ddim_solvers_schedule(package):
    timesteps_path, coefficients_path = schedule_paths(package)
    solver = make_solver("ddim", STEPS)
    assert np.array_equal(np.load(timesteps_path), solver.timesteps.numpy())
    assert np.load(timesteps_path).dtype == np.int64
    # The runner's step is x_prev = A x + B eps: the solver's sigma column must be 0 for that to be DDIM's step.
    assert np.array_equal(np.load(coefficients_path), solver.coefficients[:, :2].numpy())
    assert not solver.coefficients[:, 2].any()
    metadata = torch._inductor.aoti_load_package(str(package)).get_metadata()
    assert (metadata["format"], metadata["format_version"]) == ("fastdit-export", str(FORMAT_VERSION))
    assert (metadata["steps"], metadata["cfg_scale"], metadata["pixels"]) == (str(STEPS), str(CFG_SCALE), "true")
    assert (metadata["batch_size"], metadata["in_channels"], metadata["input_size"]) == tuple(
        map(str, (BATCH, *SHAPE[:2])))
    assert (metadata["num_classes"], metadata["null_class"], metadata["device"]) == ("10", "10", "cpu")


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 2**33 + 7])  # 2**33 + 7: a seed of two 32-bit words for SeedSequence
def test_runner_seed_draws_fastdit_sample_noise(package, runner, tmp_path, seed):
    np.save(tmp_path / "noise.npy", ImageNoise(seed, 0, len(LABELS), SHAPE).next().numpy())
    for out, source in (("seeded.npy", ["--seed", seed]), ("given.npy", ["--noise", "noise.npy"])):
        result = run_native(runner, package, "--out", out, *source, "--labels", *LABELS, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    assert np.array_equal(np.load(tmp_path / "seeded.npy"), np.load(tmp_path / "given.npy"))


@pytest.mark.slow
def test_runner_help(runner, tmp_path):
    result = run_native(runner, "--help", cwd=tmp_path)
    assert result.returncode == 0 and "--noise NOISE.npy" in result.stdout and "--seed S" in result.stdout


def copy_package(package, name, directory, metadata=None, replace=None, schedule=True):
    """A copy of the exported package as ``directory/name``: its metadata updated with ``metadata``, the zip
    entries ending in a key of ``replace`` replaced by its bytes, and its schedule files beside it."""
    target = directory / name
    with zipfile.ZipFile(package) as source, zipfile.ZipFile(target, "w") as copy:
        for info in source.infolist():
            data = source.read(info)
            if metadata and info.filename.endswith("_metadata.json"):
                data = json.dumps({**json.loads(data), **metadata}).encode()
            for suffix, replacement in (replace or {}).items():
                if info.filename.endswith(suffix):
                    data = replacement
            copy.writestr(info, data)
    if schedule:
        for source, copied in zip(schedule_paths(package), schedule_paths(target)):
            shutil.copyfile(source, copied)
    return target


@pytest.fixture
def bad_inputs(package, tmp_path):
    """Files for the error cases, in tmp_path: noise of the wrong shape, dtype and count, and copies of the
    package that the runner cannot use."""
    np.save(tmp_path / "noise3.npy", np.zeros((3, *SHAPE), np.float32))
    np.save(tmp_path / "wrong_shape.npy", np.zeros((2, 3, 16, 16), np.float32))
    np.save(tmp_path / "float64.npy", np.zeros((2, *SHAPE)))
    copy_package(package, "latent.pt2", tmp_path, {"pixels": "false", "in_channels": "4"})
    copy_package(package, "old.pt2", tmp_path, {"format_version": "1"})
    copy_package(package, "foreign.pt2", tmp_path, {"format": "something else"})
    copy_package(package, "broken.pt2", tmp_path, replace={".so": b"not a shared library"})
    copy_package(package, "alone.pt2", tmp_path, schedule=False)
    copy_package(package, "short.pt2", tmp_path)
    np.save(schedule_paths(tmp_path / "short.pt2")[0], np.arange(STEPS - 1))
    copy_package(package, "float32.pt2", tmp_path)
    coefficients_path = schedule_paths(tmp_path / "float32.pt2")[1]
    np.save(coefficients_path, np.load(coefficients_path).astype(np.float32))
    (tmp_path / "garbage.pt2").write_bytes(b"not a package")
    return tmp_path


@pytest.mark.slow
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
    (["alone.pt2", "--out", "o.npy"], "alone.timesteps.npy not found or unreadable (fastdit export writes it"),
    (["short.pt2", "--out", "o.npy"], "short.timesteps.npy: expected shape (10,) for the package's 10 steps"),
    (["float32.pt2", "--out", "o.npy"], "float32.ddim.npy: expected float64"),
    (["latent.pt2", "--out", "o.npy", "--image", "grid.pgm"], "--image: this model samples latents"),
    (["old.pt2", "--out", "o.npy"], f"format_version 1; this runner reads format_version {FORMAT_VERSION}"),
    (["foreign.pt2", "--out", "o.npy"], "not written by fastdit export"),
    (["garbage.pt2", "--out", "o.npy"], "cannot read package garbage.pt2"),
    (["broken.pt2", "--out", "o.npy"], "cannot load package broken.pt2"),
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
    (["--cfg-scale", "nan", "--out", "m.pt2"], "--cfg-scale: expected a finite number >= 0"),
    (["--batch-size", "0", "--out", "m.pt2"], "--batch-size: expected an integer in [1, 65536]"),
    (["--seed", "-1", "--model", "DiT-S/8", "--out", "m.pt2"], "--seed: expected an integer in [0, 4294967295]"),
    (["--image-size", "32", "--out", "m.pt2"], "--image-size: this model makes 16 px images, got 32"),
    (["--model", "DiT-S/8", "--image-size", "100", "--out", "m.pt2"], "--image-size: DiT-S/8 makes images of a "
                                                                       "multiple of 64 px"),
    (["--device", "nonsense", "--out", "m.pt2"], "--device: expected a torch device"),
    pytest.param(["--device", "cuda", "--out", "m.pt2"], "--device cuda: this machine has no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")),
])
def test_export_errors(tmp_path, monkeypatch, capsys, no_compiling, arguments, message):
    monkeypatch.chdir(tmp_path)
    assert main(["export", *arguments]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastdit export: error: ") and message in lines[0], lines
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("existing", ["m.pt2", "m.timesteps.npy", "m.ddim.npy"])
def test_export_keeps_existing_outputs(tmp_path, monkeypatch, capsys, no_compiling, existing):
    monkeypatch.chdir(tmp_path)
    (tmp_path / existing).write_bytes(b"an earlier export")
    assert main(["export", "--out", "m.pt2"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"fastdit export: error: --out m.pt2: {existing} exists (pass --overwrite to replace it)"]
    assert os.listdir(tmp_path) == [existing] and (tmp_path / existing).read_bytes() == b"an earlier export"


def test_export_refuses_a_directory_as_out(tmp_path, monkeypatch, capsys, no_compiling):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.pt2").mkdir()
    assert main(["export", "--out", "m.pt2", "--overwrite"]) == 2
    assert capsys.readouterr().err.splitlines() == ["fastdit export: error: --out m.pt2: m.pt2 is a directory"]


@pytest.mark.parametrize("make, out, message", [
    (lambda root: (root / "file").write_text("x"), "file/m.pt2", "file is not a directory"),
    (lambda root: (root / "file").write_text("x"), "file/sub/m.pt2", "file is not a directory"),
    (lambda root: (root / "link").symlink_to(root / "gone"), "link/m.pt2", "link is not a directory"),
    (lambda root: (root / "m.ddim.npy").mkdir(), "m.pt2", "m.ddim.npy is a directory"),
    (lambda root: None, "m" * 240 + ".pt2", "is too long for this filesystem"),
], ids=["parent-is-a-file", "ancestor-is-a-file", "dangling-link", "schedule-is-a-directory", "name-too-long"])
def test_export_refuses_an_unusable_out_before_compiling(tmp_path, monkeypatch, capsys, no_compiling, make, out,
                                                        message):
    monkeypatch.chdir(tmp_path)
    make(tmp_path)
    before = sorted(os.listdir(tmp_path))
    assert main(["export", "--out", out, "--overwrite"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fastdit export: error: --out {out}: "), lines
    assert message in lines[0], lines
    assert sorted(os.listdir(tmp_path)) == before


def test_export_needs_out(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export"])
    assert exit_info.value.code == 2 and "--out" in capsys.readouterr().err
