"""The `fastdit` command."""
import argparse
import sys

from fastdit import demo


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastdit", description="Fast, checked DiT (Peebles & Xie, 2023).")
    commands = parser.add_subparsers(dest="command", required=True)
    demo.add_arguments(commands.add_parser("demo", help="check a model against the reference and time it"))
    args = parser.parse_args(argv)
    try:
        return {"demo": demo.run}[args.command](args)
    except (ValueError, TypeError, KeyError, ImportError) as error:
        print(f"fastdit {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
