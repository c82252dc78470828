"""`python -m fastdit.roofline`: docs/performance.md, the roofline of ``fastdit.bench.roofline`` as a
document, with the kernels' compile facts and a GPU's measured peaks where they are given.
"""
import argparse
import re
import sys

from fastdit.bench.roofline import (
    BEFORE,
    CURRENT,
    DATASHEET_PEAKS,
    FP8_SEQUENCE,
    INFERENCE,
    KINDS,
    TRAINING,
    Op,
    Peak,
    forward_ops,
    model_limit_seconds,
    shares,
    total_seconds,
    training_ops,
    workload_ops,
)
from fastdit.models.flops import TRAINING_FORWARDS, named_shape
from fastdit.reference import DiT_models

# --- inputs: the static compile facts (python -m fastdit.tools.aot --json) and a GPU report ---


class InputError(ValueError):
    """A bad argument or input file: one line, exit 2."""


def _read_json(path: str, argument: str):
    import json

    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, ValueError) as error:
        raise InputError(f"{argument}: cannot read {path} as JSON ({error})") from None


_USE = re.compile(r"(\S+) (\d+)px (\S+) (\S+) (forward|backward)")


def _uses(row: dict) -> set[tuple]:
    """(model, image size, dtype, block, pass) of each step that makes this launch: from the row's
    "uses" ("DiT-XL/2 256px bf16 adaln-zero forward"), or from its own keys."""
    if "uses" in row:
        return {(m[1], int(m[2]), m[3], m[4], m[5]) for use in row["uses"] if (m := _USE.fullmatch(str(use)))}
    return {(row["model"], row["image_size"], row["dtype"], row.get("block", "adaln-zero"), row["pass"])}


def load_kernel_facts(path: str) -> dict:
    """The JSON of ``python -m fastdit.tools.aot --json``: {"triton", "command", "launches": [row, ...]}."""
    facts = _read_json(path, "--kernels-json")
    launches = facts.get("launches") if isinstance(facts, dict) else None
    if not isinstance(launches, list):
        raise InputError(f"--kernels-json: expected an object with a list 'launches' "
                         f"(python -m fastdit.tools.aot --json), got {type(facts).__name__} in {path}")
    for index, row in enumerate(launches):
        required = ("arch", "kernel") + (("uses",) if isinstance(row, dict) and "uses" in row
                                         else ("model", "image_size", "dtype", "pass"))
        missing = [key for key in required if not isinstance(row, dict) or key not in row]
        if missing:
            raise InputError(f"--kernels-json: launch {index} in {path} lacks {', '.join(missing)}")
    return facts


def _tensor_cores(row: dict) -> str:
    if "tensor_core" in row:
        return f"{row['tensor_core']} TC"
    if row.get("wgmma"):
        return f"{row['wgmma']} wgmma"
    if row.get("mma"):
        return f"{row['mma']} mma"
    return "no dot" if row.get("dots") == 0 else "no tensor cores"


def _kernel_summary(row: dict) -> str:
    name = row["kernel"].strip("_").removesuffix("_kernel")
    if row.get("status", "ok") != "ok":
        return f"{name}: {row['status']}"
    config = " ".join(f"{key}={value}" for key, value in (row.get("config") or {}).items())
    shared = row.get("shared_bytes")
    return (f"{name}: {row.get('registers', '?')} reg · {row.get('spill_bytes', '?')} B spill · "
            f"{'?' if shared is None else f'{shared / 1024:.0f} KiB'} smem · {_tensor_cores(row)}"
            + (f" ({config})" if config else ""))


def kernel_cell(facts: dict, op: Op, model: str, image_size: int, dtypes: tuple[str, ...], arch: int) -> str:
    """The compiled facts of ``op``'s Triton kernels at this configuration: the default config's rows,
    in the first of ``dtypes`` that has any."""
    if op.kind == "gemm":
        return "cuBLAS (torch)"
    if not op.kernels:
        return "torch"
    wanted = "forward" if op.stage == "forward" else "backward"
    for dtype in dtypes:
        use = (model, image_size, dtype, "adaln-zero", wanted)
        rows = [row for row in facts["launches"]
                if row["kernel"] in op.kernels and row["arch"] == arch and use in _uses(row)]
        if any(row.get("default") for row in rows):
            rows = [row for row in rows if row.get("default")]
        if rows:
            return "<br>".join(dict.fromkeys(_kernel_summary(row) for row in rows))
    return "not in the JSON"


