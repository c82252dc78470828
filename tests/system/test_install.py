"""`kernels/` installs as `fastdit.kernels`, importable from anywhere, shadowing nothing."""
import os
import subprocess
import sys

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
