"""The quality-against-speed table of docs/caching.md: feature caches on the bundled digits model, on this CPU.

    python -m fastdit.bench.caching_study [--samples 1000] [--batch 500] [--methods fora ...]
        [--settings taylorseer:interval=5,order=2 ...] [--json out.json]

For exact sampling and each cache setting, with the model's sampling settings (fastdit/assets/digits/sampling.json:
DDIM, 50 steps) at guidance 4 and without guidance (1), from the same per-image noise (seed 0, 100 images per
class): the blocks run per image (a guided forward's two halves count once), the wall time against exact
sampling (the fastest of ``--timing-rounds`` runs of ``--timing-samples`` images each, cached and exact
alternating so that both see the same load) beside its floor, the block count's ratio (the blocks are most but
not all of a step's work, so no honest timing falls below it), the digits SVC's accuracy (``fastdit.digits``), the Fréchet distance between the
samples and the 1,797 real digits in the SVC's feature space (the 8x8 area-averaged image on the 0..16 scale,
64 numbers) and the PSNR of the uint8 images against exact sampling's from the same noise.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

import fastdit
from fastdit.diffusion.caching import (
    FORA,
    METHODS,
    FirstBlockCache,
    TaylorSeer,
    make_config,
)
from fastdit.bench.timing import noise_warnings
from fastdit.digits import conditioned_class_accuracy, to_digit_features
from fastdit.evaluation.metrics import frechet_distance
from fastdit.images import to_uint8

DIGITS = os.path.join(os.path.dirname(fastdit.__file__), "assets", "digits")
SETTINGS = [None, FORA(interval=2), FORA(interval=3), FORA(interval=4), TaylorSeer(interval=3, order=1),
            TaylorSeer(interval=4, order=1), TaylorSeer(interval=4, order=2), TaylorSeer(interval=5, order=2),
            TaylorSeer(interval=6, order=2), FirstBlockCache(threshold=0.05), FirstBlockCache(threshold=0.1),
            FirstBlockCache(threshold=0.2)]


def gaussian(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mean and covariance of a Gaussian fitted to ``features`` (one row each): ``frechet_distance``'s input."""
    return features.mean(0), np.cov(features, rowvar=False)


