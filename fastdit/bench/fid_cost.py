"""FID-50K on one H100 from the roofline of Inception, against the time of sampling the 50,000 images:
``python -m fastdit.bench.fid_cost`` prints what docs/scale.md quotes (it needs torch-fidelity for the network
and diffusers for the VAE's FLOPs).

The Inception FLOPs are counted by torch's FlopCounterMode on torch-fidelity's network (convolutions and matmuls,
randomly initialised: the count does not depend on the weights) for a 256x256 image, resized to 299x299 inside
it as the ADM suite's graph does. Times are lower bounds: every FLOP at the datasheet peak.
"""
import argparse

import torch

from fastdit.bench.roofline import DATASHEET_PEAKS, total_seconds, workload_ops
from fastdit.bench.scale import FID_SAMPLES, IMAGE_SIZE, MODEL, SAMPLE_BATCH, SAMPLING_STEPS, Line, report, vae_flops
from fastdit.models.flops import named_shape

REFERENCE_IMAGES = 10_000  # ADM's VIRTUAL_imagenet256_labeled.npz; its statistics are cached after the first run
# The H100 SXM datasheet's dense peaks besides bf16: FP32 without tensor cores 67 TFLOP/s, FP64 tensor core
# 67 TFLOP/s; TF32 tensor core is half of bf16 (PyTorch runs cuDNN convolutions in TF32 by default).
FP32_PEAK = FP64_PEAK = 66.9e12
FEATURES = 2048


def inception_flops(image_size=IMAGE_SIZE) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from fastdit.evaluation.extractors import InceptionFeatures, inception_architecture

    network = InceptionFeatures(inception_architecture(), "random")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        network(torch.zeros(1, image_size, image_size, 3, dtype=torch.uint8))
    return counter.get_total_flops()


def plan(inception: int, decode_flops: int) -> list[Line]:
    peak = next(p for p in DATASHEET_PEAKS if p.name == "H100 SXM")
    bf16, tf32 = peak.tflops * 1e12, peak.tflops * 1e12 / 2
    lines = [Line("Inception", f"{inception / 1e9:.2f} GFLOP/image",
                  f"FlopCounterMode, {IMAGE_SIZE}x{IMAGE_SIZE} resized to 299x299")]
    images = FID_SAMPLES + REFERENCE_IMAGES
    for name, rate in (("TF32", tf32), ("FP32", FP32_PEAK)):
        lines.append(Line(f"evaluate: Inception, {name}", f"{images * inception / rate:.1f} s",
                          f"({FID_SAMPLES:,} + {REFERENCE_IMAGES:,} REF) x FLOP / {rate / 1e12:.1f} TFLOP/s"))
    pairs = REFERENCE_IMAGES ** 2 + FID_SAMPLES ** 2 + 2 * REFERENCE_IMAGES * FID_SAMPLES
    lines.append(Line("evaluate: precision/recall distances, FP64", f"{2 * pairs * FEATURES / FP64_PEAK:.2f} s",
                      f"2 x {pairs:.2e} pairs x {FEATURES} / {FP64_PEAK / 1e12:.1f} TFLOP/s"))
    shape = named_shape(MODEL, IMAGE_SIZE // 8)
    guided = total_seconds(workload_ops(shape, "sampling-step", SAMPLE_BATCH), peak)
    rounds = -(-FID_SAMPLES // SAMPLE_BATCH)
    sampling = rounds * (SAMPLING_STEPS * guided + SAMPLE_BATCH * decode_flops / bf16)
    lines.append(Line(f"sample: {FID_SAMPLES:,} images, 1 GPU", f"{sampling / 60:.1f} min",
                      f"{rounds} batches x ({SAMPLING_STEPS} guided steps + VAE decode), roofline bf16"))
    evaluation = images * inception / FP32_PEAK + 2 * pairs * FEATURES / FP64_PEAK
    lines.append(Line("evaluate / sample", f"{evaluation / sampling:.2%}", "FP32 Inception + distances"))
    return lines


def main(argv=None) -> int:
    argparse.ArgumentParser(prog="python -m fastdit.bench.fid_cost", description=__doc__.splitlines()[0]).parse_args(
        argv)
    print(report(plan(inception_flops(), vae_flops()[1])), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
