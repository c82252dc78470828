"""``python -m fastdit.tools.tune``: time every candidate launch configuration of a forward and
backward of each fast model on this GPU (``tuning.choose``) and write what was chosen as JSON.

Here, not in kernels/: it builds the real models, which stand above the kernels. And not tuning.py's
``__main__``: tuning.py is imported with fastdit, and running an imported module as ``__main__`` would give
two copies of its choice cache.
"""
import argparse
import os
import sys

import torch

from fastdit.kernels import runtime, tuning

IMAGE_SIZES = (256, 512)
DTYPES = ("bf16", "fp16", "fp32", "amp")


def _fail(message: str):
    print(f"python -m fastdit.tools.tune: {message}", file=sys.stderr)
    raise SystemExit(2)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        _fail(message)


def parse_args(argv=None) -> argparse.Namespace:
    from fastdit import DiT_models

    parser = _Parser(prog="python -m fastdit.tools.tune",
                     description="Tune the kernels' launch configurations for this GPU and write the choices as JSON.")
    parser.add_argument("--models", nargs="+", default=["DiT-XL/2"])
    parser.add_argument("--image-size", nargs="+", type=int, default=[256])
    parser.add_argument("--dtype", nargs="+", default=["bf16"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--json", required=True, help="where to write the report")
    args = parser.parse_args(argv)
    for name, values, valid in (("--models", args.models, tuple(DiT_models)), ("--image-size", args.image_size,
                                IMAGE_SIZES), ("--dtype", args.dtype, DTYPES)):
        unknown = [value for value in values if value not in valid]
        if unknown:
            _fail(f"{name}: unknown {', '.join(map(str, unknown))}; valid: {', '.join(map(str, valid))}")
    if args.batch < 1:
        _fail(f"--batch: must be a positive integer, got {args.batch}")
    return args


def _run_model(name: str, image_size: int, dtype: str, batch: int, device: torch.device) -> None:
    """One forward and backward of the fast model with perturbed weights (adaLN-Zero's zero
    initialisation would leave most branches, and so most launches' data, trivial)."""
    from fastdit import DiT_models

    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    model = DiT_models[name](input_size=image_size // 8).to(device, half or torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter), alpha=0.02)
    x = torch.randn(batch, model.in_channels, image_size // 8, image_size // 8, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    with torch.autocast("cuda", torch.bfloat16, enabled=dtype == "amp"):
        out = model(x, t, y)
    out.float().square().mean().backward()
    torch.cuda.synchronize(device)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        _fail("needs a CUDA GPU to time the kernels on, and torch.cuda.is_available() is False")
    import triton

    os.environ["FASTDIT_AUTOTUNE"] = "1"
    device = torch.device("cuda", torch.cuda.current_device())
    runs = []
    for name in args.models:
        for image_size in args.image_size:
            for dtype in args.dtype:
                _run_model(name, image_size, dtype, args.batch, device)
                runs.append({"model": name, "image_size": image_size, "dtype": dtype, "batch": args.batch})
    tuning.write_json(args.json, {"device": runtime.gpu_spec(device).name, "triton": triton.__version__,
                           "torch": torch.__version__, "runs": runs, "choices": tuning.report()})
    print(f"wrote {len(tuning.report())} tuned launch configurations to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
