"""`fastdit bench`: images/s of DiT against its baselines on this device, with MFU, as a report.

For each model and batch size it checks every implementation (``fastdit.bench.workloads``)
against the fp32 reference, then times a forward, one guided sampling step and one training
step: warm-up first, then the median of repeated runs (CUDA events on the GPU). The same run
measures the device's dense GEMM throughput and memory bandwidth, so that each configuration's
TFLOP/s (analytic, ``fastdit.models.flops``) reads as a fraction of what this device does (MFU) and of
its datasheet peak. Writes report.json, report.md and throughput.png to ``--out``.

``--cache fora taylorseer fbcache`` adds rows "cached vs exact sampling": per fastdit implementation, a whole
guided DDIM run (``--cache-steps``) exact and under each cache's defaults, from the same noise. Each row has the
blocks run per image, the run's time against the exact run's in the same bench run, and, as its check in place
of the reference's tolerance, the relative max error and PSNR against the exact samples; a cache below
``--cache-min-psnr`` fails its row, untimed.

report.json is rewritten (atomically) after every measurement, so a run stopped by its time limit keeps what
it measured: SIGINT or SIGTERM abandons the measurement in flight, writes the report and exits 128 + the
signal's number. ``--resume`` keeps the rows of the report already in ``--out`` and measures only the others.
"""
import math
import os
import statistics
import sys

import torch
from tqdm.auto import tqdm

import fastdit
from fastdit.bench import report as bench_report
from fastdit.bench.progress import previous_rows
from fastdit.bench.timing import noise_warnings, spread, time_median, time_runs
from fastdit.bench.workloads import (
    BASELINE,
    BENCH_IMPLEMENTATIONS,
    BENCH_WORKLOADS,
    CACHE_IMPLEMENTATIONS,
    CACHE_SAMPLER,
    RELEASE,
    REPORTED_ERROR_IMPLEMENTATIONS,
    WORKLOAD_BUILDERS,
    WORKLOADS,
    Inputs,
    ModelSet,
    ParityError,
    cached_sampling_run,
    check_parity,
    dtype_name,
    implementation_dtype,
    latent_psnr,
    max_error,
    true_fp32,
    unavailable_reason,
)
from fastdit.cli import options
from fastdit.cli.options import VAE_DOWNSAMPLING
from fastdit.diffusion.caching import METHODS
from fastdit.io import check_owned_folder, mark_owned_folder
from fastdit.kernels import kernel_path
from fastdit.models.flops import named_shape, workload_flops
from fastdit.models.parity import relative_max_error
from fastdit.stopping import Stopped, stop_on_signals

GPU_DEFAULTS = dict(models=["DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2"], image_size=256, batch_sizes=[32])
CPU_DEFAULTS = dict(models=["DiT-S/2"], image_size=64, batch_sizes=[2])
# Environment switches that change what the fast model runs: recorded in the report, and a --resume
# report measured under other values is refused.
SWITCHES = ("FASTDIT_AUTOTUNE", "FASTDIT_FUSED_GELU", "FASTDIT_ONE_ADALN_GEMM")
RESUME_SETTINGS = ("device", "dtype", "image_size", "repeats", "warmup", "switches")


def measure_gemm_tflops(device, dtype: torch.dtype, size: int | None = None, repeats: int = 5) -> dict:
    """Dense matmul throughput: a square ``size`` GEMM (8192 on the GPU, 1024 on the CPU)."""
    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 1024)
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    out = torch.empty_like(a)
    seconds = time_median(lambda: torch.mm(a, b, out=out), device, repeats, warmup=2)
    return {"value": 2 * size**3 / seconds / 1e12, "unit": "TFLOP/s", "dtype": dtype_name(dtype),
            "shape": [size, size, size]}


def measure_copy_bandwidth(device, megabytes: int | None = None, repeats: int = 5) -> dict:
    """Memory bandwidth of a large device-to-device copy, counting bytes read plus bytes written."""
    device = torch.device(device)
    size = (megabytes or (2048 if device.type == "cuda" else 64)) * 2**20
    source = torch.empty(size, dtype=torch.uint8, device=device).fill_(1)
    target = torch.empty_like(source)
    seconds = time_median(lambda: target.copy_(source), device, repeats, warmup=2)
    return {"value": 2 * size / seconds / 1e9, "unit": "GB/s", "bytes_copied": size}