def load_measured_peak(path: str) -> tuple[Peak, dict]:
    """The peaks that ``fastdit bench`` measured (report.json, or docs/benchmarks/<gpu>.json)."""
    report = _read_json(path, "--bench-json")
    try:
        gemm, copy, device = report["peak"]["gemm"], report["peak"]["copy_bandwidth"], report["device"]
        tflops, gigabytes, name = float(gemm["value"]), float(copy["value"]), device["name"]
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(f"--bench-json: expected a fastdit bench report with peak.gemm, peak.copy_bandwidth and "
                         f"device.name, {path} has no {error}") from None
    if gemm.get("dtype") != "bf16":
        raise InputError(f"--bench-json: the GEMM peak in {path} was measured in {gemm.get('dtype')!r}, not bf16 "
                         "(fastdit bench --dtype bf16)")
    shape = "x".join(map(str, gemm.get("shape", [])))
    return Peak(f"measured {name}", tflops, gigabytes / 1000,
                f"fastdit bench on {name} ({path}): bf16 GEMM {shape}, device-to-device copy (read + write)"), report


# --- the document ---


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + " --- |" + " ---: |" * (len(header) - 1)]
            + ["| " + " | ".join(row) + " |" for row in rows])


def _time(seconds: float) -> str:
    return f"{seconds * 1e3:,.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:,.1f} µs"


def _op_rows(ops, peaks, kernel_column) -> list[list[str]]:
    rows = []
    for op in ops:
        intensity = f"{op.flops / op.bytes:,.0f}" if op.flops else "0"
        row = [op.name, op.stage, str(op.launches), f"{op.flops / 1e9:,.1f}", f"{op.bytes / 1e6:,.1f}", intensity]
        row += [f"{_time(op.seconds(peak))} · {op.bound(peak)[:3]}" for peak in peaks]
        rows.append(row + ([kernel_column(op)] if kernel_column else []))
    return rows


