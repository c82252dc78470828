"""`python -m fastdit.ablation`: the block-design ablation, as `fastdit ablation` (``fastdit.cli.ablation``).

Kept as a module of its own because the README and the committed docs/ablation were made with this command."""
import sys

from fastdit.cli import main as fastdit_main


def main(argv=None) -> int:
    """The same flags and errors as ``fastdit ablation``."""
    return fastdit_main(["ablation", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
