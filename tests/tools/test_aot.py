"""``python -m fastdit.tools.aot``: every launch of a DiT training step compiled for sm_90 and sm_80
on this CPU machine, as a GPU would build it."""
import json
import os
import subprocess
import sys

import pytest

from fastdit.tools import aot

# The 11 kernels of a training step: forward, attention's three backward launches, and the
# backward of the norm, residual and patch-embedding ops (grad_x and grad_weight).
KERNELS = {
    "_patch_embed_kernel", "_patch_embed_grad_x_kernel", "_patch_embed_grad_weight_kernel",
    "_modulate_layernorm_kernel", "_modulate_layernorm_backward_kernel",
    "_gated_residual_kernel", "_gated_residual_backward_kernel",
    "_attention_fwd_kernel", "_attention_bwd_delta_kernel", "_attention_bwd_key_kernel", "_attention_bwd_query_kernel",
}
# The FP8 model's forward (--dtype fp8, sm_90 only): the norm kernels' QUANTIZE variants and the GELU's.
FP8_KERNELS = {"_patch_embed_kernel", "_modulate_layernorm_kernel", "_gated_residual_kernel", "_attention_fwd_kernel",
               "_gelu_fp8_kernel"}


def run_aot(tmp_path, *args):
    """The command as a user runs it: TRITON_INTERPRET=1 stays set (as in the test run), the tool drops it."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "TRITON_CACHE_DIR": str(tmp_path / "triton-cache")}
    return subprocess.run([sys.executable, "-m", "fastdit.tools.aot", *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path)


def check_report(report: dict, archs: set[int], kernels: dict[int, set] | None = None):
    """``kernels``: the kernels recorded per arch (default: a training step's, KERNELS)."""
    rows = report["launches"]
    assert {row["arch"] for row in rows} == archs
    for arch in archs:
        assert {row["kernel"] for row in rows if row["arch"] == arch} == (kernels or {}).get(arch, KERNELS)
    for row in rows:
        assert "error" not in row, row
        if row["default"]:
            assert row["status"] == "ok", row
            assert row["spill_bytes"] == 0 and row["spill_instructions"] == 0, row
        assert row["shared_bytes"] <= {90: 227 * 1024, 80: 163 * 1024}[row["arch"]]
        if row["dots"] and row["status"] == "ok" and "float32" not in row["shape"]:
            # Every half-precision dot runs on tensor cores; the defaults on sm_90 on wgmma (a candidate
            # with 32-row tiles, below wgmma's 64, takes mma.sync there).
            assert row["wgmma"] + row["mma"] > 0, row
            if row["arch"] == 90 and row["default"]:
                assert row["wgmma"] > 0, row


def test_bf16_training_step_compiles_for_sm90_and_sm80_without_spills(tmp_path):
    result = run_aot(tmp_path, "--arch", "90", "80", "--model", "DiT-S/2", "DiT-XL/2", "--dtype", "bf16",
                     "--image-size", "256", "--block", "adaln-zero", "--json", "aot.json", "--markdown", "aot.md")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "aot.json").read_text())
    check_report(report, {90, 80})
    assert report["triton"] and report["command"].startswith("python -m fastdit.tools.aot")
    markdown = (tmp_path / "aot.md").read_text()
    assert "| sm_90 | attention_fwd_kernel |" in markdown and "| sm_80 |" in markdown


@pytest.mark.slow
def test_full_matrix_compiles_without_spills(tmp_path):
    """The configuration each launch runs when tuning is off, for every dtype (amp included), design
    and image size of DiT-S/2 and DiT-XL/2 (the other candidates are compiled for bf16 above, and
    for everything in docs/kernels.md: about 800 compiles, too many for CI's two cores)."""
    result = run_aot(tmp_path, "--defaults-only", "--json", "aot.json")
    assert result.returncode == 0, result.stderr[-3000:]
    check_report(json.loads((tmp_path / "aot.json").read_text()), {90, 80}, {90: KERNELS | FP8_KERNELS})


