"""The roofline generator: per-op counts against fastdit.models.flops, the bound, the document and its inputs."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from fastdit import reference
from fastdit.bench import roofline, roofline_document
from fastdit.bench.roofline import DATASHEET_PEAKS, Op, Peak
from fastdit.models.flops import TRAINING_FORWARDS, forward_flops, named_shape, workload_flops

H100, H200 = DATASHEET_PEAKS
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES = [("DiT-XL/2", 32), ("DiT-XL/2", 64), ("DiT-S/2", 8), ("DiT-B/4", 16)]


def op(name, kind="gemm", stage="forward"):
    return lambda ops: next(o for o in ops if o.name == name and o.kind == kind and o.stage == stage)


@pytest.mark.parametrize("name, latent", SHAPES)
@pytest.mark.parametrize("batch", [1, 64])
def test_forward_and_sampling_flops_equal_fastdit_flops(name, latent, batch):
    shape = named_shape(name, latent)
    for workload in ("forward", "sampling-step"):
        ops = roofline.workload_ops(shape, workload, batch)
        assert sum(o.flops for o in ops) == workload_flops(shape, workload) * batch, workload


@pytest.mark.parametrize("name, latent", SHAPES)
def test_training_flops_are_the_models_plus_recompute_minus_unneeded_gradients(name, latent):
    shape, batch = named_shape(name, latent), 4
    d, tokens, depth = shape.hidden_size, shape.tokens, shape.depth
    # Input gradients nobody needs: of the latents (patchify) and of the sinusoidal timestep features.
    unneeded = 2 * batch * (tokens * shape.in_channels * shape.patch_size**2 * d + 256 * d)
    # Three (tokens x tokens x head dim) products per head beyond the model's backward: 2 FLOPs per MAC.
    recompute = 3 * 2 * batch * depth * tokens * tokens * d
    expected = TRAINING_FORWARDS * forward_flops(shape) * batch - unneeded + recompute
    assert sum(o.flops for o in roofline.training_ops(shape, batch)) == expected


def test_parameter_count_is_the_models():
    for name, latent in SHAPES:
        with torch.device("meta"):
            model = reference.DiT_models[name](input_size=latent)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert roofline.parameter_count(named_shape(name, latent)) == trainable, name


def test_bytes_follow_the_dtypes():
    shape = named_shape("DiT-S/2", 8)
    rows, d = 2 * shape.tokens, shape.hidden_size
    inference, training = roofline.forward_ops(shape, 2), roofline.training_ops(shape, 2)
    # bf16 everywhere: x in, normed out, shift and scale per image.
    assert op("modulate_layernorm", "fused")(inference).bytes == rows * d * 4 + 2 * 2 * d * 2
    # autocast: the residual stream is fp32, the normed copy bf16.
    assert op("modulate_layernorm", "fused")(training).bytes == rows * d * 6 + 2 * 2 * d * 2
    qkv = op("qkv")(inference)
    assert qkv.bytes == shape.depth * 2 * (rows * d + d * 3 * d + 3 * d + rows * 3 * d)
    assert op("AdamW (one pass)", "optimizer", "optimizer")(training).bytes == 28 * roofline.parameter_count(shape)
    assert not any(o.kind == "optimizer" for o in inference)


def test_bound_is_the_side_of_the_ridge_point():
    peak = Peak("test", 100.0, 2.0, "made up")  # ridge at 50 FLOP/B
    assert peak.ridge == 50
    at_ridge, below = Op("a", "gemm", "forward", 1, 5000, 100), Op("b", "gemm", "forward", 1, 4999, 100)
    assert at_ridge.bound(peak) == "compute" and below.bound(peak) == "memory"
    assert at_ridge.seconds(peak) == pytest.approx(5000 / 100e12)
    assert below.seconds(peak) == pytest.approx(100 / 2e12)
    assert Op("c", "fused", "forward", 1, 0, 10).bound(peak) == "memory"


def test_bounds_of_dit_xl_ops():
    small, large = (roofline.forward_ops(named_shape("DiT-XL/2", latent), 64) for latent in (32, 64))
    for peak in DATASHEET_PEAKS:
        for name in ("qkv", "attn_proj", "fc1", "fc2"):  # 16k rows or more: far above the ridge
            assert op(name)(small).bound(peak) == "compute", name
        # One row per image: the weights dominate, 64 FLOPs per weight byte read.
        assert op("adaln_modulation")(small).bound(peak) == "memory"
        assert all(o.bound(peak) == "memory" for o in small if o.kind in ("fused", "elementwise"))
        # Attention's intensity is tokens / 2: 128 at 256 px, under the ridge; 512 at 512 px, over it.
        assert op("attention", "attention")(small).bound(peak) == "memory"
        assert op("attention", "attention")(large).bound(peak) == "compute"
    shares = roofline.shares(small, H100)
    assert sum(shares.values()) == pytest.approx(1) and shares["optimizer"] == 0
    assert roofline.total_seconds(small, H200) < roofline.total_seconds(small, H100)  # same FLOP/s, more bandwidth


def generate(tmp_path, *arguments):
    out = tmp_path / "performance.md"
    assert roofline_document.main(["--out", str(out), *arguments]) == 0
    return out.read_text()


def table_rows(text, heading):
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    return [line.split(" | ")[0].lstrip("| ") for line in section.splitlines() if line.startswith("| ")][2:]


def test_document_has_every_op(tmp_path):
    text = generate(tmp_path)
    assert text.startswith("# The roofline of DiT-XL/2\n")
    assert f"Generated by `python -m fastdit.roofline --out {tmp_path / 'performance.md'}`" in text
    for latent, size in ((32, 256), (64, 512)):
        shape = named_shape("DiT-XL/2", latent)
        forward = table_rows(text, f"## {size} px ({latent}x{latent} latent, {shape.tokens} tokens), batch 64: forward")
        training = table_rows(text, f"## {size} px ({latent}x{latent} latent, {shape.tokens} tokens), batch 64: "
                                    "training step")
        assert forward == [o.name for o in roofline.forward_ops(shape, 64)]
        assert training == [o.name for o in roofline.training_ops(shape, 64)]
    for name in ("qkv", "attn_proj", "fc1", "fc2", "adaln_modulation", "timestep_fc1", "timestep_fc2",
                 "label_embed", "final_linear", "modulate_layernorm", "gated_residual_modulate_layernorm",
                 "patch_embed", "attention"):
        assert f"| {name} | forward |" in text, name
    assert "| H100 SXM | 989.4 | 3.35 | 295 |" in text and "| H200 SXM | 989.4 | 4.80 | 206 |" in text
    assert "No `--kernels-json` given" in text and "No GPU report yet" in text
    assert "fastdit kernel" not in text


def kernel_facts(tmp_path):
    def row(kernel, pass_, registers, default=True, **extra):
        return {"arch": 90, "model": "DiT-XL/2", "image_size": 256, "dtype": "bf16", "pass": pass_,
                "kernel": kernel, "shape": "B=64", "config": {"BLOCK_M": 128, "num_warps": 4},
                "default": default, "registers": registers, "spill_bytes": 0, "shared_bytes": 49152,
                "tensor_core": 24, "status": "ok", **extra}

    facts = {"triton": "3.9.0", "command": "python -m fastdit.tools.aot --arch 90 --json k.json", "launches": [
        row("_attention_fwd_kernel", "forward", 168),
        row("_attention_fwd_kernel", "forward", 255, default=False),  # a tuning candidate: not shown
        row("_attention_fwd_kernel", "forward", 111, arch=80),
        row("_gated_residual_kernel", "forward", 40, image_size=512),
        row("_modulate_layernorm_backward_kernel", "backward", 64, dtype="amp", status="spills"),
        # The form fastdit.tools.aot writes: where the launch is used, tensor-core instructions by kind.
        {"arch": 90, "kernel": "_attention_bwd_query_kernel", "shape": "q=(64, 256, 16, 72)",
         "config": {"BLOCK_M": 64}, "default": True, "registers": 200, "spill_bytes": 0, "shared_bytes": 65536,
         "dots": 3, "wgmma": 12, "mma": 0, "status": "ok",
         "uses": ["DiT-S/2 256px amp adaln-zero backward", "DiT-XL/2 256px amp adaln-zero backward"]},
        {"arch": 90, "kernel": "_attention_bwd_query_kernel", "default": True, "registers": 1, "status": "ok",
         "uses": ["DiT-XL/2 256px amp cross-attn backward"]},
    ]}
    path = tmp_path / "kernels.json"
    path.write_text(json.dumps(facts))
    return path


def test_kernel_column_from_the_aot_json(tmp_path):
    text = generate(tmp_path, "--kernels-json", str(kernel_facts(tmp_path)))
    assert "(Triton 3.9.0)" in text and "python -m fastdit.tools.aot --arch 90 --json k.json" in text
    forward_256 = text.split("## 256 px")[1]
    attention_row = next(line for line in forward_256.splitlines() if line.startswith("| attention |"))
    assert attention_row.endswith("| attention_fwd: 168 reg · 0 B spill · 48 KiB smem · 24 TC "
                                  "(BLOCK_M=128 num_warps=4) |")
    assert "255 reg" not in text and "111 reg" not in text
    assert "| qkv | forward |" in forward_256 and "cuBLAS (torch) |" in forward_256
    gated = next(line for line in forward_256.splitlines() if line.startswith("| gated_residual_modulate"))
    assert gated.endswith("| not in the JSON |")
    assert next(line for line in text.split("## 512 px")[1].splitlines()
                if line.startswith("| gated_residual_modulate")).endswith(" TC (BLOCK_M=128 num_warps=4) |")
    training_256 = text.split("training step, per op")[1]
    assert "| modulate_layernorm | backward |" in training_256
    assert "modulate_layernorm_backward: spills |" in training_256  # the amp row, for the training step
    assert "| attention_bwd_query: 200 reg · 0 B spill · 64 KiB smem · 12 wgmma (BLOCK_M=64) |" in training_256
    assert "| 1 reg" not in training_256  # another block design's launch


def bench_report(tmp_path, dtype="bf16"):
    report = {"device": {"name": "NVIDIA H200"},
              "peak": {"gemm": {"value": 700.0, "unit": "TFLOP/s", "dtype": dtype, "shape": [8192] * 3},
                       "copy_bandwidth": {"value": 4000.0, "unit": "GB/s"}},
              "results": [{"model": "DiT-XL/2", "image_size": 256, "batch_size": 64, "workload": "forward",
                           "implementation": "fastdit-cudagraphs", "dtype": "bf16", "status": "ok",
                           "time": {"value": 0.05, "unit": "s"}},
                          {"model": "DiT-XL/2", "image_size": 256, "batch_size": 64, "workload": "forward",
                           "implementation": "reference-eager-fp32", "dtype": "fp32", "status": "ok",
                           "time": {"value": 0.5, "unit": "s"}}]}
    path = tmp_path / "h200.json"
    path.write_text(json.dumps(report))
    return path


def test_measured_peaks_from_a_bench_report(tmp_path):
    text = generate(tmp_path, "--bench-json", str(bench_report(tmp_path)))
    assert "| measured NVIDIA H200 | 700.0 | 4.00 | 175 |" in text
    measured = Peak("m", 700.0, 4.0, "")
    limit = roofline.total_seconds(roofline.forward_ops(named_shape("DiT-XL/2", 32), 64), measured)
    row = next(line for line in text.splitlines() if line.startswith("| fastdit-cudagraphs |"))
    assert row == (f"| fastdit-cudagraphs | 256 px | 64 | forward | 50.00 ms | {limit * 1e3:,.2f} ms | "
                   f"{100 * limit / 0.05:.0f}% |")
    assert "reference-eager-fp32 |" not in text  # an fp32 step has no bf16 limit
    assert "| qkv | forward |" in text and text.count(" · com |") > 0


@pytest.mark.parametrize("arguments, message", [
    (["--model", "DiT-M/2"], "argument --model: invalid choice: 'DiT-M/2'"),
    (["--batch", "0"], "--batch: expected a positive integer, got 0"),
    (["--image-sizes", "100"], "--image-sizes: expected multiples of 8 (the VAE's downsampling), got 100"),
    (["--image-sizes", "264"], "input_size: expected a positive multiple of the patch size 2"),
    (["--kernels-json", "missing.json"], "--kernels-json: cannot read missing.json as JSON"),
    (["--kernels-json", "{list}"], "--kernels-json: expected an object with a list 'launches'"),
    (["--kernels-json", "{row}"], "--kernels-json: launch 0 in {row} lacks kernel, pass"),
    (["--bench-json", "{list}"], "--bench-json: expected a fastdit bench report"),
    (["--bench-json", "{fp32}"], "--bench-json: the GEMM peak in {fp32} was measured in 'fp32', not bf16"),
])
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, capsys, arguments, message):
    paths = {"{list}": tmp_path / "list.json", "{row}": tmp_path / "row.json", "{fp32}": bench_report(tmp_path, "fp32")}
    paths["{list}"].write_text("[]")
    paths["{row}"].write_text(json.dumps({"launches": [{"arch": 90, "model": "DiT-XL/2", "image_size": 256,
                                                        "dtype": "bf16"}]}))
    arguments = [str(paths.get(a, a)) for a in arguments]
    message = message.replace("{row}", str(paths["{row}"])).replace("{fp32}", str(paths["{fp32}"]))
    try:
        code = roofline_document.main(["--out", str(tmp_path / "out.md"), *arguments])
    except SystemExit as usage_error:  # argparse's own checks (--model's choices) exit from inside
        code = usage_error.code
    assert code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error, error
    assert error.startswith("python -m fastdit.roofline: error: ")
    assert not (tmp_path / "out.md").exists()


def test_module_entry_point_and_an_unwritable_out(tmp_path):
    run = subprocess.run([sys.executable, "-m", "fastdit.roofline", "--out", str(tmp_path / "no" / "such" / "x.md")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "error: " in run.stderr, run.stderr
    run = subprocess.run([sys.executable, "-m", "fastdit.roofline"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    assert run.returncode == 2 and "the following arguments are required: --out" in run.stderr


def test_committed_document_is_what_its_command_writes(tmp_path):
    """docs/performance.md names its command at its top; running it again changes nothing."""
    committed = open(os.path.join(ROOT, "docs", "performance.md")).read()
    command = re.search(r"Generated by `python -m fastdit.roofline ([^`]*)`", committed).group(1).split()
    for flag in ("--kernels-json", "--bench-json"):
        if flag in command:
            index = command.index(flag) + 1
            command[index] = os.path.join(ROOT, command[index])
    out = command.index("--out") + 1
    command[out] = str(tmp_path / "performance.md")
    regenerated = generate(tmp_path, *command[:out - 1], *command[out + 1:])
    assert regenerated.split("\n", 3)[3] == committed.split("\n", 3)[3], "regenerate docs/performance.md"


def test_floors_of_dit_xl_256():
    """fastdit's floor with a GELU pass and an adaLN GEMM per block, 21.29 ms on H100 at batch 64, against the
    model's compute floor of 15.35 ms; the fused sequence has neither the GELU pass nor 28 adaLN GEMMs."""
    shape = named_shape("DiT-XL/2", 32)
    before = roofline.forward_ops(shape, 64, sequence=roofline.BEFORE)
    now = roofline.forward_ops(shape, 64)
    assert roofline.total_seconds(before, H100) == pytest.approx(21.29e-3, abs=5e-6)
    assert roofline.model_limit_seconds(shape, "forward", 64, H100) == pytest.approx(15.35e-3, abs=5e-6)
    assert "gelu" in [o.name for o in before] and "gelu" not in [o.name for o in now]
    assert op("adaln_modulation")(before).launches == 28 and op("adaln_modulation")(now).launches == 1
    # the same FLOPs and weights: one GEMM over the stacked weights
    assert sum(o.flops for o in before) == sum(o.flops for o in now)
    assert roofline.total_seconds(before, H100) - roofline.total_seconds(now, H100) > 2.5e-3
    fp8 = roofline.forward_ops(shape, 64, sequence=roofline.FP8_SEQUENCE)
    assert [o.name for o in fp8 if o.fp8] == list(roofline.FP8_GEMMS)
    assert roofline.model_limit_seconds(shape, "forward", 64, H100, fp8=True) == pytest.approx(15.35e-3 / 2, rel=1e-3)
    assert roofline.model_limit_seconds(shape, "training-step", 64, H100, fp8=True) is None
    # batch 1: the weights, not the FLOPs, bound the model; FP8 weights halve the GEMMs' bytes
    bf16_1, fp8_1 = (roofline.model_limit_seconds(shape, "forward", 1, H100, fp8=f) for f in (False, True))
    assert bf16_1 == pytest.approx(2 * roofline.parameter_count(shape) / 3.35e12, rel=0.01) and fp8_1 < 0.7 * bf16_1
    # training keeps the GELU pass: its backward needs the pre-activation
    assert "gelu" in [o.name for o in roofline.training_ops(shape, 64) if o.stage == "forward"]
