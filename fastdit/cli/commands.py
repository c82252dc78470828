"""The `fastdit` command."""
import argparse
import sys

from fastdit import distributed
from fastdit.bench import ablation
from fastdit.cli import bench, convert, demo, digits, encode, evaluate, export
from fastdit.cli import sample as sample_cli
from fastdit.cli import train as train_cli


class ArgumentParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit code 2, as the commands' own errors."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv=None):
    parser = ArgumentParser(prog="fastdit", description="Fast, checked DiT (Peebles & Xie, 2023).")
    commands = parser.add_subparsers(dest="command", required=True)
    demo.add_arguments(commands.add_parser("demo", help="check a model against the reference and time it"))
    sample_cli.add_arguments(commands.add_parser("sample", help="sample images from a DiT (torchrun: many GPUs)"))
    train_cli.add_arguments(commands.add_parser("train", help="train a DiT (torchrun: many GPUs)"))
    encode.add_arguments(commands.add_parser("encode", help="precompute VAE latents of an image folder for training"))
    digits.add_arguments(commands.add_parser("digits-accuracy", help="how recognisable sampled digits are"))
    evaluate.add_arguments(commands.add_parser("evaluate", help="FID, sFID, Inception Score, precision and recall "
                                                               "as the ADM suite (torchrun: many GPUs)"))
    bench.add_arguments(commands.add_parser("bench", help="images/s and MFU against the baselines; writes "
                                                         "report.json/.md/.png"))
    export.add_arguments(commands.add_parser("export", help="compile the guided denoiser into an AOTInductor .pt2 "
                                                           "package for the C++ runner fastdit-run"))
    convert.add_arguments(commands.add_parser("convert", help="convert a DiT's weights between the release's, "
                                                             "fastdit's and diffusers' formats"))
    ablation.add_arguments(commands.add_parser("ablation", help="train the paper's four block designs on the digits "
                                                              "and compare them (docs/ablation)"))
    args = parser.parse_args(argv)
    runs = {"demo": demo.run, "sample": sample_cli.run, "train": train_cli.run, "encode": encode.run,
            "digits-accuracy": digits.run, "evaluate": evaluate.run, "bench": bench.run, "export": export.run, "convert": convert.run,
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
