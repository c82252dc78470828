"""The report of `fastdit bench`: report.json (every figure with its unit), report.md (the tables a
person reads) and throughput.png, each written atomically."""
import datetime
import json
import os
import platform
import subprocess

import torch

import fastdit
from fastdit.bench.workloads import BASELINE, RELEASE, dtype_name
from fastdit.io import atomic_path, write_text_atomic
from fastdit.kernels import kernel_path

# Dense (no sparsity) bf16/fp16 tensor-core TFLOP/s from NVIDIA's datasheets, by a substring of
# torch.cuda.get_device_name; the first match wins. None: a variant whose figure we do not state.
DATASHEET_HALF_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", None),
    ("H200 NVL", None),
    ("H100", 989.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("A100", 312.0),
)


def datasheet_tflops(device_name: str) -> float | None:
    """Dense bf16/fp16 TFLOP/s of a GPU by its name, or None where the table does not know it."""
    for pattern, tflops in DATASHEET_HALF_TFLOPS:
        if pattern in device_name:
            return tflops
    return None


def datasheet_peak(device: torch.device, dtype: torch.dtype) -> dict | None:
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    tflops = datasheet_tflops(name)
    return None if tflops is None else {"value": tflops, "unit": "TFLOP/s", "source": f"datasheet, {name}"}


