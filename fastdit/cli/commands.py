"""The `fastdit` command."""
import argparse
import importlib
import shlex
import signal
import sys

from fastdit import distributed
from fastdit.stopping import stop_on_signals

# name -> (module in fastdit.cli, help). A subcommand's module is imported only when it runs or shows its --help,
# so `fastdit sample` loads neither the trainer nor the benchmarks.
COMMANDS = {
    "demo": ("demo", "check a model against the reference and time it"),
    "sample": ("sample", "sample images from a DiT (torchrun: many GPUs)"),
    "train": ("train", "train a DiT (torchrun: many GPUs)"),
    "encode": ("encode", "precompute VAE latents of an image folder for training"),
    "digits-accuracy": ("digits", "how recognisable sampled digits are"),
    "evaluate": ("evaluate", "FID, sFID, Inception Score, precision and recall as the ADM suite (torchrun: many GPUs)"),
    "bench": ("bench", "images/s and MFU against the baselines; writes report.json/.md/.png"),
    "export": ("export", "compile the guided denoiser into an AOTInductor .pt2 package for the C++ runner fastdit-run"),
    "convert": ("convert", "convert a DiT's weights between the release's, fastdit's and diffusers' formats"),
    "ablation": ("ablation", "train the paper's four block designs on the digits and compare them (docs/ablation)"),
}


class ArgumentParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit code 2, as the commands' own errors."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# Where each command that resumes says what a stopped run kept: (module in fastdit.cli, its function of args).
KEPT = {"train": ("train", "kept"), "encode": ("encode", "kept"), "sample": ("sample_output", "kept"),
        "evaluate": ("evaluate", "kept")}


def _stopped_line(command, argv, args, signum) -> str:
    """One line: which signal stopped the command and, for the commands that resume, what it kept and how."""
    line = f"fastdit {command}: stopped by {signal.Signals(signum).name}"
    if command not in KEPT:
        return line
    module, function = KEPT[command]
    kept = getattr(importlib.import_module(f"fastdit.cli.{module}"), function)(args)
    return f"{line}; kept {kept}; to resume, run the same command again: fastdit {shlex.join(argv)}"


def subcommand(name):
    """The module of subcommand ``name``: its ``add_arguments(parser)`` and ``run(args)``."""
    return importlib.import_module(f"fastdit.cli.{COMMANDS[name][0]}")


def build_parser(names=tuple(COMMANDS)) -> ArgumentParser:
    """The `fastdit` parser, with the flags of the subcommands in ``names`` (every one listed, with its help). A
    subcommand's description is its help as a sentence, unless its module sets a longer one."""
    parser = ArgumentParser(prog="fastdit", description="Fast, checked DiT (Peebles & Xie, 2023).")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (_, help) in COMMANDS.items():
        subparser = commands.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
        if name in names:
            subcommand(name).add_arguments(subparser)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    # The subcommand is the first argument: `fastdit` itself takes no flags but --help.
    args = build_parser(argv[:1]).parse_args(argv)
    # The handlers stay until the error is reported: a stopped command's workers end as its traceback is freed.
    with stop_on_signals():
        try:
            return subcommand(args.command).run(args)
        except KeyboardInterrupt as stop:  # Stopped, or a KeyboardInterrupt raised before the handlers were in place
            signum = getattr(stop, "signum", signal.SIGINT)
            if distributed.is_main_process():
                print(_stopped_line(args.command, argv, args, signum), file=sys.stderr, flush=True)
            return 128 + signum  # the shells' convention: 130 for SIGINT, 143 for SIGTERM
        # CheckpointError is a ValueError; OSError: an unwritable --out, a full disk.
        except (ValueError, TypeError, KeyError, ImportError, OSError) as error:
            message = error.args[0] if isinstance(error, KeyError) and error.args else error  # KeyError's str() quotes
            if distributed.is_main_process():  # under torchrun every rank fails alike: one line, not one per rank
                print(f"fastdit {args.command}: error: {message}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