def psnr(images: np.ndarray, reference: np.ndarray) -> float:
    mse = float(((images.astype(np.float64) - reference.astype(np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def describe(config) -> str:
    if config is None:
        return "exact"
    settings = ", ".join(f"{name}={value}" for name, value in vars(config).items())
    return f"{config.method} ({settings})"


def parse_setting(text: str):
    """``method:name=value,...`` (``fbcache:threshold=0.1``; ``fora`` alone for the defaults) as a cache config."""
    method, _, rest = text.partition(":")
    settings = {}
    for item in filter(None, rest.split(",")):
        name, equals, value = item.partition("=")
        if not equals or not name.strip():
            raise ValueError(f"--settings: expected method:name=value,..., got {text!r}")
        number = float(value)  # a bad number is float's ValueError, which names the text
        settings[name.strip()] = int(number) if number.is_integer() and "." not in value else number
    return make_config(method.strip(), **settings)


def _setting_argument(text):
    try:
        return parse_setting(text)
    except (ValueError, TypeError) as error:  # argparse would otherwise hide the message behind "invalid value"
        raise argparse.ArgumentTypeError(str(error)) from None


def run(model, labels, config, cfg_scale, steps, batch):
    """Samples as uint8 images, seconds, and blocks run per image."""
    counts = []
    hooks = [block.register_forward_hook(lambda *_: counts.append(1)) for block in model.blocks]
    images, start = [], time.perf_counter()
    try:
        for first in range(0, len(labels), batch):
            latents = fastdit.sample(model, labels[first:first + batch], sampler="ddim", steps=steps,
                                     cfg_scale=cfg_scale, seed=0, first_index=first, cache=config)
            images.append(to_uint8(latents)[..., 0])
    finally:
        for hook in hooks:
            hook.remove()
    seconds = time.perf_counter() - start
    return np.concatenate(images), seconds, len(counts) / math.ceil(len(labels) / batch)


def timed_ratio(model, labels, config, cfg_scale, steps, batch, rounds) -> float:
    """Cached over exact sampling's seconds, each the fastest of ``rounds`` runs, the two alternating: a machine
    busy for a while slows both, and the minimum is the run least disturbed."""
    exact, cached = [], []
    for _ in range(rounds):
        exact.append(run(model, labels, None, cfg_scale, steps, batch)[1])
        cached.append(run(model, labels, config, cfg_scale, steps, batch)[1])
    return min(cached) / min(exact)


def study(samples=1000, batch=500, settings=SETTINGS, cfg_scales=None, timing_samples=100, timing_rounds=3):
    """The rows; ``cfg_scales``: the guidance scales measured (default: the model's, then 1, no guidance)."""
    from sklearn.datasets import load_digits

    model = fastdit.load(DIGITS)
    with open(os.path.join(DIGITS, "sampling.json")) as file:
        sampling = json.load(file)
    labels = [index % sampling["num_classes"] for index in range(samples)]
    real = gaussian(load_digits().data)
    rows, exact = [], {}
    for config in settings:
        row = {"setting": describe(config)}
        for cfg_scale in cfg_scales or (sampling["cfg_scale"], 1.0):
            images, _, blocks = run(model, labels, config, cfg_scale, sampling["steps"], batch)
            if config is None:
                exact[cfg_scale] = images, blocks
            timed = labels[:timing_samples]
            ratio = 1.0 if config is None else timed_ratio(model, timed, config, cfg_scale, sampling["steps"],
                                                             min(batch, len(timed)), timing_rounds)
            key = f"cfg{cfg_scale:g}"
            row.update({f"{key}_blocks_per_image": blocks, f"{key}_time_ratio": ratio,
                        f"{key}_block_floor": blocks / exact[cfg_scale][1],
                        f"{key}_accuracy": conditioned_class_accuracy(images, np.array(labels)),
                        f"{key}_psnr": psnr(images, exact[cfg_scale][0]),
                        f"{key}_frechet": frechet_distance(*gaussian(to_digit_features(images)), *real)})
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"samples": samples, "batch": batch, "sampling": sampling, "cfg_scales": cfg_scales,
            "timing_samples": timing_samples, "timing_rounds": timing_rounds, "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg()[0], "rows": rows}


def markdown(result) -> str:
    """The table: per guidance scale measured (the guided first), time vs exact, accuracy, Fréchet distance, PSNR."""
    keys = [key[:-len("_accuracy")] for key in result["rows"][0] if key.endswith("_accuracy")]
    keys.sort(key=lambda key: key == "cfg1")  # the guided scale first, as in docs/caching.md
    header = ["setting", "blocks per image" + (f" ({' / '.join(keys)})" if len(keys) > 1 else "")]
    for what in ("time vs exact ({}) (floor)", "accuracy {}", "Fréchet {}", "PSNR {} (dB)"):
        header += [what.format(key) for key in keys]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for row in result["rows"]:
        # FirstBlockCache's count depends on the guidance; "blocks_per_image": the rows logged before the
        # count was kept per scale, which held the last scale's (cfg1) count.
        blocks = [row.get(f"{key}_blocks_per_image", row.get("blocks_per_image")) for key in keys]
        cells = [row["setting"], " / ".join(f"{count:g}" for count in dict.fromkeys(blocks))]
        cells += [f"{row[key + '_time_ratio']:.2f} ({row[key + '_block_floor']:.2f})" for key in keys]
        cells += [f"{100 * row[key + '_accuracy']:.1f}%" for key in keys]
        cells += [f"{row[key + '_frechet']:.2f}" for key in keys]
        cells += ["∞" if math.isinf(row[key + "_psnr"]) else f"{row[key + '_psnr']:.1f}" for key in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000, help="images per setting (100 per class at 1000)")
    parser.add_argument("--batch", type=int, default=500, help="images per sample call")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--timing-samples", type=int, default=100, help="images of each timed run (default 100)")
    parser.add_argument("--timing-rounds", type=int, default=3, help="timed runs of each cache and of exact "
                        "sampling, alternating; the fastest of each gives the ratio (default 3)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="the cache methods whose settings to measure (exact sampling always runs, first)")
    parser.add_argument("--settings", nargs="+", type=_setting_argument, metavar="METHOD:NAME=VALUE,...",
                        help="measure these settings instead of the study's list (with --methods: those of the "
                        "methods named), e.g. taylorseer:interval=5,order=2 fbcache:threshold=0.1")
    parser.add_argument("--cfg-scales", nargs="+", type=float, metavar="S",
                        help="guidance scales to measure (default: the model's, 4, then 1: no guidance)")
    parser.add_argument("--json", help="also write the measurements here")
    args = parser.parse_args(argv)
    if args.samples < 2 or min(args.batch, args.threads, args.timing_samples, args.timing_rounds) < 1:
        raise SystemExit(f"caching_study: --samples must be >= 2 and --batch, --threads, --timing-samples, "
                         f"--timing-rounds >= 1, got {args.samples}, {args.batch}, {args.threads}, "
                         f"{args.timing_samples}, {args.timing_rounds}")
    torch.set_num_threads(args.threads)
    chosen = [None] + args.settings if args.settings else SETTINGS
    settings = [config for config in chosen if config is None or config.method in args.methods]
    if args.cfg_scales and min(args.cfg_scales) < 1:
        raise SystemExit(f"caching_study: --cfg-scales must be >= 1, got {args.cfg_scales}")
    result = study(args.samples, args.batch, settings, args.cfg_scales, args.timing_samples, args.timing_rounds)
    for line in noise_warnings({}):  # the load while the study ran: its time ratios then measure that load too
        print(f"caching_study: warning: {line}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=1)
    print(markdown(result))


if __name__ == "__main__":
    main()
