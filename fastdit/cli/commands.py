"""The `fastdit` command."""
import argparse
import sys

from fastdit.cli import ablation, bench, convert, demo, digits, encode, export
from fastdit.cli import sample as sample_cli
from fastdit.cli import train as train_cli
from fastdit.train import distributed


class ArgumentParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit code 2, as the commands' own errors."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> ArgumentParser:
    """The `fastdit` parser, a subparser per command."""
    parser = ArgumentParser(prog="fastdit", description="Fast, checked DiT (Peebles & Xie, 2023).")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name, summary):
        """A subparser whose description is its one-line summary (a command's module may set a longer one)."""
        return commands.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")

    demo.add_arguments(command("demo", "check a model against the reference and time it"))
    sample_cli.add_arguments(command("sample", "sample images from a DiT (torchrun: many GPUs)"))
    train_cli.add_arguments(command("train", "train a DiT (torchrun: many GPUs)"))
    encode.add_arguments(command("encode", "precompute VAE latents of an image folder for training"))
    digits.add_arguments(command("digits-accuracy", "how recognisable sampled digits are"))
    bench.add_arguments(command("bench", "images/s and MFU against the baselines; writes report.json/.md/.png"))
    export.add_arguments(command("export", "compile the guided denoiser into an AOTInductor .pt2 package for the "
                                           "C++ runner fastdit-run"))
    convert.add_arguments(command("convert", "convert a DiT's weights between the release's, fastdit's and "
                                             "diffusers' formats"))
    ablation.add_arguments(command("ablation", "train the paper's four block designs on the digits and compare them "
                                               "(docs/ablation)"))
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    runs = {"demo": demo.run, "sample": sample_cli.run, "train": train_cli.run, "encode": encode.run,
            "digits-accuracy": digits.run, "bench": bench.run, "export": export.run, "convert": convert.run,
            "ablation": ablation.run}
    try:
        return runs[args.command](args)
    # CheckpointError is a ValueError; OSError: an unwritable --out, a full disk.
    except (ValueError, TypeError, KeyError, ImportError, OSError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error  # KeyError's str() quotes it
        if distributed.is_main_process():  # under torchrun every rank fails alike: one line, not one per rank
            print(f"fastdit {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
