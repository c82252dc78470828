"""docs/scale.md quotes `python -m fastdit.bench.scale`: the page must hold its current output."""
import os
import re

import pytest

from fastdit.bench import scale

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def output():
    pytest.importorskip("diffusers")
    return scale.report(scale.plan(*scale.vae_flops()))


def test_the_page_holds_the_commands_output(output):
    with open(os.path.join(ROOT, "docs", "scale.md")) as file:
        page = file.read()
    blocks = re.findall(r"```text\n(.*?)```", page, flags=re.DOTALL)
    assert output in blocks, "docs/scale.md is stale: paste the output of `python -m fastdit.bench.scale`"


def test_the_vae_count_is_the_one_docs_data_cites(output):
    # docs/data.md projects the encode from the same count (272.7 GFLOP per 256 px image).
    assert re.search(r"encode: VAE encoder +272\.7 GFLOP/image", output)
    with open(os.path.join(ROOT, "docs", "data.md")) as file:
        assert "272.7 GFLOP per 256 px image" in file.read()


def test_the_step_model_is_the_roofline_at_the_local_batch():
    """The training line is the roofline of fastdit.bench.roofline at 256 / 8 per GPU, and days follow from it."""
    from fastdit.bench.roofline import DATASHEET_PEAKS, total_seconds, training_ops
    from fastdit.models.flops import named_shape

    lines = {line.name: line.value for line in scale.plan(1, 1)}
    step = total_seconds(training_ops(named_shape("DiT-XL/2", 32), 32), DATASHEET_PEAKS[0])
    assert lines["train: DiT-XL/2 step, local batch 32"] == f"{step * 1e3:.2f} ms"
    assert lines["train: 7,000,000 steps"] == f"{7_000_000 * step / 86400:.2f} days"
    assert lines["train: images/s, 8 GPUs"] == f"{256 / step:,.0f}"
