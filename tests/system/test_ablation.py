"""The block-design ablation script (python -m fastdit.ablation), end to end on a tiny budget."""
import json
import subprocess
import sys

import pytest
from processes import torch_path_environment

from fastdit.bench import ablation
from fastdit.reference import BLOCK_DESIGNS


@pytest.mark.slow
def test_trains_every_design_and_writes_the_table_and_plot(tmp_path):
    # On the torch path: training and 800 sampling steps would take many minutes in Triton's
    # interpreter, and the kernels' parity is tested elsewhere. Outside the checkout, so that
    # `-m fastdit` is the installed package.
    env = torch_path_environment()
    command = [sys.executable, "-m", "fastdit.ablation", "--out", "docs", "--runs", "runs", "--steps", "3"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    out, runs = tmp_path / "docs", tmp_path / "runs"
    results = json.loads((out / "blocks.json").read_text())
    assert [result["block"] for result in results] == list(BLOCK_DESIGNS)
    for result in results:
        assert result["steps"] == 3
        assert 0 < result["final_loss"] and 0 <= result["accuracy_guided"] <= 1
        assert json.loads((runs / result["block"] / "model" / "config.json").read_text())["block"] == result["block"]
        assert (out / f"samples_{result['block']}.png").read_bytes().startswith(b"\x89PNG")
    table = (out / "blocks.md").read_text()
    for name in ablation.NAMES.values():
        assert f"| {name} |" in table
    assert (out / "blocks_loss.png").read_bytes().startswith(b"\x89PNG")
