"""The report of ``python -m fastdit.tools.aot``: the launch table, the per-kernel summary and
docs/kernels.md."""
import os
import subprocess
import tempfile

import torch
import triton


def _tensor_cores(row: dict) -> str:
    if "dots" not in row:  # not compiled
        return ""
    if not row["dots"]:
        return "-"
    if row["wgmma"]:
        return f"wgmma {row['wgmma']}"
    if row["mma"]:
        return f"mma {row['mma']}"
    return "none (fp32 FMA)"


def table(rows: list[dict]) -> list[str]:
    header = ["arch", "kernel", "shape (first use)", "constants", "config", "default", "regs", "spill B", "smem B", "tensor cores", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        config = " ".join(f"{k}={v}" for k, v in row["config"].items())
        constants = " ".join(f"{k}={v}" for k, v in row["constants"].items())
        cells = [f"sm_{row['arch']}", row["kernel"].strip("_"), row["shape"], constants, config, "yes" if row["default"] else "",
                 str(row.get("registers", "")), str(row.get("spill_bytes", "")), str(row.get("shared_bytes", "")),
                 _tensor_cores(row), row["status"] if "error" not in row else f"error: {row['error']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary(rows: list[dict]) -> dict:
    defaults = [row for row in rows if row["default"]]
    return {
        "launches": len(rows),
        "defaults": len(defaults),
        "errors": sum("error" in row for row in rows),
        "failing": [row for row in rows if row["status"] not in ("ok", "pruned", "recorded")],
        "pruned": sum(row["status"] == "pruned" for row in rows),
        "default_spill_bytes": sum(row.get("spill_bytes", 0) for row in defaults),
    }


def _kernel_summary(rows: list[dict]) -> list[str]:
    """One line per (arch, kernel): what its default configurations need at most."""
    lines = ["| arch | kernel | launches | defaults | max regs (defaults) | spill B (defaults) | max smem B | "
             "tensor cores (half-precision defaults) | pruned candidates |", "|" + "---|" * 9]
    for arch, kernel in sorted({(row["arch"], row["kernel"]) for row in rows}, key=lambda key: (-key[0], key[1])):
        group = [row for row in rows if (row["arch"], row["kernel"]) == (arch, kernel) and "registers" in row]
        defaults = [row for row in group if row["default"]]
        half = [row for row in defaults if "float32" not in row["shape"] and row["dots"]]
        cores = sorted({_tensor_cores(row).split()[0] for row in half}) or ["-"]
        lines.append(f"| sm_{arch} | {kernel.strip('_')} | {len(group)} | {len(defaults)} | "
                     f"{max((row['registers'] for row in defaults), default=0)} | "
                     f"{sum(row['spill_bytes'] for row in defaults)} | "
                     f"{max((row['shared_bytes'] for row in defaults), default=0)} | {', '.join(cores)} | "
                     f"{sum(row['status'] == 'pruned' for row in group)} |")
    return lines


# The Triton releases from 3.6 on, each checked in a fresh venv with torch 2.13.0+cpu and that
# triton (pip install --no-deps: the CPU torch pins none) by `python -m fastdit.tools.aot --defaults-only`: every
# default of the matrix of `test_full_matrix_compiles_without_spills`, which CI's slow suite runs under the
# installed Triton. Rows: (triton, what the check found).
TRITON_CHECKS = (
    ("3.6.0", "0 of 280 spill, with its own attention defaults (above); the general ones spilled 8 B in 3 "
              "launches: the forward in fp32 on sm_90 (head dim 64, 258 tokens) and dK/dV in bf16 "
              "and fp16 on sm_80 (head dim 72, 256 tokens)"),
    ("3.7.1", "0 of 280 spill"),
    ("3.8.0", "0 of 280 spill"),
    ("3.9.0", "0 of 280 spill; the tables below compiled every candidate"),
)


def triton_versions() -> list[str]:
    """The section of docs/kernels.md that says which Triton releases compile the defaults without spills."""
    return [
        "## Triton versions",
        "",
        "setup.py admits `triton>=3.6`. Each release was checked in its own venv (torch 2.13.0+cpu, `pip install "
        "--no-deps triton==X`) with `python -m fastdit.tools.aot --defaults-only`: every default configuration "
        "of a DiT-S/2 and DiT-XL/2 training step, 4 dtypes, 4 designs, 256 and 512 px, for sm_90 and sm_80. CI's "
        "slow suite runs the same check under the installed Triton "
        "(`tests/tools/test_aot.py::test_full_matrix_compiles_without_spills`).",
        "",
        "Under Triton 3.6 the attention forward in fp32 and backward in fp16/bf16 default to another of their own "
        "candidates "
        "(`TRITON_3_6_DEFAULTS` in `kernels/launch.py` says why each): on sm_90 and newer the forward runs "
        "32x32 over 4 warps with 3 stages instead of 2, and on GPUs before sm_90 the backward (dK/dV and dQ) "
        "128/32 over 8 warps instead of 64/32 over 4. Each release takes its own: the 3.6 backward tile spills "
        "8 B under 3.9 (sm_80, head dim 72, 256 tokens: the table below). The fp32 backward kernels default to 64/32 over 8 "
        "warps on every release: 32/32 over 4 warps spilled 16 B on sm_90 with 258 tokens, in dK/dV under 3.6.0 "
        "(head dim 72) and 3.7.1 (head dim 64) and in dQ under 3.8.0 (head dim 72).",
        "",
        "| triton | defaults |",
        "|---|---|",
        *[f"| {version} | {found} |" for version, found in TRITON_CHECKS],
        "",
    ]


def markdown(rows: list[dict], command: str) -> str:
    facts = summary(rows)
    lines = [
        "# Kernels compiled for GPUs",
        "",
        f"Generated by `{command}` with triton {triton.__version__}, torch {torch.__version__}{_commit()}, on a machine "
        "without a GPU (see `fastdit/tools/aot.py`). One row per distinct launch of a DiT training step (forward and "
        "backward) of the listed models, designs and dtypes, and of the FP8 model's forward (dtype `fp8`: sm_90 "
        "only, E4M3 conversion needs sm_89+), every candidate configuration of `kernels/tuning.py` "
        "included; `default` marks the configuration used when tuning is off. spill B: the stack frame "
        "(local memory) of the cubin; smem B: shared memory per block; tensor cores: HGMMA (wgmma, sm_90) or HMMA "
        "(mma.sync) instructions in the SASS, `none (fp32 FMA)` for fp32 kernels, whose `ieee` dots run on FMA "
        "units by design, `-` for kernels without a dot. A candidate that spills or does not fit is `pruned`, as "
        "the runtime prunes it before timing.",
        "",
        f"{facts['launches']} launches ({facts['defaults']} default), {facts['errors']} compile errors, "
        f"{len(facts['failing'])} failing defaults, {facts['pruned']} pruned candidates, "
        f"{facts['default_spill_bytes']} spill bytes over all defaults.",
        "",
        *triton_versions(),
        "## Per kernel",
        "",
        *_kernel_summary(rows),
        "",
        "## Every launch",
        "",
        *table(rows),
        "",
    ]
    return "\n".join(lines)


def _commit() -> str:
    """ ", at commit <hash>" of the checkout the kernels came from, when it is a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return f", at commit {commit}"


def write_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as file:
        file.write(text)
    os.replace(file.name, path)
