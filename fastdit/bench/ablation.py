"""The paper's block-design ablation (Peebles & Xie, section 3.2 and Figure 5) on the digits.

Trains adaLN-Zero, adaLN, cross-attention and in-context conditioning with one data set, budget
and seed (``fastdit train --preset digits --block DESIGN``), then measures each EMA model and
writes ``blocks.md`` (the table), ``blocks.json`` (every figure) and ``blocks_loss.png`` (the
training-loss curves), plus a grid of unguided samples per design:

    fastdit ablation --out docs/ablation --runs /tmp/ablation   # ~15 min on 2 CPU cores

(``python -m fastdit.ablation`` is the same command.)

Runs live in ``RUNS/DESIGN`` (default ``OUT/runs``): finished runs are reused, killed ones resume.
"""
import concurrent.futures
import functools
import json
import os
import subprocess
import sys

import numpy as np
import torch

from fastdit import images
from fastdit.bench.report import check_plotting, markdown_table
from fastdit.diffusion.sampling import default_guidance_channels, sample
from fastdit.digits import conditioned_class_accuracy
from fastdit.io import atomic_path, write_bytes_atomic, write_text_atomic
from fastdit.models.dit import load
from fastdit.models.flops import forward_macs, shape_of
from fastdit.reference import BLOCK_DESIGNS
from fastdit.train.trainer import PRESETS

PRESET = "digits"
NAMES = {"adaln-zero": "adaLN-Zero", "adaln": "adaLN", "cross-attn": "Cross-Attention", "in-context": "In-Context"}
# Measured on 100 samples, ten per class, with the bundled model's sampler (DDIM, 50 steps).
SAMPLES_PER_CLASS = 10
SAMPLER, SAMPLING_STEPS, GUIDED_SCALE = "ddim", 50, 4.0
SAMPLING_SEED = 0
# The final loss: the mean of the logged losses over the last tenth of the run.
FINAL_FRACTION = 0.1
SMOOTHING = 8  # logged points in the plot's moving average


