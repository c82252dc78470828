"""`python -m fastdit.bench.fp8_numerics`: how far the FP8 model is from the bf16 fast model and from the fp32
reference, per timestep, on a DiT with perturbed weights (a fresh adaLN-Zero model computes the identity).

The CPU runs ``torch._scaled_mm`` with the same scales as a GPU, so the figures are the quantization's, not a
GPU's rounding (which differs in the accumulation order only). Printed as a markdown table.
"""
import argparse
import copy

import torch

import fastdit
from fastdit import reference
from fastdit.models.parity import perturb_, relative_max_error

TIMESTEPS = (0, 250, 500, 999)


def fp8_errors(model_name="DiT-XL/2", input_size=8, batch=2, timesteps=TIMESTEPS, seed=0) -> list[dict]:
    """Per timestep: relative max error of the FP8 model against the bf16 fast model and against the fp32
    reference, and the bf16 model's own against the reference (the scale FP8 is judged on). ``seed`` fixes the
    initial weights too (drawn from torch's global generator, which is restored afterwards): the figures repeat."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ref = perturb_(reference.DiT_models[model_name](input_size=input_size), seed=seed).eval()
    fast = fastdit.DiT_models[model_name](input_size=input_size).eval()
    fast.load_state_dict(ref.state_dict())
    bf16 = fast.to(torch.bfloat16)
    quantized = copy.deepcopy(bf16).quantize("fp8")
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, ref.in_channels, input_size, input_size, generator=generator)
    labels = torch.randint(0, ref.num_classes, (batch,), generator=generator)
    rows = []
    with torch.no_grad():
        for step in timesteps:
            t = torch.full((batch,), step)
            expected, half, fp8 = ref(x, t, labels), bf16(x, t, labels), quantized(x, t, labels)
            rows.append({"t": step, "fp8_vs_bf16": relative_max_error(fp8, half),
                         "fp8_vs_reference": relative_max_error(fp8, expected),
                         "bf16_vs_reference": relative_max_error(half, expected)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdit.bench.fp8_numerics", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="DiT-XL/2", choices=list(fastdit.DiT_models), metavar="MODEL")
    parser.add_argument("--input-size", type=int, default=8, help="latent side (default 8: 16 tokens, fast on a CPU)")
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args(argv)
    rows = fp8_errors(args.model, args.input_size, args.batch)
    print(f"{args.model}, latent {args.input_size}x{args.input_size}, batch {args.batch}, perturbed weights "
          "(relative max error):\n")
    print("| t | FP8 vs bf16 fast | FP8 vs fp32 reference | bf16 fast vs fp32 reference |")
    print("| ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['t']} | {row['fp8_vs_bf16']:.2e} | {row['fp8_vs_reference']:.2e} | "
              f"{row['bf16_vs_reference']:.2e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
