#!/usr/bin/env bash
# Everything a lent GPU owes fastdit, in order of value, in one call that survives its own limits: one
# archive in --out (default $OUT), rebuilt after every step, beside the log. See benchmarks/README.md and
# fastdit/bench/device_check.py; `--help` for the flags, `--dry-run` for the plan.
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Output reaches the log as it is printed; the checkout's fastdit is the one measured, installed or not;
# the kernels run compiled (on the CPU mode: the fused ops' torch path), never interpreted.
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHON="${PYTHON:-python3}"
unset TRITON_INTERPRET
cd "$ROOT" || exit 2
# torchao, the FP8 baseline, comes to a device run as a wheel in benchmarks/wheels (benchmarks/README.md).
for wheel in benchmarks/wheels/torchao-*.whl; do
  [ -e "$wheel" ] && "$PYTHON" -m pip install --quiet --no-deps "$wheel"
done
exec "$PYTHON" -m fastdit.bench.device_check "$@"