def train(design: str, runs: str, steps: int) -> None:
    """One design's run as its own process: one thread each, so runs share the cores."""
    runs = os.path.abspath(runs)
    command = [sys.executable, "-m", "fastdit", "train", "--preset", PRESET, "--block", design,
               "--out", os.path.join(runs, design), "--steps", str(steps), "--no-progress"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    os.makedirs(runs, exist_ok=True)
    # Started outside any source checkout, so that `-m fastdit` is the installed package.
    result = subprocess.run(command, env=environment, cwd=runs)
    if result.returncode != 0:
        raise RuntimeError(f"training {design} failed (exit {result.returncode}); its error is printed above")


def read_log(run: str) -> list[dict]:
    with open(os.path.join(run, "log.jsonl")) as log:
        return [json.loads(line) for line in log if line.strip()]


def evaluate(design: str, runs: str, out: str) -> dict:
    """Size, final loss and sample quality of one trained design."""
    run = os.path.join(runs, design)
    model = load(os.path.join(run, "model"))
    log = read_log(run)
    tail = log[-max(1, round(FINAL_FRACTION * len(log))):]
    labels = torch.arange(model.num_classes).repeat_interleave(SAMPLES_PER_CLASS)
    accuracy, grids = {}, {}
    for scale in (1.0, GUIDED_SCALE):
        pixels = sample(model, labels, sampler=SAMPLER, steps=SAMPLING_STEPS, cfg_scale=scale, seed=SAMPLING_SEED,
                        guidance_channels=default_guidance_channels(model.in_channels))
        samples = images.to_uint8(pixels)
        accuracy[scale] = conditioned_class_accuracy(samples, labels.numpy())
        grids[scale] = images.grid(samples, columns=SAMPLES_PER_CLASS)
    write_bytes_atomic(os.path.join(out, f"samples_{design}.png"), images.png_bytes(grids[1.0]))
    return {
        "block": design,
        "parameters": sum(p.numel() for p in model.parameters()),
        "gmacs_per_forward": forward_macs(shape_of(model)) / 1e9,
        "steps": log[-1]["step"],
        "final_loss": float(np.mean([record["loss"] for record in tail])),
        "final_mse": float(np.mean([record["mse"] for record in tail])),
        "accuracy_unguided": accuracy[1.0],
        "accuracy_guided": accuracy[GUIDED_SCALE],
        "loss_curve": [[record["step"], record["loss"]] for record in log],
    }


def markdown(results: list[dict], preset: dict) -> str:
    config = preset["model_config"]
    lines = [
        "# Block designs on the digits",
        "",
        f"The paper's four DiT block designs trained with one budget: `fastdit train --preset {PRESET} --block "
        f"DESIGN` ({config['depth']} blocks of width {config['hidden_size']}, {config['num_heads']} heads, "
        f"{config['input_size']}x{config['input_size']} pixels in {config['patch_size']}x{config['patch_size']} "
        f"patches; {results[0]['steps']} steps of batch {preset['global_batch_size']}, AdamW lr {preset['lr']}, "
        f"EMA {preset['ema_decay']}; same seed, so the same batches, timesteps and noise for every design). "
        "Made by `python -m fastdit.ablation --out docs/ablation --runs /tmp/ablation`.",
        "",
        f"*Final loss*: mean training loss (eps MSE + variational bound) over the last {FINAL_FRACTION:.0%} of "
        f"steps. *Accuracy*: the share of {SAMPLES_PER_CLASS * 10} samples ({SAMPLES_PER_CLASS} per class, "
        f"{SAMPLER.upper()} {SAMPLING_STEPS} steps, EMA weights) that an SVC trained on the real digits assigns "
        f"to the class they were conditioned on, without guidance and with guidance scale {GUIDED_SCALE:g}. "
        "*MMACs*: multiply-accumulates of one forward per image (`fastdit.models.flops`).",
        "",
    ]
    rows = [[NAMES[r["block"]], f"{r['parameters'] / 1e3:.0f}k", f"{r['gmacs_per_forward'] * 1e3:.2f}",
             f"{r['final_loss']:.4f}", f"{r['final_mse']:.4f}", f"{r['accuracy_unguided']:.0%}",
             f"{r['accuracy_guided']:.0%}"] for r in results]
    lines += markdown_table(["block", "parameters", "MMACs / image", "final loss", "final eps MSE",
                             "accuracy, no guidance", f"accuracy, guidance {GUIDED_SCALE:g}"], rows)
    best = min(results, key=lambda r: r["final_loss"])
    lines += ["", f"Lowest final loss: {NAMES[best['block']]}. Training loss: `blocks_loss.png`; unguided samples "
                  "(one row per class): `samples_DESIGN.png`.", ""]
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend

    figure = Figure(figsize=(6.5, 4.2), layout="constrained")
    axis = figure.subplots()
    for result in results:
        steps, losses = np.array(result["loss_curve"]).T
        window = min(SMOOTHING, len(losses))
        smoothed = np.convolve(losses, np.ones(window) / window, mode="valid")
        axis.plot(steps[window - 1:], smoothed, label=NAMES[result["block"]])
    axis.set_yscale("log")
    axis.set_xlabel("training step")
    axis.set_ylabel(f"training loss (moving average of {SMOOTHING} logged points)")
    axis.set_title(f"DiT block designs, fastdit train --preset {PRESET}")
    axis.legend()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)


def ablate(out: str, steps: int, jobs: int, runs: str | None = None) -> list[dict]:
    """Train every block design (``jobs`` at once) and write the table, the figures and the plot to ``out``."""
    check_plotting("the ablation draws blocks_loss.png")
    runs = os.path.join(out, "runs") if runs is None else runs
    os.makedirs(out, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:  # threads that wait on training processes
        list(pool.map(functools.partial(train, runs=runs, steps=steps), BLOCK_DESIGNS))
    results = [evaluate(design, runs, out) for design in BLOCK_DESIGNS]
    write_text_atomic(os.path.join(out, "blocks.json"), json.dumps(results, indent=2) + "\n")
    write_text_atomic(os.path.join(out, "blocks.md"), markdown(results, PRESETS[PRESET]))
    plot(results, os.path.join(out, "blocks_loss.png"))
    return results
