#!/usr/bin/env bash
# Everything a lent GPU owes fastdit, in one call of under 8 minutes: the CUDA tests, `fastdit bench`
# of DiT-XL/2 against its baselines, the launch-config sweep, the static kernel facts for this GPU's
# arch, the report docs/benchmarks/<gpu>.json/.md/.png and the roofline with the measured peaks.
# Each step runs under its own time budget (timeout), so a slow one cannot eat the others'; a failed
# step is noted and the next one runs; the exit status is 1 if any step failed. See benchmarks/README.md.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
PROG=benchmarks/device_check.sh
USAGE="usage: $PROG [--out DIR] [--quick] [--dry-run] [--report-only]
  --out DIR      the log, reports and copies of what the run wrote (default: \$OUT)
  --quick        about half the budgets: fewer timed runs, no compiled baselines
  --dry-run      print the plan (steps, budgets, commands) and exit; needs no GPU
  --report-only  only merge DIR/bench/*/report.json into docs/benchmarks/<gpu>.* and regenerate the roofline"

die() {  # a usage or environment error: one line, exit 2
    echo "$PROG: error: $*" >&2
    exit 2
}

OUT_DIR=${OUT:-} QUICK=0 DRY_RUN=0 REPORT_ONLY=0
while (($#)); do
    case $1 in
        --out) (($# >= 2)) || die "--out: expected a directory after it"; OUT_DIR=$2; shift 2 ;;
        --out=*) OUT_DIR=${1#--out=}; shift ;;
        --quick) QUICK=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        --report-only) REPORT_ONLY=1; shift ;;
        -h | --help) echo "$USAGE"; exit 0 ;;
        *) die "unknown argument '$1' (expected --out DIR, --quick, --dry-run, --report-only)" ;;
    esac
done
if [[ -z $OUT_DIR ]]; then
    ((DRY_RUN)) && OUT_DIR='$OUT' || die "--out: no directory given and \$OUT is not set"
fi

[[ $OUT_DIR != *[[:space:]]* ]] || die "--out: expected a path without spaces, got '$OUT_DIR'"

if ((!REPORT_ONLY && !DRY_RUN)); then
    # $ARCH and $GPU come from the device: one line each, or one line of error.
    probe=$("$PYTHON" - 2>&1 <<'PY'
import re, sys
try:
    import torch
except ImportError as error:
    sys.exit(f"torch is not importable ({error})")
if not torch.cuda.is_available():
    sys.exit(f"no CUDA device: torch {torch.__version__} sees none (torch.cuda.is_available() is False); "
             "run this on the GPU machine, or --dry-run for the plan")
major, minor = torch.cuda.get_device_capability(0)
print(f"{major}{minor}")
print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-"))
PY
    ) || die "$(tail -n 1 <<<"$probe")"
    ARCH=$(sed -n 1p <<<"$probe") GPU=$(sed -n 2p <<<"$probe")
fi

if ((DRY_RUN)); then
    [[ $OUT_DIR == /* || $OUT_DIR == '$OUT' ]] || OUT_DIR=$PWD/$OUT_DIR
else
    mkdir -p "$OUT_DIR" 2>/dev/null || die "--out: cannot create the directory $OUT_DIR"
    OUT_DIR=$(cd "$OUT_DIR" && pwd)
fi

# The tests and the compiles run the compiled kernels: never the interpreter.
unset TRITON_INTERPRET
# Timed runs per measurement (the median is kept) and untimed warm-ups.
if ((QUICK)); then REPEATS=(--repeats 3 --warmup 1); else REPEATS=(--repeats 5 --warmup 1); fi
BENCH=("$PYTHON" -m fastdit bench --models DiT-XL/2 --no-progress "${REPEATS[@]}")
EAGER=(--implementations reference-eager-fp32 reference-eager-bf16 fastdit-eager fastdit-cudagraphs)
TESTS=(tests/kernels tests/models/test_gpu.py tests/diffusion/test_sampling.py tests/models/test_dit.py
       tests/models/test_dit_grad.py tests/models/test_block_designs.py)

# The report: every bench run's report.json under argv[1]/bench, merged into one <gpu>.json/.md/.png
# in argv[2] (the GPU's name as a slug, printed), each run's markdown a section; speedups against the
# first baseline measurement of each configuration.
read -r -d '' REPORT_PY <<'PY'
import glob, json, os, re, sys
from fastdit.bench import report as bench_report
from fastdit.bench.workloads import BASELINE

out, target = sys.argv[1], sys.argv[2]
paths = sorted(glob.glob(os.path.join(out, "bench", "*", "report.json")))
if not paths:
    sys.exit(f"report: no bench report under {out}/bench (every bench step failed?)")
runs = [json.load(open(path)) for path in paths]
first = runs[0]
slug = re.sub(r"[^a-z0-9]+", "-", first["device"]["name"].lower()).strip("-")
results, seen = [], set()
for run in runs:
    for result in run["results"]:
        key = (result["model"], result["image_size"], result["batch_size"], result["workload"],
               result["implementation"])
        if key not in seen:  # the baseline runs in every bench call: its first measurement is kept
            seen.add(key)
            results.append(dict(result))
baseline = {key[:4]: r["throughput"]["value"] for r in results if r["status"] == "ok"
            for key in [(r["model"], r["image_size"], r["batch_size"], r["workload"], r["implementation"])]
            if key[4] == BASELINE}
for r in results:
    reference = baseline.get((r["model"], r["image_size"], r["batch_size"], r["workload"]))
    r.pop("speedup", None)
    if r["status"] == "ok" and reference:
        r["speedup"] = {"value": r["throughput"]["value"] / reference, "unit": f"x {BASELINE}"}
report = {"created": first["created"], "command": "benchmarks/device_check.sh", "device": first["device"],
          "peak": first["peak"], "settings": first["settings"], "runs": [run["command"] for run in runs],
          "results": results}
os.makedirs(target, exist_ok=True)
sections = [f"# fastdit bench: {first['device']['name']}", "",
            "Written by benchmarks/device_check.sh: one section per `fastdit bench` call.", ""]
for path, run in zip(paths, runs):
    text = bench_report.markdown(run)
    sections += [f"## bench/{os.path.basename(os.path.dirname(path))}: `{run['command']}`", ""]
    sections += ["#" + line if line.startswith("#") else line for line in text.splitlines()[1:]]
with open(os.path.join(target, f"{slug}.json"), "w") as file:
    json.dump(report, file, indent=2)
    file.write("\n")
with open(os.path.join(target, f"{slug}.md"), "w") as file:
    file.write("\n".join(sections) + "\n")
bench_report.plot(report, os.path.join(target, f"{slug}.png"))
print(slug)
PY
export REPORT_PY

# The plan: name, seconds (full, quick; 0 = not run), command. The full budgets sum to 470 s, under the
# device's 8 minutes with the GPU probe. max-autotune compiles of a training step take minutes, so the
# compiled baselines are timed on the forward and the sampling step only.
STEPS=()
plan() { STEPS+=("$1|$2|$3|$4"); }
if ((!REPORT_ONLY)); then
    plan install 20 20 "$PYTHON -m pip install --no-build-isolation --no-deps -q -e ."
    plan tests 100 60 "$PYTHON -m pytest ${TESTS[*]} -q -n 4 --maxfail=5 -m 'not slow' -p no:cacheprovider"
    plan bench-256 90 60 "${BENCH[*]} --image-size 256 --batch-sizes 1 64 ${EAGER[*]} --out $OUT_DIR/bench/256"
    plan bench-512 60 40 "${BENCH[*]} --image-size 512 --batch-sizes 16 ${EAGER[*]} --out $OUT_DIR/bench/512"
    plan bench-256-compiled 80 0 "${BENCH[*]} --image-size 256 --batch-sizes 64 --implementations reference-compiled \
fastdit-compiled --workloads forward sampling-step --out $OUT_DIR/bench/256-compiled"
    plan tuning 30 20 "$PYTHON -m fastdit.tools.tune --json $OUT_DIR/tuning.json"
    plan aot 60 40 "$PYTHON -m fastdit.tools.aot --arch \$ARCH --model DiT-XL/2 --image-size 256 512 \
--dtype bf16 amp --block adaln-zero --json $OUT_DIR/kernels.json"
fi
plan report 15 15 "$PYTHON -c \"\$REPORT_PY\" $OUT_DIR docs/benchmarks"
plan roofline 15 15 "$PYTHON -m fastdit.roofline --out docs/performance.md --bench-json docs/benchmarks/\$GPU.json"

# BUDGET_SCALE (default 1) multiplies every budget: the CPU tests of the report steps run on a busy
# 2-core machine, where importing torch alone can take most of a GPU machine's 15 s.
budget_of() {
    local IFS='|'; read -r _ full quick _ <<<"$1"
    echo $(( $( ((QUICK)) && echo "$quick" || echo "$full") * ${BUDGET_SCALE:-1} ))
}

if ((DRY_RUN)); then
    total=0
    echo "$PROG plan ($( ((QUICK)) && echo quick || echo full)), in $ROOT, writing to $OUT_DIR:"
    for step in "${STEPS[@]}"; do
        IFS='|' read -r name _ _ command <<<"$step"
        budget=$(budget_of "$step")
        if ((budget == 0)); then printf '  %-20s skipped (--quick)\n' "$name"; continue; fi
        total=$((total + budget))
        printf '  %-20s %4ss  %s\n' "$name" "$budget" "$command"
    done
    echo "total budget: ${total}s"
    exit 0
fi


LOG=$OUT_DIR/device_check.log
exec > >(tee -a "$LOG") 2>&1
cd "$ROOT" || exit 2
NAMES=() STATUSES=() TIMES=() FAILED=0
record() { NAMES+=("$1") STATUSES+=("$2") TIMES+=("$3"); [[ $2 == ok || $2 == skipped* ]] || FAILED=1; }

for step in "${STEPS[@]}"; do
    IFS='|' read -r name _ _ command <<<"$step"
    budget=$(budget_of "$step")
    if ((budget == 0)); then record "$name" "skipped (--quick)" 0; continue; fi
    if [[ $name == roofline && -z ${GPU:-} ]]; then record "$name" "skipped (no report)" 0; continue; fi
    command=${command//\$ARCH/${ARCH:-}} command=${command//\$GPU/${GPU:-}}
    if [[ $name == roofline && -f docs/kernels.json ]]; then command+=" --kernels-json docs/kernels.json"; fi
    echo "=== $name (budget ${budget}s): $command"
    start=$SECONDS rc=0
    if [[ $name == report ]]; then
        GPU=$(timeout -k 5 "$budget" bash -c "$command") || rc=$?
        echo "$GPU"
        ((rc == 0)) && mkdir -p "$OUT_DIR/docs/benchmarks" && cp docs/benchmarks/"$GPU".* "$OUT_DIR/docs/benchmarks/"
        ((rc == 0)) || GPU=
    else
        timeout -k 5 "$budget" bash -c "$command" || rc=$?
        if [[ $name == roofline ]] && ((rc == 0)); then mkdir -p "$OUT_DIR/docs" && cp docs/performance.md "$OUT_DIR/docs/"; fi
    fi
    took=$((SECONDS - start))
    if ((rc == 0)); then status=ok; elif ((rc == 124 || rc == 137)); then status="timeout"; else status="failed ($rc)"; fi
    record "$name" "$status" "$took"
done

echo
printf '| %-20s | %-20s | %7s |\n' step status seconds '--------------------' '--------------------' '-------'
for i in "${!NAMES[@]}"; do printf '| %-20s | %-20s | %7s |\n' "${NAMES[$i]}" "${STATUSES[$i]}" "${TIMES[$i]}"; done
echo "log: $LOG"
exit "$FAILED"