def add_arguments(parser):
    parser.add_argument("--out", required=True, help="directory for report.json, report.md and throughput.png")
    parser.add_argument("--models", nargs="+", default=None, choices=list(fastdit.DiT_models), metavar="MODEL",
                        help="DiT configurations (default: DiT-S/2 B/2 L/2 XL/2 on a GPU, DiT-S/2 on the CPU)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None, metavar="N",
                        help="images per step (default: 32 on a GPU, 2 on the CPU)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="image size in pixels, latent = size / 8 (default: 256 on a GPU, 64 on the CPU)")
    options.add_device_arguments(parser)
    parser.add_argument("--implementations", nargs="+", default=None, choices=BENCH_IMPLEMENTATIONS,
                        metavar="NAME",
                        help=f"of {', '.join(BENCH_IMPLEMENTATIONS)} (default: all the device runs; compiled ones "
                             f"only on a GPU). {BASELINE} always runs: it is the oracle and the baseline")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=BENCH_WORKLOADS, metavar="NAME",
                        help=f"of {', '.join(BENCH_WORKLOADS)} (default: {', '.join(WORKLOADS)}; sampling-run "
                             "is a whole 250-step sample)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (the median "
                        "is kept; default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before timing (default: "
                        "%(default)s)")
    parser.add_argument("--cache", nargs="+", default=[], choices=METHODS, metavar="METHOD",
                        help=f"also time whole sampling runs under these feature caches (of {', '.join(METHODS)}; "
                             "their defaults) against exact sampling, per fastdit implementation (docs/caching.md)")
    parser.add_argument("--cache-steps", type=int, default=50, help="DDIM steps of a --cache sampling run "
                        "(default: %(default)s)")
    parser.add_argument("--cache-repeats", type=int, default=3,
                        help="timed --cache sampling runs (median; the checked run before them is the warm-up; "
                             "default: %(default)s)")
    parser.add_argument("--cache-min-psnr", type=float, default=20.0,
                        help="dB: a cache whose samples are further than this from exact sampling's (PSNR of the "
                             "latents, peak their range) fails its row (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-plot", action="store_true",
                        help="write report.json and report.md only (no matplotlib needed; python -m "
                             "fastdit.bench.unpack draws the plot later)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the measurements of the report.json already in --out (same device, dtype, "
                             "image size, repeats and switches) and measure only the missing ones")


