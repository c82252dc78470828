import contextlib
import ctypes
import gc
import os
import signal
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests import the shared tolerance table as `parity`

import parity  # noqa: E402 (needs the path above)
import processes  # noqa: E402
from image_data import save_tiny_vae  # noqa: E402

from fastdit.kernels import kernel_path, runtime  # noqa: E402
from fastdit.models.vae import VAE  # noqa: E402

# One intra-op thread: the tests' tiny ops gain nothing from threads, and on a busy CPU (two
# xdist workers on two cores) spinning OpenMP threads make each op many times slower.
torch.set_num_threads(1)
LEFTOVER_GRACE_SECONDS = 10
# A DiT-XL test holds about 6.6 GB (reference and fast model in fp32) while it runs. Its many weights of a few MB
# come from malloc's heap, which keeps the freed pages: two xdist workers that had each run XL tests held over
# 12 GB between them and the next one was killed for memory on CI's 24 GB (and xdist then hung). Above this, a
# finished test's garbage is collected and the free heap pages handed back (glibc's malloc_trim).
TRIM_ABOVE_BYTES = 2 << 30
try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: nothing to trim
    _LIBC = None


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "launches_kernels: where the test device has a Triton path, the test must launch a Triton kernel"
    )


@pytest.fixture(scope="session", autouse=True)
def no_leftover_processes():
    """Fails the session (an error at its last teardown) when a process that a test started outlives the tests,
    naming each one; the leftovers are then killed (they carry this session's marker: they are the tests')."""
    marker = f"{os.getpid()}-{time.time_ns()}"
    os.environ[processes.SESSION_MARKER] = marker
    yield
    deadline = time.monotonic() + LEFTOVER_GRACE_SECONDS  # a process killed at the end of a test may still be exiting
    while (leftovers := processes.marked_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not leftovers, "processes started by the tests outlived them: " + "; ".join(
        f"pid {pid}: {command}" for pid, command in sorted(leftovers.items()))


@pytest.fixture(autouse=True)
def _return_freed_memory():
    yield
    if _LIBC is None:
        return
    with open("/proc/self/statm") as statm:
        resident = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    if resident > TRIM_ABOVE_BYTES:
        gc.collect()
        _LIBC.malloc_trim(0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _true_fp32():
    # cuDNN convolutions default to TF32 (about 1e-3 relative): the fp32 oracle must be fp32.
    allowed = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = allowed


@pytest.fixture
def torch_path(monkeypatch):
    """The fused ops on their plain torch path even under TRITON_INTERPRET, for tests of what runs around the
    kernels (caches, samplers, training runs and their faults) that run a model for hundreds of steps: the
    kernels are checked on their own (tests/kernels, tests/models), and interpreted these would take minutes.
    On a GPU it changes nothing."""
    monkeypatch.setattr(runtime, "TRITON_INTERPRET", False)


def _must_launch(item) -> bool:
    if kernel_path(parity.DEVICE) == "torch":
        return False
    return any(mark == parity.requires_triton.mark or mark.name == "launches_kernels" for mark in item.iter_markers())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A kernel test that passed without launching a Triton kernel tested nothing of fastdit's: on
    a GPU, inputs left on the CPU make each op run its torch reference."""
    if not _must_launch(item):
        return (yield)
    with parity.intercepted_launches() as launches:
        result = yield
    if not launches:
        raise AssertionError(
            f"{item.nodeid} launched no Triton kernel on the {kernel_path(parity.DEVICE)} path: "
            f"are its tensors on parity.DEVICE ({parity.DEVICE})?"
        )
    return result


def pytest_report_header(config):
    return f"fastdit kernels: {kernel_path('cpu')} on cpu" + (
        f", {kernel_path('cuda')} on cuda" if torch.cuda.is_available() else ""
    )


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="module")
def vae(vae_dir):
    return VAE.load(vae_dir)


def _refuse(monkeypatch, what, targets):
    def refuse(*args, **kwargs):
        raise AssertionError(f"{what} before the arguments were checked")

    for owner, name in targets:
        monkeypatch.setattr(owner, name, refuse)


@pytest.fixture
def no_compiling(monkeypatch):
    """Argument errors must come before a model is traced or compiled (fastdit export: about a minute)."""
    _refuse(monkeypatch, "a model was traced or compiled",
            [(torch.export, "export"), (torch._inductor, "aoti_compile_and_package")])


@pytest.fixture
def no_work(monkeypatch, no_compiling):
    """Argument errors must come before any model is loaded, built, traced or compiled."""
    import fastdit

    _refuse(monkeypatch, "a model was loaded or built", [(fastdit, "load"), (fastdit.reference.DiT, "__init__")])
