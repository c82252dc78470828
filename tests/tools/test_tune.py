"""``python -m fastdit.tools.tune`` on the CPU: arguments, the no-GPU message, the report."""
import json
import subprocess
import sys

import pytest
import torch

from fastdit.kernels import runtime, tuning
from fastdit.tools import tune
SPEC = runtime.GPUSpec("Fake GPU", (9, 0), 100_000, 132)


def _tune(*args, cwd):
    """The command as a user runs it, outside the checkout: from its root, the source folder fastdit/
    (which lacks kernels/) would shadow the installed package."""
    return subprocess.run([sys.executable, "-m", "fastdit.tools.tune", *args],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.mark.parametrize("args, message", [
    (["--models", "DiT-Q/2", "--json", "x.json"], "--models: unknown DiT-Q/2; valid: DiT-S/2, "),
    (["--image-size", "300", "--json", "x.json"], "--image-size: unknown 300; valid: 256, 512"),
    (["--dtype", "bf8", "--json", "x.json"], "--dtype: unknown bf8; valid: bf16, fp16, fp32, amp"),
    (["--batch", "0", "--json", "x.json"], "--batch: must be a positive integer, got 0"),
    ([], "the following arguments are required: --json"),
])
def test_bad_arguments_exit_2_with_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tune.main(args)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_without_cuda_it_exits_2_saying_so(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        tune.main(["--json", str(tmp_path / "report.json")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "python -m fastdit.tools.tune: needs a CUDA GPU to time the kernels on, "
        "and torch.cuda.is_available() is False")
    assert not (tmp_path / "report.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_the_module_runs_as_a_script_and_fails_cleanly_without_cuda(tmp_path):
    result = _tune("--json", str(tmp_path / "report.json"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "python -m fastdit.tools.tune: needs a CUDA GPU to time the kernels on, and torch.cuda.is_available() is False"]


def test_the_report_is_written_as_json(monkeypatch, tmp_path, capsys):
    runs = []
    fake_report = {'["Fake GPU", "op", "k"]': {"chosen": {"BLOCK": 128}, "candidates": []}}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(runtime, "gpu_spec", lambda device: SPEC)
    monkeypatch.setattr(tune, "_run_model", lambda *args: runs.append(args))
    monkeypatch.setattr(tuning, "report", lambda: fake_report)
    path = tmp_path / "out" / "report.json"
    assert tune.main(["--models", "DiT-S/2", "DiT-XL/2", "--image-size", "256", "512", "--dtype", "bf16",
                        "--batch", "8", "--json", str(path)]) == 0
    assert [args[:4] for args in runs] == [("DiT-S/2", 256, "bf16", 8), ("DiT-S/2", 512, "bf16", 8),
                                           ("DiT-XL/2", 256, "bf16", 8), ("DiT-XL/2", 512, "bf16", 8)]
    written = json.loads(path.read_text())
    assert written["device"] == "Fake GPU" and written["choices"] == fake_report
    assert written["runs"][0] == {"model": "DiT-S/2", "image_size": 256, "dtype": "bf16", "batch": 8}
    assert not list(path.parent.glob("*.tmp"))
    assert capsys.readouterr().out == f"wrote 1 tuned launch configurations to {path}\n"
