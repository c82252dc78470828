"""ImageNet-256 end to end on 8 H100s, as numbers: what docs/scale.md quotes, computed here so that the
page cannot drift from its sources. ``python -m fastdit.bench.scale`` prints them; tests/bench/test_scale.py
checks that docs/scale.md holds this output.

Nothing here is a GPU measurement. Times come from the roofline (``fastdit.bench.roofline``: every op at
the datasheet peak, ops one after another, so a lower bound on the time) or, for the VAE, from its FLOP
count at an assumed fraction of peak. Measured inputs (CPU decode rates, memory) are cited where they were
measured, in docs/data.md. Change an assumption here, and the page with it.
"""
import argparse
import dataclasses
import math

from fastdit.bench.roofline import (
    DATASHEET_PEAKS,
    FP32,
    parameter_count,
    total_seconds,
    training_ops,
    workload_ops,
)
from fastdit.models.flops import named_shape

IMAGENET_TRAIN_IMAGES = 1_281_167  # ILSVRC-2012's training set
NUM_CLASSES = 1000
GPUS = 8
IMAGE_SIZE = 256
LATENT_CHANNELS, DOWNSAMPLING = 4, 8  # the SD VAE (stabilityai/sd-vae-ft-ema)
LATENT_BYTES = {"fp16": 2, "fp32": 4}
SHARD_SIZE = 10_000  # fastdit encode's default --shard-size
# The SD VAE's architecture (its config.json): enough to count its FLOPs on the meta device.
SD_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": LATENT_CHANNELS,
          "norm_num_groups": 32, "sample_size": IMAGE_SIZE, "down_block_types": ("DownEncoderBlock2D",) * 4,
          "up_block_types": ("UpDecoderBlock2D",) * 4}
# An assumed fraction of peak for the VAE's convolutions (cuDNN): a guess, until a GPU measures it.
VAE_EFFICIENCY = 0.4
# JPEG decode + center_crop_arr per CPU worker at ImageNet-like 500x375 images, measured on this project's
# 2-core machine (docs/data.md, "Speed"): 30 img/s under load, 100 img/s when quieter.
DECODE_RATES = (30, 100)
WORKERS_PER_GPU = 8  # fastdit encode's default --workers: min(8, CPU count)
# The release's recipe: global batch 256; the paper trains DiT-XL/2 for 7M steps, and reports 400K-step
# ablations.
GLOBAL_BATCH = 256
STEPS = (400_000, 7_000_000)
MODEL = "DiT-XL/2"
# FID-50K: 50,000 samples, 250 DDPM steps with classifier-free guidance, at this --batch-size per GPU.
FID_SAMPLES, SAMPLING_STEPS, SAMPLE_BATCH = 50_000, 250, 64
# Training reads through fastdit.train.data: each process and each worker caches two epochs' orders
# (N int64 each); the trainer's default --workers for latent shards is 4 (at most the CPUs).
EPOCH_ORDERS, TRAIN_WORKERS, PREFETCH = 2, 4, 4
# NVLink 4 on the H100 SXM: 900 GB/s per GPU, both directions together (the H100 datasheet); 450 one way.
NVLINK_ONE_WAY = 450e9