def test_fp8_forward_compiles_for_sm90_without_spills_and_skips_sm80(tmp_path):
    result = run_aot(tmp_path, "--arch", "90", "80", "--model", "DiT-S/2", "--image-size", "256", "--dtype", "fp8",
                     "--block", "adaln-zero", "cross-attn", "--defaults-only", "--json", "aot.json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--dtype fp8: not recorded for sm_80: E4M3 conversion needs sm_89 or newer" in result.stderr
    report = json.loads((tmp_path / "aot.json").read_text())
    check_report(report, {90}, {90: FP8_KERNELS})
    quantized = [row for row in report["launches"] if row["constants"].get("QUANTIZE") or "gelu" in row["kernel"]]
    # the first norm, the gated and ungated residual + norm (cross-attention's), and the GELU
    assert len(quantized) == 4 and all(row["status"] == "ok" for row in quantized), quantized


def test_records_the_launches_of_a_real_training_step(tmp_path):
    result = run_aot(tmp_path, "--arch", "90", "--model", "DiT-S/2", "--image-size", "256", "--dtype", "amp",
                     "--block", "in-context", "--batch", "3", "--record-only", "--json", "launches.json")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "launches.json").read_text())["launches"]
    assert {row["kernel"] for row in rows} == KERNELS
    assert all(row["status"] == "recorded" for row in rows)
    # Under (emulated) autocast the residual stream is fp32 and the modulations bf16, as on a GPU.
    norm = next(row for row in rows if row["kernel"] == "_modulate_layernorm_kernel")
    assert norm["signature"]["x_ptr"] == "*fp32" and norm["signature"]["shift_ptr"] == "*bf16"
    # The in-context design's sequence: 256 patches and the two conditioning tokens.
    assert any("x258x" in row["shape"] for row in rows if row["kernel"] == "_attention_fwd_kernel")
    assert {use for row in rows for use in row["uses"]} == {"DiT-S/2 256px amp in-context forward",
                                                            "DiT-S/2 256px amp in-context backward"}
    # Every candidate configuration is recorded, the default among them.
    assert all(any(row["default"] for row in rows if row["kernel"] == kernel) for kernel in KERNELS)


@pytest.mark.parametrize("args, valid", [
    (["--arch", "70"], "80, 90"),
    (["--model", "DiT-Q/2"], "DiT-XL/2"),
    (["--image-size", "300"], "256, 512"),
    (["--dtype", "int8"], "bf16"),
    (["--block", "mamba"], "adaln-zero"),
])
def test_bad_arguments_exit_2_with_one_line_listing_the_valid_values(tmp_path, args, valid):
    result = run_aot(tmp_path, *args)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if "Warning" not in line and "warn_once" not in line]
    assert len(lines) == 1 and valid in lines[0], result.stderr


def test_missing_private_binder_names_the_triton_version(monkeypatch):
    import triton
    import triton.runtime.jit

    monkeypatch.delattr(triton.runtime.jit, "create_function_from_signature")
    with pytest.raises(RuntimeError, match=f"triton {triton.__version__}.*create_function_from_signature"):
        aot._binder(None, None)


def test_a_spilling_default_fails_and_a_spilling_candidate_is_pruned():
    facts = {"spill_bytes": 32, "spill_instructions": 4, "shared_bytes": 0}
    default = aot.Launch(None, {}, {}, {}, {}, "", 0, True, [])
    candidate = aot.Launch(None, {}, {}, {}, {}, "", 1, False, [])
    assert aot._status(default, facts, 80) == "spills"
    assert aot._status(candidate, facts, 80) == "pruned"
    too_big = {"spill_bytes": 0, "spill_instructions": 0, "shared_bytes": 200 * 1024}
    assert aot._status(default, too_big, 80) == "shared" and aot._status(default, too_big, 90) == "ok"
    assert aot._status(default, {"error": "CompilationError: x"}, 90) == "error"
    rows = [{"default": True, "status": "spills"}, {"default": False, "status": "pruned"}]
    assert len(aot.summary(rows)["failing"]) == 1