def _settings(args) -> dict:
    device = options.resolve_device(args.device)
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    image_size = args.image_size or defaults["image_size"]
    if image_size <= 0 or image_size % VAE_DOWNSAMPLING:
        raise ValueError(f"--image-size: expected a positive multiple of {VAE_DOWNSAMPLING} (the VAE's downsampling), "
                         f"got {image_size}")
    batch_sizes = args.batch_sizes or defaults["batch_sizes"]
    if min(batch_sizes) < 1:
        raise ValueError(f"--batch-sizes: expected positive integers, got {batch_sizes}")
    models = args.models or defaults["models"]
    for name in models:
        try:
            named_shape(name, image_size // VAE_DOWNSAMPLING)
        except ValueError as error:  # a latent side that the model's patch size does not divide
            raise ValueError(f"--image-size {image_size} does not fit {name}: {error}") from None
    implementations = args.implementations or [
        name for name in BENCH_IMPLEMENTATIONS if unavailable_reason(name, device) is None]
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError(f"--repeats: expected >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    if args.cache and (args.cache_steps < 1 or args.cache_repeats < 1 or not math.isfinite(args.cache_min_psnr)):
        raise ValueError(f"--cache-steps and --cache-repeats: expected >= 1 and --cache-min-psnr finite, got "
                         f"{args.cache_steps}, {args.cache_repeats} and {args.cache_min_psnr}")
    implementations = [BASELINE] + [name for name in implementations if name != BASELINE]
    cache = None
    if args.cache:
        cache = {"methods": list(dict.fromkeys(args.cache)), "steps": args.cache_steps,
                 "repeats": args.cache_repeats, "min_psnr": args.cache_min_psnr, "sampler": CACHE_SAMPLER,
                 "implementations": [name for name in implementations if name in CACHE_IMPLEMENTATIONS]}
    return {"device": device, "dtype": options.resolve_dtype(args.dtype, device), "models": models,
            "image_size": image_size, "batch_sizes": batch_sizes, "workloads": args.workloads,
            "implementations": implementations, "repeats": args.repeats, "warmup": args.warmup, "cache": cache,
            "switches": {name: os.environ[name] for name in SWITCHES if name in os.environ}}


def _measure(models, inputs, workload, implementation, expected, settings, peak) -> dict:
    device, dtype = settings["device"], implementation_dtype(implementation, settings["dtype"])
    result = {"workload": workload, "implementation": implementation, "dtype": dtype_name(dtype),
              "kernel_path": kernel_path(device) if implementation.startswith("fastdit") else None}
    reason = unavailable_reason(implementation, device, workload, compile_on_cpu=True)
    if reason is not None:
        return {**result, "status": "skipped", "reason": reason}
    try:
        if isinstance(expected, Exception):
            raise expected
        run = WORKLOAD_BUILDERS[workload](models, implementation, inputs)
        # The baseline's checked run is the oracle's run, already made: its time goes to the others' checks.
        output = expected if implementation == BASELINE else run.output()
        if run.bounded and implementation not in REPORTED_ERROR_IMPLEMENTATIONS:
            error = check_parity(output, expected, dtype, f"{implementation} {workload}")
        elif not all(torch.isfinite(tensor).all() for tensor in output.values()):
            raise ParityError(f"{implementation} {workload}: the output is not finite")
        else:
            error = max_error(output, expected)[0]
        times = time_runs(run.step, device, settings["repeats"], settings["warmup"])
        seconds = statistics.median(times)
    except ParityError as failure:
        return {**result, "status": "parity-failed", "reason": str(failure)}
    except Exception as failure:  # out of memory, a compiler error, a capture error: noted, and the sweep goes on
        return {**result, "status": "error", "reason": _one_line(failure)}
    images_per_s = run.images / seconds
    tflops = images_per_s * workload_flops(named_shape(models.name, models.input_size), workload) / 1e12
    result.update(status="ok", max_error={"value": error, "unit": f"relative max error vs {BASELINE}"},
                  time={"value": seconds, "unit": "s per step (median)"},
                  spread={"value": spread(times), "unit": "slowest / fastest timed step"},
                  throughput={"value": images_per_s, "unit": "images/s"},
                  achieved={"value": tflops, "unit": "TFLOP/s"},
                  mfu={"value": tflops / peak["gemm"]["value"], "unit": "fraction of the measured GEMM peak"})
    if peak.get("datasheet") is not None:
        result["datasheet_fraction"] = {"value": tflops / peak["datasheet"]["value"],
                                        "unit": "fraction of the datasheet peak"}
    return result


def _measure_cached(models, inputs, implementation, settings) -> list[dict]:
    """The rows "cached vs exact sampling" of one implementation: exact first, then each cache."""
    device, cache = settings["device"], settings["cache"]
    common = {"implementation": implementation, "dtype": dtype_name(models.dtype), "sampler": cache["sampler"],
              "steps": cache["steps"]}
    reason = unavailable_reason(implementation, device, "sampling-step", compile_on_cpu=True)
    rows, exact = [], None
    for method in [None] + cache["methods"]:
        row = {**common, "cache": method or "exact"}
        rows.append(row)
        if reason is not None:
            row.update(status="skipped", reason=reason)
            continue
        if method == "fbcache" and implementation == "fastdit-cudagraphs":
            row.update(status="skipped", reason="fbcache decides each step on the host, so it runs without CUDA "
                                                "graphs (fastdit-eager and fastdit-compiled time it)")
            continue
        if method is not None and exact is None:
            row.update(status="error", reason="exact sampling, the check's baseline, did not run")
            continue
        try:
            run = cached_sampling_run(models, implementation, inputs, method, cache["steps"])
            output = run.run()  # the checked run, which also warms up (compiles, captures)
            blocks = run.blocks_per_image()
            if method is not None:
                error, psnr = relative_max_error(output, exact["output"]), latent_psnr(output, exact["output"])
                if not (torch.isfinite(output).all() and psnr >= cache["min_psnr"]):
                    raise ParityError(f"{method} sampling is {psnr:.1f} dB from exact sampling (PSNR of the "
                                      f"latents), below --cache-min-psnr {cache['min_psnr']:g}")
            times = time_runs(run.run, device, cache["repeats"], warmup=0)
            seconds = statistics.median(times)
        except ParityError as failure:
            row.update(status="parity-failed", reason=str(failure))
            continue
        except Exception as failure:  # e.g. fbcache under CUDA graphs, out of memory: noted, the sweep goes on
            row.update(status="error", reason=_one_line(failure))
            continue
        row.update(status="ok", blocks_per_image={"value": blocks, "unit": "block evaluations per image per run"},
                   time={"value": seconds, "unit": "s per sampling run (median)"},
                   spread={"value": spread(times), "unit": "slowest / fastest timed run"},
                   throughput={"value": run.images / seconds, "unit": "images/s"})
        if method is None:
            exact = {"output": output, "seconds": seconds, "blocks": blocks}
            continue
        row.update(time_ratio={"value": seconds / exact["seconds"], "unit": "x exact sampling's time, this run"},
                   block_ratio={"value": blocks / exact["blocks"], "unit": "x exact sampling's blocks"},
                   max_error={"value": error, "unit": "relative max error vs exact sampling, same noise"},
                   psnr={"value": None if math.isinf(psnr) else psnr,
                         "unit": "dB vs exact sampling, same noise (peak: the exact latents' range)"})
        if math.isinf(psnr):
            row["psnr"]["note"] = "bit-equal to exact sampling"
    return rows


def _one_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _with_speedups(results: list[dict]) -> list[dict]:
    """Each ok row's throughput against the baseline's ("speedup") and, where the run has it, against the
    release's path ("release_speedup"), of the same configuration and workload in this run."""
    for field, implementation in (("speedup", BASELINE), ("release_speedup", RELEASE)):
        baseline = {(r["model"], r["batch_size"], r["workload"]): r["throughput"]["value"]
                    for r in results if r["implementation"] == implementation and r["status"] == "ok"}
        for result in results:
            reference = baseline.get((result["model"], result["batch_size"], result["workload"]))
            if result["status"] == "ok" and reference:
                result[field] = {"value": result["throughput"]["value"] / reference, "unit": f"x {implementation}"}
    return results


def _row_key(row: dict) -> tuple:
    return tuple(row.get(name) for name in ("model", "image_size", "batch_size", "workload", "cache",
                                            "implementation"))


def _expected(models, workload, inputs):
    """The oracle's output of ``workload``, or the error that every implementation's row then reports."""
    try:
        return WORKLOAD_BUILDERS[workload](models, BASELINE, inputs).output()
    except Exception as failure:  # e.g. out of memory
        return RuntimeError(f"the reference could not run ({_one_line(failure)})")


def _resume_view(settings: dict) -> dict:
    """The settings a resumed report must share, as report.json records them."""
    recorded = {**settings, "device": str(settings["device"]), "dtype": dtype_name(settings["dtype"])}
    return {name: recorded[name] for name in RESUME_SETTINGS}


def run(args):
    settings = _settings(args)
    if not args.no_plot:
        bench_report.check_plotting()
    device, dtype = settings["device"], settings["dtype"]
    # A folder of a bench run (marked, or holding only its reports) or a new one: a user's report.md is not ours.
    check_owned_folder(args.out, "bench", legacy=lambda path, names: set(names) <= set(bench_report.REPORT_FILES))
    os.makedirs(args.out, exist_ok=True)
    mark_owned_folder(args.out, "bench")
    previous, rows = (previous_rows(os.path.join(args.out, "report.json"), _resume_view(settings), "fastdit bench")
                      if args.resume else (None, []))
    done = {_row_key(row): row for row in rows}
    results, cache_results = [], []

    def save(stopped=None):
        """Rewrite the report with every row so far (``stopped``: the signal and what it interrupted)."""
        report = bench_report.build(settings, peak, _with_speedups(results), argv=sys.argv,
                                    cache_results=cache_results)
        if stopped is not None:
            report["stopped"] = stopped
        bench_report.write(args.out, report, plot_png=not args.no_plot and stopped is None)

    doing = "the device's peaks"
    peak = previous["peak"] if previous else None
    try:
        with stop_on_signals():
            if peak is None:
                peak = {"gemm": measure_gemm_tflops(device, dtype), "copy_bandwidth": measure_copy_bandwidth(device)}
                peak["datasheet"] = bench_report.datasheet_peak(device, dtype)
            for doing in _sweep(settings, peak, done, results, cache_results, save, args.no_progress):
                pass
    except Stopped as stop:
        save({"signal": str(stop), "during": doing})
        print(f"fastdit bench: stopped by {stop} during {doing}; {args.out}/report.json holds the "
              f"{len(results) + len(cache_results)} finished measurements", file=sys.stderr)
        return stop.exit_status
    save()
    failed = [r for r in results + cache_results if r["status"] in ("parity-failed", "error")]
    print(f"fastdit bench: wrote report.json{'' if args.no_plot else ', report.md and throughput.png'} to {args.out}")
    names = ("model", "batch_size", "workload", "cache", "implementation")
    spreads = {" ".join(str(row[key]) for key in names if key in row): row["spread"]["value"]
               for row in results + cache_results if "spread" in row}
    for line in noise_warnings(spreads):
        print(f"fastdit bench: warning: {line}", file=sys.stderr)
    for result in failed:
        what = result.get("workload") or f"cached sampling ({result['cache']})"
        print(f"fastdit bench: {result['model']} x{result['batch_size']} {what} "
              f"{result['implementation']}: {result['reason']}", file=sys.stderr)
    return 1 if failed else 0


def _sweep(settings, peak, done, results, cache_results, save, no_progress):
    """Measure every row in order, yielding what is measured next; a row already in ``done`` is kept as it is.
    ``save()`` after each row."""
    device, dtype, image_size = settings["device"], settings["dtype"], settings["image_size"]
    configurations = [(name, batch) for name in settings["models"] for batch in settings["batch_sizes"]]
    cache = settings["cache"]
    plan = {(name, batch): ([(workload, implementation) for workload in settings["workloads"]
                             for implementation in settings["implementations"]],
                            [(method or "exact", implementation) for implementation in
                             (cache["implementations"] if cache else ()) for method in [None] + cache["methods"]])
            for name, batch in configurations}
    total = sum(len(rows) + len(cached) for rows, cached in plan.values())
    with true_fp32(), tqdm(total=total, desc="fastdit bench", disable=no_progress, dynamic_ncols=True) as bar:
        for name, batch in configurations:
            common = {"model": name, "image_size": image_size, "batch_size": batch}
            rows, cached = plan[(name, batch)]
            missing = [row for row in rows if _row_key({**common, "workload": row[0], "implementation": row[1]})
                       not in done]
            cached_missing = [row for row in cached if _row_key({**common, "cache": row[0], "implementation": row[1]})
                              not in done]
            models = inputs = None
            if missing or cached_missing:
                torch._dynamo.reset()  # a fresh compile cache: no recompile limit hit across configurations
                yield f"building {name} x{batch}"
                models = ModelSet(name, image_size // VAE_DOWNSAMPLING, dtype, device)
                inputs = Inputs.draw(batch, models.reference, device)
            for workload in settings["workloads"]:
                expected = None
                for implementation in settings["implementations"]:
                    key = {**common, "workload": workload, "implementation": implementation}
                    if _row_key(key) in done:
                        results.append(done[_row_key(key)])
                    else:
                        what = f"{name} x{batch} {workload} {implementation}"
                        bar.set_postfix_str(what)
                        yield what
                        if expected is None:
                            expected = _expected(models, workload, inputs)
                        results.append({**common, **_measure(models, inputs, workload, implementation, expected,
                                                             settings, peak)})
                        save()
                    bar.update()
            if cached_missing:
                for implementation in cache["implementations"]:
                    yield f"{name} x{batch} cached sampling {implementation}"
                    cache_results.extend({**common, **row} for row in _measure_cached(models, inputs, implementation,
                                                                                      settings))
                    save()
                    bar.update(1 + len(cache["methods"]))
            else:
                cache_results.extend(done[_row_key({**common, "cache": method, "implementation": implementation})]
                                     for method, implementation in cached)
                bar.update(len(cached))
            del models, inputs
            if device.type == "cuda":
                torch.cuda.empty_cache()
