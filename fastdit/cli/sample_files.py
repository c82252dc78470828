"""What a finished `fastdit sample` run writes into its staging folder's output/ (``sample_output.Staging``): one
PNG per image with --save-images, and, on rank 0, samples.npz streamed from the batch files, grid.png and
run.json last."""
import json
import os
import platform
import shutil
import time

import numpy as np
import PIL
import torch

import fastdit
from fastdit import distributed, images
from fastdit.io import write_bytes_atomic, write_npz_streamed, write_text_atomic
from fastdit.kernels import kernel_path
from fastdit.models.config import model_config

GRID_MAX_IMAGES = 100  # grid.png is a preview: a 50k-image FID run keeps the first 100
GRID_MAX_COLUMNS = 16


def png_path(plan, index):
    return os.path.join(plan.staging.output, "images", f"{index:06d}_class{plan.labels[index]}.png")


def write_pngs(plan, process, batches):
    """One PNG per image, this rank's share of the batches; PNGs a killed run wrote are kept (each is whole)."""
    os.makedirs(os.path.join(plan.staging.output, "images"), exist_ok=True)
    share = distributed.shard(len(batches), process.rank, process.world_size)
    for batch in batches[share.start:share.stop]:
        todo = [index for index in batch if not os.path.exists(png_path(plan, index))]
        if todo:
            samples = plan.staging.read_batch(batch)
            for index in todo:
                write_bytes_atomic(png_path(plan, index), images.png_bytes(samples[index - batch.start]))


def grid_columns(args):
    per_class = args.num_per_class or 1
    return per_class if args.classes is not None and 1 < per_class <= GRID_MAX_COLUMNS else None


def write_outputs(args, plan, process, batches, started, sampling_seconds, settings):
    """samples.npz, streamed from the batch files, and grid.png into the staging folder's output/, run.json
    last; ``settings``: the sampling settings as run.json records them."""
    directory, labels, staging = plan.staging.output, plan.labels, plan.staging
    if not (plan.writes_images and args.save_images):
        shutil.rmtree(os.path.join(directory, "images"), ignore_errors=True)  # a killed run's, with --save-images
    first = staging.read_batch(batches[0])
    shape, dtype = (len(labels), *first.shape[1:]), first.dtype
    samples = (shape, dtype, lambda: (staging.read_batch(batch) for batch in batches))
    if plan.writes_images:
        arrays = {"arr_0": samples, "labels": labels}  # arr_0: the images, as the ADM evaluator reads them
        preview = [staging.read_batch(batch) for batch in batches[:-(-GRID_MAX_IMAGES // args.batch_size)]]
        preview = np.concatenate(preview)[:GRID_MAX_IMAGES]
        grid = images.grid(preview, labels[:GRID_MAX_IMAGES], grid_columns(args))
        write_bytes_atomic(os.path.join(directory, "grid.png"), images.png_bytes(grid))
    else:
        arrays = {"latents": samples, "labels": labels}
    write_npz_streamed(os.path.join(directory, "samples.npz"), arrays)
    record = run_record(args, plan, process, sorted(arrays), started, sampling_seconds, settings)
    write_text_atomic(os.path.join(directory, "run.json"), json.dumps(record, indent=2) + "\n")


def run_record(args, plan, process, arrays, started, sampling_seconds, settings):
    """run.json: the flags, what they resolved to, the model, the outputs, versions and timings; ``identity``
    is the staging folder's key (a killed run's folder with that key is this finished run's)."""
    model, device, count = plan.model, process.device, len(plan.labels)
    sampled = count - plan.resumed
    return {
        "command": "fastdit sample",
        "arguments": {key: value for key, value in vars(args).items() if key not in ("command", "cache_policy")},
        "identity": plan.staging.key,
        "model": {
            "name": args.model,
            "checkpoint": os.path.abspath(args.ckpt) if args.ckpt else None,
            "weights": "random init" if args.ckpt is None else "checkpoint",
            "config": model_config(model),
            "parameters": sum(parameter.numel() for parameter in model.parameters()),
            "samples": "pixels" if plan.pixels else "latents",
        },
        "vae": None if plan.vae is None else {"path": os.path.abspath(plan.vae_path), "scale": plan.vae.scale},
        "sampling": {
            "num_samples": count,
            "image_size": plan.image_size,
            **settings,
            "batch_size": args.batch_size,
            "parallel": args.parallel,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "device": str(device),
            "world_size": process.world_size,
            "kernels": kernel_path(device),
            "attn_backend": model.attn_backend,
            "quantize": model.quantization,
            "compile": args.compile,
            "cuda_graphs": device.type == "cuda" if args.cuda_graphs is None else args.cuda_graphs,
        },
        "outputs": {
            "samples.npz": arrays,
            "grid.png": min(count, GRID_MAX_IMAGES) if plan.writes_images else None,
            "images": count if plan.writes_images and args.save_images else 0,
        },
        "versions": {
            "fastdit": fastdit.__version__,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "numpy": np.__version__,
            "pillow": PIL.__version__,
            "python": platform.python_version(),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        },
        "timings": {
            "load_seconds": plan.load_seconds,
            "sampling_seconds": sampling_seconds,
            "resumed_images": plan.resumed,  # sampled by a killed run of the same command
            "images_per_second": sampled / sampling_seconds if sampled else None,
            "total_seconds": time.perf_counter() - started,
        },
    }
