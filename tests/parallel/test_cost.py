"""fastdit.parallel.cost: the bytes against a hand count, the predictions' limits, docs/parallel.md's tables."""
import os

import pytest

from fastdit.bench.roofline import DATASHEET_PEAKS, forward_ops, total_seconds
from fastdit.models.flops import named_shape
from fastdit.parallel import cost

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
H100 = DATASHEET_PEAKS[0]


def test_bytes_by_hand():
    shape = named_shape("DiT-XL/2", 32)  # 256 tokens of 1152
    # 2 copies x (q, k, v, out) x 128 tokens x 1152 x 2 B, half of it kept
    assert cost.sp_layer_bytes(shape, 2, 2) == 2 * 4 * 128 * 1152 * 2 / 2
    sent = cost.step_bytes(shape, cost.Plan("sp", 1, 2))
    output = 256 * 4 * 8 * 2  # tokens x p^2 x out channels x 2 B
    assert sent == {"layer": 1179648.0, "step": 28 * 1179648.0 + 2 * output / 2, "collectives": 57}
    assert cost.step_bytes(shape, cost.Plan("cfg", 2, 1)) == {"layer": 0.0, "step": output, "collectives": 1}


def test_predictions_bounded_by_the_roofline():
    shape = named_shape("DiT-XL/2", 128)
    single = total_seconds(forward_ops(shape, 2), H100)
    assert cost.step_seconds(shape, cost.Plan("one GPU", 1, 1), H100)["total"] == single
    for gpus in cost.GPU_COUNTS:
        for plan in cost.plans(gpus):
            seconds = cost.step_seconds(shape, plan, H100)
            assert seconds["compute"] >= single / gpus  # no mode beats a perfect split of the work
            assert seconds["total"] == pytest.approx(seconds["compute"] + seconds["sending"] + seconds["latency"])


def test_document_tables_are_the_model():
    with open(os.path.join(ROOT, "docs", "parallel.md")) as file:
        document = file.read()
    for table in cost.markdown().strip().split("\n\n"):
        assert table in document, "docs/parallel.md is stale: regenerate with python -m fastdit.parallel.cost"
