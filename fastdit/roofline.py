"""`python -m fastdit.roofline`: writes docs/performance.md (``fastdit.bench.roofline_document``).

Kept as a module of its own because docs/performance.md and benchmarks/device_check.sh run this command."""
import sys

from fastdit.bench.roofline_document import main

if __name__ == "__main__":
    sys.exit(main())
