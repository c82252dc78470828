"""The `fastdit` command."""
import argparse
import contextlib
import shlex
import signal
import sys

from fastdit.cli import ablation, bench, convert, demo, digits, encode, export
from fastdit.cli import sample as sample_cli
from fastdit.cli import sample_output
from fastdit.cli import train as train_cli
from fastdit.train import distributed


class ArgumentParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit code 2, as the commands' own errors."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM: raised in the main thread, so that the command unwinds as from Ctrl-C (its loaders
    stop their workers, its staging keeps the finished work) and ends with one line."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum, frame):
    # Later signals are ignored while the command unwinds: it only stops its workers and keeps what is done.
    for other in (signal.SIGINT, signal.SIGTERM):
        signal.signal(other, signal.SIG_IGN)
    raise Stopped(signum)


@contextlib.contextmanager
def _signals_stop():
    """SIGINT and SIGTERM raise ``Stopped`` for the block (in the main thread; elsewhere nothing changes)."""
    try:
        previous = {number: signal.signal(number, _stop) for number in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


# What a stopped run of each command that resumes has kept, described for the line that says so.
KEPT = {"train": train_cli.kept, "encode": encode.kept, "sample": sample_output.kept}


def _stopped_line(command, argv, args, signum) -> str:
    """One line: which signal stopped the command and, for the commands that resume, what it kept and how."""
    line = f"fastdit {command}: stopped by {signal.Signals(signum).name}"
    kept = KEPT.get(command)
    if kept is None:
        return line
    return f"{line}; kept {kept(args)}; to resume, run the same command again: fastdit {shlex.join(argv)}"


def main(argv=None):
    parser = ArgumentParser(prog="fastdit", description="Fast, checked DiT (Peebles & Xie, 2023).")
    commands = parser.add_subparsers(dest="command", required=True)
    demo.add_arguments(commands.add_parser("demo", help="check a model against the reference and time it"))
    sample_cli.add_arguments(commands.add_parser("sample", help="sample images from a DiT (torchrun: many GPUs)"))
    train_cli.add_arguments(commands.add_parser("train", help="train a DiT (torchrun: many GPUs)"))
    encode.add_arguments(commands.add_parser("encode", help="precompute VAE latents of an image folder for training"))
    digits.add_arguments(commands.add_parser("digits-accuracy", help="how recognisable sampled digits are"))
    bench.add_arguments(commands.add_parser("bench", help="images/s and MFU against the baselines; writes "
                                                         "report.json/.md/.png"))
    export.add_arguments(commands.add_parser("export", help="compile the guided denoiser into an AOTInductor .pt2 "
                                                           "package for the C++ runner fastdit-run"))
    convert.add_arguments(commands.add_parser("convert", help="convert a DiT's weights between the release's, "
                                                             "fastdit's and diffusers' formats"))
    ablation.add_arguments(commands.add_parser("ablation", help="train the paper's four block designs on the digits "
                                                              "and compare them (docs/ablation)"))
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    runs = {"demo": demo.run, "sample": sample_cli.run, "train": train_cli.run, "encode": encode.run,
            "digits-accuracy": digits.run, "bench": bench.run, "export": export.run, "convert": convert.run,
            "ablation": ablation.run}
    try:
        with _signals_stop():
            return runs[args.command](args)
    except KeyboardInterrupt as stop:  # Stopped, or a KeyboardInterrupt raised before the handlers were in place
        signum = getattr(stop, "signum", signal.SIGINT)
        if distributed.is_main_process():
            print(_stopped_line(args.command, argv, args, signum), file=sys.stderr, flush=True)
        return 128 + signum  # the shells' convention: 130 for SIGINT, 143 for SIGTERM
    # CheckpointError is a ValueError; OSError: an unwritable --out, a full disk.
    except (ValueError, TypeError, KeyError, ImportError, OSError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error  # KeyError's str() quotes it
        if distributed.is_main_process():  # under torchrun every rank fails alike: one line, not one per rank
            print(f"fastdit {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
