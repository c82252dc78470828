"""`python -m fastdit.bench.attention`: fastdit's attention op against every SDPA backend at one DiT-XL
shape (16 heads of 72 at the tokens of ``--image-size``), forward and forward + backward, as report.json.

Each row is checked against the fp32 reference (``attention_reference``) at the kernel tolerance of its
dtype (the model tolerance: fastdit.models.parity) before it is timed; a backend that cannot run the shape on this device is a "skipped" row with
PyTorch's reason. The report is rewritten after every row and on SIGINT/SIGTERM (``fastdit.bench.progress``)."""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastdit.bench.progress import previous_rows
from fastdit.bench.report import device_info
from fastdit.bench.timing import time_median
from fastdit.io import write_text_atomic
from fastdit.kernels.attention import attention, attention_reference
from fastdit.models.flops import attention_macs
from fastdit.models.parity import MODEL_TOLERANCE, relative_max_error
from fastdit.stopping import Stopped, stop_on_signals

HEADS, HEAD_DIM, PATCH, DOWNSAMPLING = 16, 72, 2, 8  # DiT-XL/2 on the VAE's latents
SDPA = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH}
PASSES = ("forward", "forward-backward")


def implementation(name):
    """(B, T, H, Dh) q, k, v -> (B, T, H, Dh): fastdit's op, or SDPA restricted to one backend."""
    if name == "fastdit":
        return attention

    def sdpa(q, k, v):
        with sdpa_kernel(SDPA[name]):
            return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)

    return sdpa


def measure(name, passes, inputs, expected, repeats, warmup) -> dict:
    q, k, v = inputs
    fn = implementation(name)
    grad = torch.randn_like(q)

    def step():
        if passes == "forward":
            with torch.no_grad():
                return fn(q, k, v)
        out = fn(q, k, v)
        out.backward(grad)
        return out

    try:
        output = step()
    except RuntimeError as error:  # no kernel of this backend for the shape, dtype or device
        return {"status": "skipped", "reason": str(error).strip().splitlines()[0]}
    error = relative_max_error(output.float(), expected)
    if not error <= MODEL_TOLERANCE[q.dtype]:
        return {"status": "parity-failed", "reason": f"relative max error {error:.2e} > {MODEL_TOLERANCE[q.dtype]:.0e}"}
    seconds = time_median(step, q.device, repeats, warmup)
    flops = 2 * q.shape[0] * attention_macs(q.shape[1], q.shape[2] * q.shape[3]) * (1 if passes == "forward" else 3.5)
    return {"status": "ok", "max_error": {"value": error, "unit": "relative max error vs the fp32 reference"},
            "time": {"value": seconds, "unit": "s (median)"},
            "achieved": {"value": flops / seconds / 1e12, "unit": "TFLOP/s (backward counted as 2.5 forwards)"}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdit.bench.attention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder of report.json")
    parser.add_argument("--image-size", type=int, default=512, help="pixels: tokens = (size / 16)^2 (default 512)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--resume", action="store_true", help="keep the rows of the report.json already in --out")
    args = parser.parse_args(argv)
    if args.image_size <= 0 or args.image_size % (PATCH * DOWNSAMPLING) or args.batch < 1 or args.repeats < 1:
        parser.error(f"--image-size: expected a positive multiple of {PATCH * DOWNSAMPLING}, --batch and --repeats "
                     f">= 1; got {args.image_size}, {args.batch} and {args.repeats}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    tokens = (args.image_size // (PATCH * DOWNSAMPLING)) ** 2
    settings = {"device": str(device), "dtype": "bf16", "batch": args.batch, "tokens": tokens, "heads": HEADS,
                "head_dim": HEAD_DIM, "repeats": args.repeats, "warmup": args.warmup}
    path = os.path.join(args.out, "report.json")
    try:
        _, rows = previous_rows(path, settings, "attention") if args.resume else (None, [])
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    os.makedirs(args.out, exist_ok=True)
    done = {(row["implementation"], row["passes"]): row for row in rows}
    report = {"command": " ".join(sys.argv), "device": device_info(device), "settings": settings, "results": []}
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(args.batch, tokens, HEADS, HEAD_DIM, generator=generator).to(device, dtype).requires_grad_()
              for _ in range(3)]
    expected = attention_reference(*(t.detach().float() for t in inputs))
    doing = None
    try:
        with stop_on_signals():
            for name in ("fastdit", *SDPA):
                for passes in PASSES:
                    doing = f"{name} {passes}"
                    row = done.get((name, passes)) or {"implementation": name, "passes": passes,
                                                       **measure(name, passes, inputs, expected, args.repeats,
                                                                 args.warmup)}
                    report["results"].append(row)
                    write_text_atomic(path, json.dumps(report, indent=2) + "\n")
    except Stopped as stop:
        report["stopped"] = {"signal": str(stop), "during": doing}
        write_text_atomic(path, json.dumps(report, indent=2) + "\n")
        print(f"{parser.prog}: stopped by {stop} during {doing}; {path} holds {len(report['results'])} rows",
              file=sys.stderr)
        return stop.exit_status
    for row in report["results"]:
        print(f"{row['implementation']:>15} {row['passes']:<17} {row['status']:<8} "
              + (f"{row['time']['value'] * 1e3:.3f} ms" if row["status"] == "ok" else row["reason"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