def _nvidia_driver(index: int) -> str | None:
    try:
        result = subprocess.run(["nvidia-smi", f"--id={index}", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {"type": device.type, "fastdit": fastdit.__version__, "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(), "kernel_path": kernel_path(device)}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        properties = torch.cuda.get_device_properties(index)
        info.update(name=properties.name, cuda=torch.version.cuda, driver=_nvidia_driver(index),
                    cudnn=torch.backends.cudnn.version(), capability=f"{properties.major}.{properties.minor}",
                    multiprocessors=properties.multi_processor_count,
                    memory={"value": properties.total_memory / 1e9, "unit": "GB"})
    else:
        info.update(name=_cpu_name(), threads=torch.get_num_threads())
    return info


def build(settings: dict, peak: dict, results: list[dict], argv: list[str],
          cache_results: list[dict] | None = None) -> dict:
    """The report; ``cache_results``: the rows "cached vs exact sampling" (``fastdit bench --cache``), if any."""
    device = settings["device"]
    report = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(argv),
        "device": device_info(device),
        "settings": {**settings, "device": str(device), "dtype": dtype_name(settings["dtype"]),
                     "timer": "CUDA events" if device.type == "cuda" else "time.perf_counter",
                     "statistic": "median over the timed runs, after the warm-up runs"},
        "peak": peak,
        "results": results,
    }
    if cache_results:
        report["cache_results"] = cache_results
    return report


def check_plotting(what: str = "fastdit bench draws throughput.png") -> None:
    """Fail before a long run, not after it, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise ImportError(f"{what} with matplotlib, which is not importable ({error}); pip install matplotlib") from None


def _configurations(results, workload):
    seen = {}
    for result in results:
        if result["workload"] == workload:
            seen.setdefault((result["model"], result["batch_size"]), {})[result["implementation"]] = result
    return seen


def _implementations(results):
    return list(dict.fromkeys(result["implementation"] for result in results))


def markdown_table(header, rows) -> list[str]:
    """Lines of a markdown table: the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "| --- | ---: |" + " ---: |" * (len(header) - 2)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _throughput_cell(result):
    if result is None or result["status"] != "ok":
        return "—"
    ratios = [f"{result[field]['value']:.2f}x{suffix}" for field, suffix in (("speedup", ""),
                                                                             ("release_speedup", " release"))
              if field in result]
    return f"{result['throughput']['value']:,.1f}" + (f" ({' · '.join(ratios)})" if ratios else "")


def _efficiency_cell(result):
    if result is None or result["status"] != "ok":
        return "—"
    cell = f"{result['achieved']['value']:.3g} · {100 * result['mfu']['value']:.1f}%"
    if "datasheet_fraction" in result:
        cell += f" · {100 * result['datasheet_fraction']['value']:.1f}%"
    return cell


def markdown(report: dict) -> str:
    device, settings, peak, results = report["device"], report["settings"], report["peak"], report["results"]
    versions = ", ".join(f"{key} {device[key]}" for key in ("torch", "triton", "cuda", "driver") if device.get(key))
    gemm, copy = peak["gemm"], peak["copy_bandwidth"]
    datasheet = peak.get("datasheet")
    lines = [
        f"# fastdit bench: {device['name']}", "",
        f"{report['created']} · {versions} · fastdit kernels: {device['kernel_path']}"
        + (" (the fused ops' plain torch path)" if device["kernel_path"] == "torch" else "") + " · "
        f"{settings['image_size']} px · {settings['dtype']}", "",
        f"Measured on this device: dense GEMM {gemm['value']:.3g} TFLOP/s ({gemm['dtype']}, "
        f"{'x'.join(map(str, gemm['shape']))}), copy bandwidth {copy['value']:,.0f} GB/s (read + write)"
        + (f"; datasheet peak {datasheet['value']:.0f} TFLOP/s." if datasheet else "."), "",
        f"Images/s: the median of {settings['repeats']} timed runs after {settings['warmup']} warm-up runs "
        f"({'CUDA events' if device['type'] == 'cuda' else 'wall clock'}); in brackets, the speedup over {BASELINE} "
        f"and, where it ran, over {RELEASE} (\"release\": the release's fp32 path, attention on SDPA); "
        "a sampling step advances each image by one guided step. TFLOP/s from the analytic FLOP count "
        "(fastdit/models/flops.py), as a fraction of the measured GEMM peak (MFU)"
        + (" and of the datasheet peak." if datasheet else "."),
    ]
    implementations = _implementations(results)
    for workload in dict.fromkeys(result["workload"] for result in results):
        configurations = _configurations(results, workload)
        lines += ["", f"## {workload}", "", "Images/s (speedup):", ""]
        lines += markdown_table(["model", "batch"] + implementations,
                        [[model, str(batch)] + [_throughput_cell(cells.get(name)) for name in implementations]
                         for (model, batch), cells in configurations.items()])
        lines += ["", "TFLOP/s · MFU" + (" · of datasheet:" if datasheet else ":"), ""]
        lines += markdown_table(["model", "batch"] + implementations,
                        [[model, str(batch)] + [_efficiency_cell(cells.get(name)) for name in implementations]
                         for (model, batch), cells in configurations.items()])
    cache_results = report.get("cache_results", [])
    if cache_results:
        lines += _cache_section(settings["cache"], cache_results)
    missing = [result for result in results + cache_results if result["status"] != "ok"]
    if missing:
        lines += ["", "## Not measured", ""]
        lines += [f"- {r['model']} x{r['batch_size']} {r.get('workload') or 'cached sampling (' + r['cache'] + ')'} "
                  f"{r['implementation']}: {r['status']}, {r['reason']}" for r in missing]
    return "\n".join(lines) + "\n"


def _cache_section(cache: dict, rows: list[dict]) -> list[str]:
    about = (f"One guided {cache['sampler'].upper()} run of {cache['steps']} steps per row, from the same noise as "
             f"the exact run; time: the median of {cache['repeats']} runs, against the exact run of the same "
             "implementation in this bench run. Error and PSNR are against the exact samples (PSNR of the latents, "
             f"peak their range), the check in place of the reference's tolerance: below {cache['min_psnr']:g} dB "
             "a row fails. Each cache runs its defaults (docs/caching.md).")
    lines = ["", "## cached vs exact sampling", "", about, ""]
    table = []
    for row in rows:
        if row["status"] != "ok":
            continue
        exact = row["cache"] == "exact"
        psnr = row.get("psnr", {}).get("value")
        table.append([row["model"], str(row["batch_size"]), row["implementation"], row["cache"],
                      f"{row['blocks_per_image']['value']:g}", f"{row['throughput']['value']:,.2f}",
                      "1 (baseline)" if exact else f"{row['time_ratio']['value']:.2f}",
                      "—" if exact else f"{row['max_error']['value']:.2e}",
                      "—" if exact else ("∞ (bit-equal)" if psnr is None else f"{psnr:.1f}")])
    return lines + markdown_table(["model", "batch", "implementation", "cache", "blocks per image", "images/s",
                                   "time vs exact", "rel. max error", "PSNR (dB)"], table)


def plot(report: dict, path) -> None:
    """Per workload, one bar per configuration and implementation: its speedup over the baseline
    (a linear scale that models of any size share), labelled with its images/s."""
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend
    from matplotlib.patches import Patch

    results = [result for result in report["results"] if result["status"] == "ok" and "speedup" in result]
    workloads = list(dict.fromkeys(result["workload"] for result in report["results"]))
    implementations = _implementations(results)  # those measured somewhere
    figure = Figure(figsize=(5 * max(len(workloads), 1), 4.5), layout="constrained")
    axes = figure.subplots(1, max(len(workloads), 1), squeeze=False)[0]
    width = 0.8 / max(len(implementations), 1)
    for axis, workload in zip(axes, workloads):
        configurations = _configurations(results, workload)
        for offset, name in enumerate(implementations):
            positions, speedups, labels = [], [], []
            for position, cells in enumerate(configurations.values()):
                if name in cells:
                    positions.append(position + (offset - (len(implementations) - 1) / 2) * width)
                    speedups.append(cells[name]["speedup"]["value"])
                    labels.append(f"{cells[name]['throughput']['value']:.3g}")
            if positions:
                bars = axis.bar(positions, speedups, width, color=f"C{offset}")
                axis.bar_label(bars, labels, fontsize="x-small", rotation=90, padding=2)
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_xticks(range(len(configurations)), [f"{model}\nx{batch}" for model, batch in configurations])
        axis.margins(y=0.15)
        axis.set_title(workload)
        axis.set_ylabel(f"speedup over {BASELINE} (labels: images/s)", fontsize="small")
    handles = [Patch(color=f"C{offset}", label=name) for offset, name in enumerate(implementations)]
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6) or 1, fontsize="small")
    figure.suptitle(f"fastdit bench: {report['device']['name']}, {report['settings']['dtype']}")
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)


REPORT_FILES = ("report.json", "report.md", "throughput.png")


def write(out, report: dict, plot_png: bool = True) -> None:
    write_text_atomic(os.path.join(out, "report.json"), json.dumps(report, indent=2) + "\n")
    write_text_atomic(os.path.join(out, "report.md"), markdown(report))
    if plot_png:
        plot(report, os.path.join(out, "throughput.png"))
