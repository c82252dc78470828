"""`kernels/` installs as `fastdit.kernels`, importable from anywhere, shadowing nothing; from the checkout's root
the source tree's fastdit (kernels included) runs the README's commands."""
import glob
import os
import re
import subprocess
import sys

import pytest

import fastdit.kernels


def test_kernels_import_from_any_directory(tmp_path):
    code = (
        "import importlib.util, fastdit.kernels; "
        "assert importlib.util.find_spec('kernels') is None, 'a top-level kernels module is installed'; "
        "print(fastdit.kernels.kernel_path('cpu'))"
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == fastdit.kernels.kernel_path("cpu")


def test_kernel_path_names():
    assert fastdit.kernels.kernel_path("cpu") in fastdit.kernels.KERNEL_PATHS
    expected = "triton-interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "torch"
    assert fastdit.kernels.kernel_path("cpu") == expected


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_from_root(arguments, pythonpath):
    """``python ARGUMENTS`` with the checkout's root as the working directory, as a user who just cloned it runs
    the README's commands: PYTHONPATH unset (whatever fastdit is installed, the root's source tree comes first)
    or pointing at the root."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = ROOT
    return subprocess.run([sys.executable, *arguments], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("pythonpath", [False, True], ids=["no-PYTHONPATH", "PYTHONPATH=root"])
def test_the_checkout_root_imports_its_own_fastdit_kernels(pythonpath):
    code = "import fastdit, fastdit.kernels; print(fastdit.__file__); print(fastdit.kernels.__file__)"
    result = run_from_root(["-c", code], pythonpath)
    assert result.returncode == 0, result.stderr
    package, kernels = result.stdout.split()
    assert package == os.path.join(ROOT, "fastdit", "__init__.py")
    # Through the link fastdit/kernels -> ../kernels: the design's top-level kernels/, not a copy.
    assert os.path.realpath(kernels) == os.path.join(ROOT, "kernels", "__init__.py")
    result = run_from_root(["-m", "fastdit", "--help"], pythonpath)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: fastdit")


def documented_modules() -> list[str]:
    """Every ``python -m fastdit...`` module that the README and docs/ tell a user to run."""
    texts = [os.path.join(ROOT, "README.md")] + glob.glob(os.path.join(ROOT, "docs", "*.md"))
    return sorted({name for path in texts for name in re.findall(r"python -m (fastdit[\w.]*)", open(path).read())})


@pytest.mark.slow
def test_every_documented_module_runs_from_the_checkout_root():
    modules = documented_modules()
    assert "fastdit.tools.aot" in modules, modules
    for module in modules:
        result = run_from_root(["-m", module, "--help"], pythonpath=False)
        # (fastdit.parallel.cost takes no flags: it prints its table)
        assert result.returncode == 0 and result.stdout, f"python -m {module} --help: {result.stderr[-2000:]}"
