"""`python -m fastdit.ablation`: the block-design ablation, as `fastdit ablation` (``fastdit.bench.ablation``).

Kept as a module of its own because the README and the committed docs/ablation were made with this command."""
import sys

from fastdit.bench.ablation import main

if __name__ == "__main__":
    sys.exit(main())