def vae_flops(image_size: int = IMAGE_SIZE) -> tuple[int, int]:
    """FLOPs of the SD VAE's encode of one image and decode of one latent, counted by torch's
    FlopCounterMode on the meta device (convolutions and matmuls; not norms or activations)."""
    import torch
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        vae = AutoencoderKL(**SD_VAE)
    counts = []
    for call, shape in ((vae.encode, (1, 3, image_size, image_size)),
                        (vae.decode, (1, LATENT_CHANNELS, image_size // DOWNSAMPLING, image_size // DOWNSAMPLING))):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            call(torch.empty(shape, device="meta"))
        counts.append(counter.get_total_flops())
    return counts[0], counts[1]


@dataclasses.dataclass
class Line:
    name: str
    value: str
    how: str


def plan(encode_flops: int, decode_flops: int) -> list[Line]:
    peak = next(p for p in DATASHEET_PEAKS if p.name == "H100 SXM")
    tf32 = peak.tflops * 1e12 / 2  # dense TF32 is half of dense bf16 on the H100
    bf16 = peak.tflops * 1e12
    n = IMAGENET_TRAIN_IMAGES
    latent = IMAGE_SIZE // DOWNSAMPLING
    latent_elements = LATENT_CHANNELS * latent * latent
    lines = []

    def add(name, value, how):
        lines.append(Line(name, value, how))

    # --- encode -----------------------------------------------------------------------------
    sample_bytes = 2 * latent_elements * LATENT_BYTES["fp16"] + 8  # latents, flipped, an int64 label
    add("encode: shards", f"{math.ceil(n / SHARD_SIZE)}", f"ceil({n:,} / --shard-size {SHARD_SIZE:,})")
    add("encode: disk, fp16", f"{n * sample_bytes / 1e9:.1f} GB",
        f"{n:,} x (2 x {latent_elements:,} x 2 B + 8 B label)")
    add("encode: disk, fp32", f"{n * (2 * latent_elements * 4 + 8) / 1e9:.1f} GB", "the same at 4 B")
    add("encode: VAE encoder", f"{encode_flops / 1e9:.1f} GFLOP/image", "FlopCounterMode, meta device")
    total = 2 * n * encode_flops  # both flips
    add("encode: VAE, fp32 (TF32)", f"{total / (GPUS * tf32 * VAE_EFFICIENCY) / 60:.1f} min",
        f"2 x {n:,} x FLOP / ({GPUS} x {tf32 / 1e12:.1f} TFLOP/s x {VAE_EFFICIENCY})")
    add("encode: VAE, bf16", f"{total / (GPUS * bf16 * VAE_EFFICIENCY) / 60:.1f} min",
        f"2 x {n:,} x FLOP / ({GPUS} x {bf16 / 1e12:.1f} TFLOP/s x {VAE_EFFICIENCY})")
    for rate in DECODE_RATES:
        add(f"encode: JPEG decode at {rate} img/s/worker", f"{n / (GPUS * WORKERS_PER_GPU * rate) / 60:.1f} min",
            f"{n:,} / ({GPUS} GPUs x {WORKERS_PER_GPU} workers x {rate})")

    # --- training memory --------------------------------------------------------------------
    local = GLOBAL_BATCH // GPUS
    order = EPOCH_ORDERS * n * 8
    add("train: epoch orders per process", f"{order / 1e6:.1f} MB", f"{EPOCH_ORDERS} x {n:,} x 8 B")
    add("train: epoch orders per rank with workers", f"{order * (1 + TRAIN_WORKERS) / 1e6:.1f} MB",
        f"the trainer and its {TRAIN_WORKERS} workers")
    batch_bytes = 2 * local * latent_elements * 4 + 2 * local * 8  # x and noise float32, y and t int64
    in_flight = (TRAIN_WORKERS * PREFETCH + 1) * batch_bytes
    add("train: batches in flight per rank", f"{in_flight / 1e6:.1f} MB",
        f"({TRAIN_WORKERS} workers x prefetch {PREFETCH} + 1) x {batch_bytes / 1e6:.2f} MB")
    add("train: page cache per node (shared)", f"{n * sample_bytes / 1e9:.1f} GB", "the fp16 shards, mapped")
    add("train: the old loader, per process", f"{n * 2 * latent_elements * 4 / 1e9:.1f} GB",
        "every latent and flip in float32")
    add("train: the old loader, per node", f"{GPUS * n * 2 * latent_elements * 4 / 1e9:.0f} GB", f"{GPUS} processes")

    # --- training time ----------------------------------------------------------------------
    shape = named_shape(MODEL, latent)
    step = total_seconds(training_ops(shape, local), peak)
    add(f"train: {MODEL} step, local batch {local}", f"{step * 1e3:.2f} ms",
        f"roofline, {peak.name}, autocast bf16, AdamW")
    add("train: images/s, 8 GPUs", f"{GLOBAL_BATCH / step:,.0f}", f"{GLOBAL_BATCH} / step")
    row = 2 * latent_elements * LATENT_BYTES["fp16"]
    add("train: shard reads, 8 GPUs", f"{GLOBAL_BATCH / step * row / 1e6:.0f} MB/s",
        f"images/s x {row / 1e3:.1f} kB (latents and flipped rows), before the page cache holds the set")
    parameters = parameter_count(shape)
    allreduce = 2 * (GPUS - 1) / GPUS * parameters * FP32 / NVLINK_ONE_WAY
    add("train: gradient all-reduce if not overlapped", f"{allreduce * 1e3:.2f} ms",
        f"ring: 2 x {GPUS - 1}/{GPUS} x {parameters / 1e6:.1f}M x 4 B / 450 GB/s")
    for steps in STEPS:
        for label, seconds, how in (("", step, "steps x step time"),
                                    (", all-reduce not overlapped", step + allreduce, "steps x (step + all-reduce)")):
            add(f"train: {steps:,} steps{label}", f"{steps * seconds / 86400:.2f} days",
                f"{steps * seconds / 3600:,.1f} hours: {how}")

    # --- sampling ---------------------------------------------------------------------------
    guided = total_seconds(workload_ops(shape, "sampling-step", SAMPLE_BATCH), peak)
    rounds = math.ceil(FID_SAMPLES / (GPUS * SAMPLE_BATCH))
    add(f"sample: guided step, batch {SAMPLE_BATCH}", f"{guided * 1e3:.2f} ms", "roofline: the model at 2 x batch, bf16")
    add("sample: VAE decoder", f"{decode_flops / 1e9:.1f} GFLOP/image", "FlopCounterMode, meta device")
    decode = SAMPLE_BATCH * decode_flops / (bf16 * VAE_EFFICIENCY)
    add(f"sample: VAE decode, batch {SAMPLE_BATCH}", f"{decode * 1e3:.1f} ms",
        f"bf16 at {VAE_EFFICIENCY} of {bf16 / 1e12:.1f} TFLOP/s")
    sampling = rounds * (SAMPLING_STEPS * guided + decode)
    add(f"sample: {FID_SAMPLES:,} images, {SAMPLING_STEPS} steps, 8 GPUs", f"{sampling / 60:.1f} min",
        f"{rounds} batches per GPU x ({SAMPLING_STEPS} steps + decode)")
    add(f"sample: samples.npz of {FID_SAMPLES:,}", f"{FID_SAMPLES * IMAGE_SIZE * IMAGE_SIZE * 3 / 1e9:.2f} GB",
        f"{FID_SAMPLES:,} x {IMAGE_SIZE}x{IMAGE_SIZE}x3 uint8")
    return lines


def report(lines: list[Line]) -> str:
    width = max(len(line.name) for line in lines)
    value_width = max(len(line.value) for line in lines)
    return "\n".join(f"{line.name:<{width}}  {line.value:>{value_width}}  ({line.how})" for line in lines) + "\n"


def main(argv=None) -> int:
    argparse.ArgumentParser(prog="python -m fastdit.bench.scale", description=__doc__.splitlines()[0]).parse_args(argv)
    print(report(plan(*vae_flops())), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
