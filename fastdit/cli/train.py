"""`fastdit train`: train a DiT (one process, or many under torchrun)."""
import dataclasses
import math
import os

import torch

from fastdit import distributed
from fastdit.cli import options
from fastdit.reference import BLOCK_DESIGNS
from fastdit.train import run_folder
from fastdit.train.trainer import PRESETS, TrainConfig, Trainer

PRECISIONS = ("auto", "bf16", "fp32")
# The flags default to None, so that a --preset's values stand unless a flag is given; their help states
# TrainConfig's defaults, which apply without a preset.
DEFAULTS = {field.name: field.default for field in dataclasses.fields(TrainConfig)}


def add_arguments(parser):
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a ready configuration (flags override it; its "
                        "values replace the defaults below)")
    parser.add_argument("--out", required=True, help="run directory: checkpoints, log.jsonl, model/ (resumed if present)")
    parser.add_argument("--model", help=f"DiT-S/2 ... DiT-XL/8 (default {DEFAULTS['model']})")
    parser.add_argument("--block", choices=BLOCK_DESIGNS,
                        help=f"the paper's block design (default {DEFAULTS['block']})")
    parser.add_argument("--data", help="'digits', a directory of latent shards (fastdit encode), or with --pixel an "
                                       f"image folder (default {DEFAULTS['data']})")
    parser.add_argument("--pixel", action="store_true", default=None, help="train on images, not latents")
    parser.add_argument("--image-size", type=int, help="image size in pixels (a latent model's inputs are 1/8 of it; "
                        f"default {DEFAULTS['image_size']})")
    parser.add_argument("--global-batch-size", type=int, help="images per optimizer step over all processes "
                        f"(default {DEFAULTS['global_batch_size']})")
    parser.add_argument("--lr", type=float, help=f"AdamW's constant learning rate (default {DEFAULTS['lr']:g})")
    parser.add_argument("--steps", type=int, help="optimizer steps of the whole run; a finished run rerun with more "
                        f"continues (default {DEFAULTS['steps']})")
    parser.add_argument("--ema-decay", type=float, help="decay of the exponential moving average of the weights, "
                        f"which is the model sampled from (default {DEFAULTS['ema_decay']})")
    parser.add_argument("--precision", choices=PRECISIONS, help="auto: bf16 autocast on GPU, fp32 elsewhere "
                        f"(default {DEFAULTS['precision']})")
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None, help="recompute each block's "
                        "activations in the backward pass: less memory, one more forward per step (default: off)")
    parser.add_argument("--compile", action="store_true", default=None, help="run the model through torch.compile "
                        "(default: off)")
    parser.add_argument("--ckpt-every", type=int, help=f"steps between checkpoints (default {DEFAULTS['ckpt_every']})")
    parser.add_argument("--log-every", type=int, help="steps between the records of OUT/log.jsonl (default "
                        f"{DEFAULTS['log_every']})")
    parser.add_argument("--seed", type=int, help="draws the initial weights, the data order, the timesteps and the "
                        f"noise (default {DEFAULTS['seed']})")
    parser.add_argument("--skip-nonfinite", type=int, metavar="N",
                        help="skip up to N updates whose loss or gradients are not finite (counted in log.jsonl) "
                             "and stop at the next; costs one host sync per step. Default: stop at the first "
                             "non-finite loss")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="DataLoader processes reading batches ahead (default: 4 for latent shards, 0 for data "
                             "held in memory)")
    parser.add_argument("--skip-data-check", dest="check_data", action="store_false", default=None,
                        help="do not check the latent shards at start (their sha256 against the manifest, then NaN "
                             "and infinity: a full read of the set, shared by the ranks); a loss that goes "
                             "non-finite still names the bad samples of its batch")
    options.add_device_argument(parser, options.TORCHRUN_DEVICE_HELP)
    parser.add_argument("--deterministic", action="store_true", help="deterministic kernels (exact reruns on CPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (the success line is printed)")


def config_from_args(args) -> TrainConfig:
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    values = dict(PRESETS[args.preset]) if args.preset else {}
    values.update({name: value for name, value in vars(args).items() if name in fields and value is not None})
    if values.get("model") is None and values.get("model_config") is None:
        raise ValueError("--model: pass a model name (DiT-S/2 ... DiT-XL/8) or --preset digits")
    if args.model is not None:
        values["model_config"] = None
    steps = (1, options.MAX_STEPS)
    ranges = {"image_size": (1, options.MAX_IMAGE_SIZE), "global_batch_size": (1, options.MAX_BATCH), "steps": steps,
              "ckpt_every": steps, "log_every": steps, "seed": options.SEED_RANGE, "workers": (0, options.MAX_WORKERS),
              "skip_nonfinite": (0, options.MAX_STEPS)}
    for name, (low, high) in ranges.items():
        options.check_range(f"--{name.replace('_', '-')}", values.get(name), low, high)
    if not (math.isfinite(values.get("lr", 1.0)) and values.get("lr", 1.0) > 0):
        raise ValueError(f"--lr: expected a finite number > 0, got {values['lr']}")
    if not 0 <= values.get("ema_decay", 0.0) < 1:
        raise ValueError(f"--ema-decay: expected a value in [0, 1), got {values['ema_decay']}")
    return TrainConfig(**values)


def kept(args) -> str:
    """What a stopped run kept, for the line that says so: its newest checkpoint."""
    paths = run_folder.checkpoint_paths(os.path.join(args.out, run_folder.CHECKPOINTS))
    if not paths:
        return f"no checkpoint yet in {args.out}"
    return f"the checkpoint of step {int(os.path.basename(paths[-1])[:-3])}, {paths[-1]}"


def run(args):
    config = config_from_args(args)
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    with distributed.launch(args.device) as process:
        trainer = Trainer(config, process)
        trainer.run(progress=not args.no_progress)
        if process.is_main:
            model = os.path.join(config.out, "model")
            if trainer.first_step == config.steps:
                print(f"fastdit train: {config.out} had already finished its {config.steps} steps; the EMA model is "
                      f"in {model}")
            else:
                print(f"fastdit train: trained steps {trainer.first_step + 1} to {config.steps}; wrote the EMA model "
                      f"to {model} and checkpoints to {trainer.checkpoint_dir}")
    return 0
