"""docs/scale.md quotes `python -m fastdit.bench.fid_cost`: the page must hold its current output."""
import os
import re

import pytest

from fastdit.bench import fid_cost, scale

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow  # counts the SD VAE's FLOPs and runs Inception once on the CPU
def test_the_page_holds_the_commands_output():
    pytest.importorskip("diffusers")
    try:
        inception = fid_cost.inception_flops()
    except ImportError as error:
        pytest.skip(f"torch-fidelity cannot be imported here ({error})")
    output = scale.report(fid_cost.plan(inception, scale.vae_flops()[1]))
    with open(os.path.join(ROOT, "docs", "scale.md")) as file:
        blocks = re.findall(r"```text\n(.*?)```", file.read(), flags=re.DOTALL)
    assert output in blocks, "docs/scale.md is stale: paste the output of `python -m fastdit.bench.fid_cost`"


def test_the_ratio_is_the_evaluation_over_the_sampling():
    lines = {line.name: line.value for line in fid_cost.plan(11_430_000_000, 622_200_000_000)}
    assert lines["Inception"] == "11.43 GFLOP/image"
    evaluation = float(lines["evaluate: Inception, FP32"][:-2]) + float(lines[
        "evaluate: precision/recall distances, FP64"][:-2])
    sampling = float(lines["sample: 50,000 images, 1 GPU"][:-4]) * 60
    assert float(lines["evaluate / sample"][:-1]) == pytest.approx(100 * evaluation / sampling, abs=0.01)
