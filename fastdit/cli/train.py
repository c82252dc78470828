"""`fastdit train`: train a DiT (one process, or many under torchrun)."""
import dataclasses

import torch

from fastdit import distributed
from fastdit.cli import options
from fastdit.reference import BLOCK_DESIGNS
from fastdit.train.trainer import PRESETS, TrainConfig, Trainer

PRECISIONS = ("auto", "bf16", "fp32")


def add_arguments(parser):
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a ready configuration (flags override it)")
    parser.add_argument("--out", required=True, help="run directory: checkpoints, log.jsonl, model/ (resumed if present)")
    parser.add_argument("--model", help="DiT-S/2 ... DiT-XL/8")
    parser.add_argument("--block", choices=BLOCK_DESIGNS, help="the paper's block design (default adaln-zero)")
    parser.add_argument("--data", help="'digits', a directory of latent shards (fastdit encode), or with --pixel an "
                                       "image folder")
    parser.add_argument("--pixel", action="store_true", default=None, help="train on images, not latents")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--global-batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--ema-decay", type=float)
    parser.add_argument("--precision", choices=PRECISIONS)
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None)
    parser.add_argument("--compile", action="store_true", default=None)
    parser.add_argument("--ckpt-every", type=int)
    parser.add_argument("--log-every", type=int)
    parser.add_argument("--seed", type=int)
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
    parser.add_argument("--no-progress", action="store_true")


def config_from_args(args) -> TrainConfig:
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    values = dict(PRESETS[args.preset]) if args.preset else {}
    values.update({name: value for name, value in vars(args).items() if name in fields and value is not None})
    if values.get("model") is None and values.get("model_config") is None:
        raise ValueError("--model: pass a model name (DiT-S/2 ... DiT-XL/8) or --preset digits")
    if args.model is not None:
        values["model_config"] = None
    for name in ("global_batch_size", "steps", "ckpt_every", "log_every", "image_size"):
        if name in values and values[name] <= 0:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {values[name]}")
    if values.get("workers", 0) < 0:
        raise ValueError(f"--workers: expected a count >= 0, got {values['workers']}")
    if values.get("skip_nonfinite", 0) < 0:
        raise ValueError(f"--skip-nonfinite: expected a count >= 0, got {values['skip_nonfinite']}")
    if not 0 <= values.get("ema_decay", 0.0) < 1:
        raise ValueError(f"--ema-decay: expected a value in [0, 1), got {values['ema_decay']}")
    return TrainConfig(**values)


def run(args):
    config = config_from_args(args)
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    with distributed.launch(args.device) as process:
        Trainer(config, process).run(progress=not args.no_progress)
    return 0