def document(model: str, batch: int, image_sizes: list[int], peaks: list[Peak], command: str,
             facts: dict | None = None, arch: int = 90, bench: dict | None = None) -> str:
    shapes = {size: named_shape(model, size // 8) for size in image_sizes}
    lines = [
        f"# The roofline of {model}", "",
        f"Generated by `{command}` (fastdit/bench/roofline_document.py): edit the generator, not this file.", "",
        "Every op that the fast model launches, with its matrix FLOPs (the count of fastdit/models/flops.py) and the "
        "HBM bytes it must move (each tensor it reads or writes crosses HBM once: the least any "
        "implementation of that launch moves). At a GPU's peaks an op takes at least max(FLOPs / FLOP/s, "
        "bytes / bandwidth): it is compute-bound (`com`) when its FLOPs per byte reach the ridge point, "
        "memory-bound (`mem`) below. The ops run one after another, so their sum is the floor of fastdit's "
        "sequence of launches: not the model's physical limit, which is lower (see Three floors). A GPU run checks this plan: benchmarks/device_check.sh (see benchmarks/README.md).", "",
        "## Peaks", "",
    ]
    lines += _table(["GPU", "dense bf16 TFLOP/s", "HBM TB/s", "ridge FLOP/B", "source"],
                    [[p.name, f"{p.tflops:,.1f}", f"{p.bandwidth:.2f}", f"{p.ridge:,.0f}", p.source] for p in peaks])
    workloads = (("forward", "forward"), ("sampling-step", "guided sampling step (CFG: the model at 2 x batch)"),
                 ("training-step", "training step (forward, backward, AdamW)"))
    lines += ["", f"## fastdit's sequence floor at batch {batch}", "",
              "Predicted time per step at peak, and the images per second it allows.", ""]
    rows, share_rows = [], []
    for size, shape in shapes.items():
        for workload, label in workloads:
            ops = workload_ops(shape, workload, batch)
            row = [f"{size} px", label, f"{sum(op.flops for op in ops) / 1e12:,.2f}",
                   f"{sum(op.bytes for op in ops) / 1e9:,.1f}", str(sum(op.launches for op in ops))]
            for peak in peaks:
                seconds = total_seconds(ops, peak)
                row.append(f"{seconds * 1e3:,.2f} ms ({batch / seconds:,.0f} img/s)")
                share_rows.append([f"{size} px", workload, peak.name]
                                  + [f"{100 * value:.1f}%" for value in shares(ops, peak).values()])
            rows.append(row)
    lines += _table(["image", "step", "TFLOP", "GB moved", "launches"] + [p.name for p in peaks], rows)
    lines += ["", "Predicted shares of the time:", ""]
    lines += _table(["image", "step", "GPU"] + list(KINDS.values()), share_rows)
    forward = {size: sum(op.flops for op in forward_ops(shape, batch)) for size, shape in shapes.items()}
    training = {size: sum(op.flops for op in training_ops(shape, batch)) for size, shape in shapes.items()}
    lines += ["", "Training FLOPs: " + "; ".join(
        f"at {size} px the ops execute {training[size] / 1e12:,.2f} TFLOP against the model's "
        f"{TRAINING_FORWARDS * forward[size] / 1e12:,.2f} ({TRAINING_FORWARDS} forwards, the MFU convention)"
        for size in shapes) + ": the flash backward recomputes the scores twice and dP once (3 products of "
        "the size of q k^T beyond the model's 4), and nobody needs the gradients of the latents or of the "
        "timestep features (2 input-gradient GEMMs fewer)."]
    lines += _floors(shapes, batch, peaks, workloads)
    kernel_header = f"fastdit kernel (sm_{arch}, static)"
    for size, shape in shapes.items():
        latent = size // 8
        for workload, title, dtypes in (("forward", "forward", ("bf16",)),
                                        ("training-step", "training step", ("amp", "bf16"))):
            column = (lambda op, size=size, dtypes=dtypes: kernel_cell(facts, op, model, size, dtypes, arch)
                      ) if facts else None
            lines += ["", f"## {size} px ({latent}x{latent} latent, {shape.tokens} tokens), batch {batch}: "
                      f"{title}, per op", ""]
            lines += _table(["op", "pass", "launches", "GFLOP", "MB moved", "FLOP/B"] + [p.name for p in peaks]
                            + ([kernel_header] if facts else []),
                            _op_rows(workload_ops(shape, workload, batch), peaks, column))
    lines += ["", "## Static compile facts", ""]
    if facts:
        lines += [f"The kernel column: `{facts.get('command', 'python -m fastdit.tools.aot')}` (Triton "
                  f"{facts.get('triton', '?')}), the launches of {model} at sm_{arch} in the default launch "
                  "config: registers per thread, spilled bytes, shared memory and tensor-core instructions "
                  "(wgmma on sm_90, mma on sm_80), or the status when it is not ok. The training tables show the autocast (`amp`) compiles "
                  "where the JSON has them, else bf16."]
    else:
        lines += ["No `--kernels-json` given, so the kernel column is left out: `python -m fastdit.tools.aot "
                  "--arch 90 --json docs/kernels.json`, then regenerate with `--kernels-json docs/kernels.json`."]
    lines += ["", "## FP8 numerics", ""] + FP8_NUMERICS
    lines += ["", "## Measured", ""] + _measured(bench, model, peaks) + ["", "## What the count assumes", ""]
    lines += [
        f"- Forward: {INFERENCE.name}. Training: {TRAINING.name}; AdamW keeps fp32 moments.",
        "- A GEMM reads its two operands and bias and writes its output once; its backward is two GEMMs "
        "(input and weight gradient) with the bias gradient in the weight gradient's epilogue (where the "
        "library reduces it apart, that is one more pass over the output gradient).",
        "- AdamW in one pass (7 fp32 values per parameter, as `fused=True`); the benchmark's `foreach=True` "
        "makes several passes. Under autocast each weight is cast to bf16 once per forward and its gradient "
        "back to fp32 once per backward. fastdit train also updates an EMA copy (3 more fp32 values per "
        "parameter); the benchmark's training step does not.",
        "- The forward's GELU is in fc1's GEMM epilogue (cuBLASLt); training keeps it a pass of its own, and q, k, "
        "v's gradients are stacked into the qkv gradient by autograd: both are real launches of the training "
        "step, and fusing them is work the limit shows the worth of. One GEMM computes every adaLN modulation.",
        "- Left out, each under 0.01% of a step at batch 64: the timestep features, the conditioning's add "
        "and SiLU, the unpatchify copy, the loss, the guidance combination and the solver update.",
        "- Not modelled: kernel launch latency (the launches column counts them; CUDA graphs remove most of "
        "it), L2 reuse that reads a tensor for less than its size, and the time one op overlaps another.",
    ]
    return "\n".join(lines) + "\n"


DIGITS_FP8 = ("The bundled digits model at its settings (DDIM 50, guidance scale 4, seed 0, ten digits per class): "
              "100% of 100 recognised by `fastdit digits-accuracy` in FP8 (`fastdit sample --quantize fp8`), as in "
              "bf16 (`fastdit sample --dtype bf16`).")
# Measured on the CPU, which runs torch._scaled_mm with the same scales as a GPU; the commands are named, and
# tests/models/test_fp8.py and tests/system/test_digits_accuracy.py (slow) bound the figures.
FP8_NUMERICS = [
    "`model.quantize(\"fp8\")` (docs: fastdit/models/fp8.py) against the bf16 fast model and the fp32 reference, "
    "DiT-XL/2 with perturbed weights, latent 8x8, batch 2, relative max error (`python -m "
    "fastdit.bench.fp8_numerics`, on the CPU):",
    "",
    "| t | FP8 vs bf16 fast | FP8 vs fp32 reference | bf16 fast vs fp32 reference |",
    "| ---: | ---: | ---: | ---: |",
    "| 0 | 1.16e-01 | 1.04e-01 | 1.93e-02 |",
    "| 250 | 1.24e-01 | 1.22e-01 | 2.07e-02 |",
    "| 500 | 1.10e-01 | 1.13e-01 | 1.63e-02 |",
    "| 999 | 1.28e-01 | 1.24e-01 | 2.58e-02 |",
    "",
    DIGITS_FP8,
    "",
    "The FP8 path's speed, and the fused GELU's and the single adaLN GEMM's, have not been measured on a GPU yet: "
    "the tables above are their floors. The device run (benchmarks/device_check.sh) times them, each switch off "
    "against on, beside the FP8 baseline a user would otherwise pick: torchao's "
    "`Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())` on the release's model, compiled (the "
    "`torchao-fp8` row, `fastdit.bench.torchao_baseline`). torchao 0.18.0 is a 3.4 MB abi3 wheel whose compiled "
    "parts load on torch >= 2.11; the device run carries it (benchmarks/README.md) and installs it with "
    "`pip install --no-deps`. fastdit does not depend on it.",
]


# Why an op takes longer than its FLOPs at the peak: what stands between the sequence floor and the model's.
_GAP_REASONS = {
    "gated_residual_modulate_layernorm": "the residual stream and its normed copy cross HBM between the GEMMs: "
    "LayerNorm needs a whole row, which a GEMM's output tile does not hold, so it stays a pass of its own",
    "modulate_layernorm": "the first block's input norm: the same pass, once",
    "attention": "at 256 tokens the flash kernel moves more bytes per FLOP than the ridge allows (its "
    "intensity is tokens / 2); at 512 px it is compute-bound and costs nothing here",
    "adaln_modulation": "one row per image: the GEMM reads every adaLN weight for a few FLOPs each",
    "patch_embed": "a GEMM of 16 FLOPs per byte, with its position-embedding epilogue",
    "final_linear": "a narrow GEMM (2 p^2 C outputs per token): memory-bound",
    "qkv: quantize input": "FP8: a per-token quantization pass of its own (the fused kernels write bf16)",
    "attn_proj: quantize input": "FP8: the attention output quantized in a pass of its own",
    "fc1: quantize input": "FP8: a per-token quantization pass of its own (the fused kernels write bf16)",
    "gelu + quantize": "FP8: _scaled_mm has no GELU epilogue; the GELU and the quantization of its output "
    "share one pass",
}


def _floors(shapes, batch, peaks, workloads) -> list[str]:
    """The model's physical limit beside fastdit's sequence floors, and what lies between them."""
    lines = ["", f"## Three floors at batch {batch}", "",
             "- **The model's physical limit**: its FLOPs (the paper's count; 3 forwards for a training step) at the "
             "dense peak, or the least bytes the step must move at the bandwidth (inference: the weights once and "
             "the latents in and out; training: AdamW's one pass over fp32 weights, gradients and moments), "
             "whichever is larger. In bf16, and with every matrix product at the dense FP8 peak (inference only).",
             "- **fastdit's sequence floor**: the sum over its launches, as in the table above, for three sequences: "
             f"*GELU pass*, {BEFORE.name}; *fused* (the default), {CURRENT.name}; *FP8*, {FP8_SEQUENCE.name}. "
             "Training keeps the GELU pass (its backward needs the pre-activation) and bf16.", ""]
    header = ["image", "step", "GPU", "model bf16", "model FP8", "sequence GELU pass", "sequence fused", "sequence FP8"]
    rows = []
    for size, shape in shapes.items():
        for workload, label in workloads:
            for peak in peaks:
                cells = [model_limit_seconds(shape, workload, batch, peak),
                         model_limit_seconds(shape, workload, batch, peak, fp8=True)]
                for sequence in (BEFORE, CURRENT, FP8_SEQUENCE):
                    usable = not (sequence.fp8 and (workload == "training-step" or peak.fp8_tflops is None))
                    cells.append(total_seconds(workload_ops(shape, workload, batch, sequence), peak) if usable
                                 else None)
                rows.append([f"{size} px", workload, peak.name] + ["—" if c is None else _time(c) for c in cells])
    lines += _table(header, rows)
    peak, (size, shape) = peaks[0], next(iter(shapes.items()))
    for sequence in (CURRENT, FP8_SEQUENCE):
        ops = forward_ops(shape, batch, sequence=sequence)
        gaps = sorted(((op.seconds(peak) - op.flops / (op.tflops(peak) * 1e12), op) for op in ops), reverse=True,
                      key=lambda pair: pair[0])
        gap_rows = [[op.name, str(op.launches), _time(gap), _GAP_REASONS.get(op.name, "memory-bound")]
                    for gap, op in gaps if gap >= 1e-6]
        limit = model_limit_seconds(shape, "forward", batch, peak, fp8=sequence.fp8)
        lines += ["", f"Between the {'FP8' if sequence.fp8 else 'bf16'} sequence floor of a {size} px forward on "
                  f"{peak.name} ({_time(total_seconds(ops, peak))}) and the model's limit ({_time(limit)}): each "
                  "launch's time beyond its FLOPs at the peak (compute-bound GEMMs add nothing)"
                  + (", besides attention's FLOPs at the bf16 rate (it stays bf16)" if sequence.fp8 else "")
                  + ".", ""]
        lines += _table(["op", "launches", "beyond its FLOPs", "why it stands"], gap_rows)
    return lines


def _measured(bench: dict | None, model: str, peaks: list[Peak]) -> list[str]:
    if bench is None:
        return ["No GPU report yet. `benchmarks/device_check.sh` on a lent H100 or H200 writes "
                "docs/benchmarks/<gpu>.json; regenerate with `--bench-json docs/benchmarks/<gpu>.json` for the "
                "measured peaks' column and the measured steps against their limit."]
    measured = peaks[-1]
    rows = []
    for result in bench.get("results", []):
        if result.get("model") != model or result.get("status") != "ok" or result.get("dtype") != "bf16":
            continue
        size, batch, workload = result["image_size"], result["batch_size"], result["workload"]
        limit = total_seconds(workload_ops(named_shape(model, size // 8), workload, batch), measured)
        seconds = result["time"]["value"]
        rows.append([result["implementation"], f"{size} px", str(batch), workload, _time(seconds), _time(limit),
                     f"{100 * limit / seconds:.0f}%"])
    lines = [f"The last peak column is {measured.name}, from its report. Its steps against their limit at "
             "those peaks (bf16 implementations):", ""]
    return lines + (_table(["implementation", "image", "batch", "step", "measured", "limit", "of the limit"], rows)
                    if rows else [f"(the report has no bf16 step of {model})"])


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m fastdit.roofline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the markdown file to write (docs/performance.md)")
    parser.add_argument("--kernels-json", help="static compile facts: python -m fastdit.tools.aot --json FILE")
    parser.add_argument("--bench-json", help="a fastdit bench report (docs/benchmarks/<gpu>.json): its measured "
                                             "peaks become one more GPU")
    parser.add_argument("--model", default="DiT-XL/2", choices=list(DiT_models), metavar="MODEL")
    parser.add_argument("--batch", type=int, default=64, help="images per step (default 64)")
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[256, 512], metavar="PX")
    parser.add_argument("--arch", type=int, default=90, help="the compile target of the kernel column (default 90)")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    try:
        if args.batch < 1:
            raise InputError(f"--batch: expected a positive integer, got {args.batch}")
        for size in args.image_sizes:
            if size % 8:
                raise InputError(f"--image-sizes: expected multiples of 8 (the VAE's downsampling), got {size}")
            named_shape(args.model, size // 8)
        facts = load_kernel_facts(args.kernels_json) if args.kernels_json else None
        peaks, bench = list(DATASHEET_PEAKS), None
        if args.bench_json:
            measured, bench = load_measured_peak(args.bench_json)
            peaks.append(measured)
        text = document(args.model, args.batch, list(dict.fromkeys(args.image_sizes)), peaks,
                        "python -m fastdit.roofline " + " ".join(argv), facts, args.arch, bench)
        from fastdit.io import write_text_atomic

        write_text_atomic(args.out, text)
    except (InputError, ValueError, OSError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(f"{parser.prog}: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
