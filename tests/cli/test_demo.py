"""`fastdit demo` on the CPU: the smallest paper configuration, its four lines, and an error against the reference
within the fp32 tolerance. Its bad flags are in tests/cli/test_command_errors.py."""
import re

import torch
from parity import MODEL_TOLERANCE

from fastdit.cli import main


def test_demo_checks_and_times_a_model(capsys):
    # DiT-S/8 at 64 px: one 8x8 latent patch, the cheapest of the 12 configurations.
    assert main(["demo", "--model", "DiT-S/8", "--image-size", "64", "--batch-size", "1", "--repeats", "1",
                 "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4, lines
    assert lines[0] == "DiT-S/8 (33.1M parameters), 1 x 8x8 latents, cpu"
    assert re.fullmatch(r"kernels: \S+, attention: auto, dtype: float32", lines[1]), lines[1]
    error = float(re.fullmatch(r"relative max error vs reference \(fp32\): (\S+)", lines[2]).group(1))
    assert error <= MODEL_TOLERANCE[torch.float32], lines[2]
    assert re.fullmatch(r"forward: reference fp32 [\d.]+ ms, fastdit [\d.]+ ms \([\d.]+x\)", lines[3]), lines[3]
