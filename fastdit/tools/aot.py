"""Compile every kernel launch of a real DiT forward and backward for a GPU, without a GPU.

    python -m fastdit.tools.aot [--arch 90 80] [--model DiT-S/2 DiT-XL/2] [--image-size 256 512]
                                  [--dtype bf16 fp16 fp32 amp fp8] [--block ...] [--json FILE] [--markdown FILE]

The fast model runs on meta tensors under ``runtime.simulate(target)``: its launchers configure
themselves for that GPU and call the kernels, and ``JITFunction.run`` is intercepted to record
each launch instead of running it. Meta tensors report their storage offset as ``data_ptr()``,
so Triton's own binder specialises each launch as a GPU would (16-byte divisibility of pointers
and integers, integers equal to 1 as constants). Each distinct launch, every candidate
configuration of ``tuning.choose`` included, is then compiled for the target with
``triton.compile`` and its cubin read with the wheel's ``cuobjdump``: registers, the stack frame
(local memory: spilled registers; the kernels have no local arrays), shared memory and the
tensor-core instructions (HGMMA: wgmma on sm_90; HMMA: mma.sync).

``--dtype fp8`` records the forward of the bf16 model quantized to FP8 (``model.quantize("fp8")``, inference
only: no backward), whose norm and GELU kernels write E4M3; for sm_90 only, as fp32 -> E4M3 conversion needs
sm_89 or newer (an sm_80 build of those kernels cannot exist, and fastdit refuses FP8 there).

Exit status 1 when a launch fails to compile, or when a default configuration spills or needs
more shared memory than the target has (candidates that do are reported as pruned: the runtime
prunes them the same way); 2 on bad arguments.
"""
import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.utils._python_dispatch
import triton
from triton.runtime.jit import JITFunction

from fastdit.kernels import runtime, tuning
from fastdit.tools.aot_report import markdown, summary, table, write_atomic

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "amp": torch.float32,
          "fp8": torch.bfloat16}
# E4M3 conversion (cvt.rn.satfinite.e4m3x2) needs sm_89 or newer.
FP8_MIN_ARCH = 89
MODELS = ("DiT-S/2", "DiT-S/4", "DiT-S/8", "DiT-B/2", "DiT-B/4", "DiT-B/8",
          "DiT-L/2", "DiT-L/4", "DiT-L/8", "DiT-XL/2", "DiT-XL/4", "DiT-XL/8")
BLOCKS = ("adaln-zero", "adaln", "cross-attn", "in-context")
# Launch keywords that are compile options rather than kernel arguments.
_RUNTIME_OPTIONS = ("debug", "instrumentation_mode", "fpsan_homomorphic_casts")


@dataclasses.dataclass
class Launch:
    """One recorded launch: the kernel, its specialisation for the target, and where it came from."""

    kernel: JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    shape: str
    candidate: int
    default: bool
    uses: list

    @property
    def name(self) -> str:
        return self.kernel.__name__

    def key(self, arch: int) -> str:
        return repr((arch, self.kernel.__module__, self.name, sorted(self.signature.items()),
                     sorted(self.constexprs.items()), sorted(self.attrs.items()), sorted(self.options.items())))


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        sys.stderr.write(f"python -m fastdit.tools.aot: error: {message}\n")
        sys.exit(2)


def parse_args(argv=None):
    parser = _Parser(prog="python -m fastdit.tools.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", type=int, default=[90, 80], choices=sorted(runtime.TARGETS),
                        help="compute capabilities to compile for (default: 90 80)")
    parser.add_argument("--model", nargs="+", default=["DiT-S/2", "DiT-XL/2"], choices=MODELS, metavar="MODEL",
                        help=f"models to record (default: DiT-S/2 DiT-XL/2); one of {', '.join(MODELS)}")
    parser.add_argument("--image-size", nargs="+", type=int, default=[256, 512], choices=[256, 512],
                        help="image sizes in pixels (latent side = size / 8)")
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES),
                        help="model dtypes; amp = fp32 weights under bf16 autocast, fp8 = the bf16 model quantized "
                             "to FP8, its forward, sm_90 only (default: all)")
    parser.add_argument("--block", nargs="+", default=list(BLOCKS), choices=BLOCKS,
                        help="the paper's block designs (default: all four)")
    parser.add_argument("--batch", type=int, default=64, help="batch size of the recorded launches (default: 64)")
    parser.add_argument("--json", help="write every compiled launch to this JSON file")
    parser.add_argument("--markdown", help="write the report as markdown (docs/kernels.md)")
    parser.add_argument("--record-only", action="store_true",
                        help="list the recorded launches and their specialisation without compiling them")
    parser.add_argument("--defaults-only", action="store_true",
                        help="compile only the configuration each launch uses when tuning is off")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch: expected a positive integer, got {args.batch}")
    if args.workers < 1:
        parser.error(f"--workers: expected a positive integer, got {args.workers}")
    return args


# --- recording ----------------------------------------------------------------------------------


def _binder(kernel: JITFunction, backend):
    """Triton's own argument binder and packer (private API: present in 3.6 through 3.9)."""
    try:
        from triton.runtime.jit import create_function_from_signature

        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        pack = kernel._pack_args
    except (ImportError, AttributeError) as error:
        raise RuntimeError(f"triton {triton.__version__}: the launch binder this check relies on "
                           f"(triton.runtime.jit.create_function_from_signature, JITFunction._pack_args) "
                           f"is missing ({error}); fastdit supports triton 3.6 through 3.9") from None
    return binder, pack


def _shape_of(args: tuple) -> str:
    tensors = [arg for arg in args if isinstance(arg, torch.Tensor)]
    first = tensors[0]
    return "x".join(map(str, first.shape)) + f" {str(first.dtype).removeprefix('torch.')}"


class _RunCustomOps(torch.utils._python_dispatch.TorchDispatchMode):
    """On meta tensors a custom op runs its fake (shape) function; run fastdit's ops' own bodies
    instead, so that their launchers configure and launch the kernels (private API:
    torch._library.custom_ops.OPDEFS, present since torch 2.4)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name.startswith("fastdit::"):
            from torch._library.custom_ops import OPDEFS

            with self:  # ops called inside the body are intercepted too
                return OPDEFS[name]._init_fn(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


class Recorder:
    """Intercepts ``JITFunction.run`` while active and keeps each launch's specialisation."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self.launches: dict[str, Launch] = {}
        self.use = None

    def record(self, kernel: JITFunction, args: tuple, kwargs: dict) -> None:
        binder, pack = _binder(kernel, self.backend)
        kwargs = {name: value for name, value in kwargs.items() if name not in _RUNTIME_OPTIONS}
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = pack(self.backend, kwargs, bound, specialization, options)
        given = {name: value for name, value in kwargs.items() if name not in kernel.arg_names}
        candidate = tuning.current_candidate()
        index, default = (candidate[1], candidate[2]) if candidate else (0, True)
        launch = Launch(kernel, signature, constexprs, {k: list(map(list, v)) if isinstance(v, list) else v
                                                        for k, v in attrs.items()},
                        given, _shape_of(args), index, default, [])
        launch = self.launches.setdefault(launch.key(self.arch), launch)
        if self.use not in launch.uses:
            launch.uses.append(self.use)

    @contextlib.contextmanager
    def active(self):
        recorder = self

        def run(kernel, *args, grid, warmup, **kwargs):
            recorder.record(kernel, args, kwargs)

        original = JITFunction.run
        JITFunction.run = run
        try:
            with runtime.simulate(runtime.TARGETS[self.arch]), _RunCustomOps():
                yield self
        finally:
            JITFunction.run = original


@contextlib.contextmanager
def _meta_autocast(dtype: torch.dtype | None):
    """Autocast to ``dtype`` (None: off) for meta tensors, which torch.autocast does not know: the
    model asks is_autocast_enabled/get_autocast_dtype, and linear layers compute in ``dtype`` as
    autocast's linear does, so the fused ops see autocast's mix of an fp32 stream and half modulations."""
    enabled, get_dtype = torch.is_autocast_enabled, torch.get_autocast_dtype
    if dtype is None:
        torch.is_autocast_enabled = lambda *device: False if device and device[0] == "meta" else enabled(*device)
        try:
            yield
        finally:
            torch.is_autocast_enabled = enabled
        return

    class Linears(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.linear:
                args = tuple(arg.to(dtype) if isinstance(arg, torch.Tensor) and arg.is_floating_point() else arg
                             for arg in args)
            return func(*args, **(kwargs or {}))

    torch.is_autocast_enabled = lambda *device: bool(device) and device[0] == "meta" or enabled(*device)
    torch.get_autocast_dtype = lambda device: dtype if device == "meta" else get_dtype(device)
    try:
        with Linears():
            yield
    finally:
        torch.is_autocast_enabled, torch.get_autocast_dtype = enabled, get_dtype


def record_model(recorder: Recorder, name: str, image_size: int, dtype_name: str, block: str, batch: int) -> None:
    """Record the launches of one training step (forward, then backward) of the fast model; for fp8, of the
    quantized model's forward."""
    from fastdit import DiT_models

    training = dtype_name != "fp8"
    with torch.device("meta"):
        model = DiT_models[name](input_size=image_size // 8, block=block).set_attn_backend("triton")
        model = model.to(DTYPES[dtype_name]).train(training)
        # x needs its gradient too (guidance and inversion use it), so that patch_embed's grad_x kernel is checked.
        x = torch.empty(batch, model.in_channels, model.input_size, model.input_size, dtype=DTYPES[dtype_name],
                        requires_grad=training)
        t = torch.empty(batch, dtype=torch.long)
        y = torch.empty(batch, dtype=torch.long)
    context = f"{name} {image_size}px {dtype_name} {block}"
    with recorder.active():
        if not training:
            model.quantize("fp8")  # under the simulated GPU, which the capability check accepts for meta tensors
        recorder.use = f"{context} forward"
        with _meta_autocast(torch.bfloat16 if dtype_name == "amp" else None):
            out = model(x, t, y)
        if training:
            recorder.use = f"{context} backward"
            out.float().sum().backward()


# --- compiling ----------------------------------------------------------------------------------


def _tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def _compile(job: tuple) -> dict:
    """Compile one launch for ``arch`` and read its cubin; runs in a worker process."""
    module, name, arch, signature, constexprs, attrs, options = job
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(sys.modules.get(module) or __import__(module, fromlist=[name]), name)
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as error:  # noqa: BLE001 -- reported per launch; the run exits 1
        return {"error": f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error) else ''}"}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin.name], capture_output=True, text=True,
                              check=True).stdout
    resources = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    return {
        "registers": int(resources["REG"]),
        "spill_bytes": int(resources["STACK"]) + int(resources["LOCAL"]),
        "spill_instructions": len(re.findall(r"\b(?:STL|LDL)\b", sass)),
        "shared_bytes": compiled.metadata.shared,
        "dots": len(re.findall(r"\btt\.dot\b", compiled.asm["ttir"])),
        "wgmma": len(re.findall(r"\bHGMMA\b", sass)),
        "mma": len(re.findall(r"\bHMMA\b", sass)),
    }


def _status(launch: Launch, facts: dict, arch: int) -> str:
    if "error" in facts:
        return "error"
    problems = []
    if facts["spill_bytes"] or facts["spill_instructions"]:
        problems.append("spills")
    if facts["shared_bytes"] > runtime.TARGETS[arch].shared_memory:
        problems.append("shared")
    if not problems:
        return "ok"
    return "+".join(problems) if launch.default else "pruned"


_CONFIG_NAME = re.compile(r"BLOCK|TILE|TOKENS_PER")


def _config(launch: Launch) -> dict:
    """The launch configuration: block sizes, warps and stages."""
    constexprs = _named_constexprs(launch)
    config = {name: value for name, value in constexprs.items() if _CONFIG_NAME.match(name)}
    return {**config, **{k: v for k, v in launch.options.items() if k in ("num_warps", "num_stages")}}


def _constants(launch: Launch) -> dict:
    """The other compile-time constants: shape-derived flags and arguments specialised to 1."""
    return {name: value for name, value in _named_constexprs(launch).items()
            if not _CONFIG_NAME.match(name) and value is not None}


def _named_constexprs(launch: Launch) -> dict:
    return {launch.kernel.arg_names[path[0]]: value for path, value in launch.constexprs.items() if len(path) == 1}


def compile_all(recorders: list[Recorder], workers: int, record_only: bool = False,
                defaults_only: bool = False) -> list[dict]:
    jobs, launches = [], []
    for recorder in recorders:
        for launch in recorder.launches.values():
            if defaults_only and not launch.default:
                continue
            jobs.append((launch.kernel.__module__, launch.name, recorder.arch, launch.signature,
                         launch.constexprs, launch.attrs, launch.options))
            launches.append((recorder.arch, launch))
    if record_only:
        results = [{} for _ in jobs]
    elif workers > 1:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_compile, jobs))
    else:
        results = list(map(_compile, jobs))
    rows = []
    for (arch, launch), facts in zip(launches, results):
        rows.append({"arch": arch, "kernel": launch.name, "shape": launch.shape, "constants": _constants(launch),
                     "config": _config(launch), "signature": launch.signature,
                     "candidate": launch.candidate, "default": launch.default, **facts,
                     "status": _status(launch, facts, arch) if facts else "recorded", "uses": launch.uses})
    return rows


def _reexec_compiled() -> None:
    """The launchers choose interpreter configs when TRITON_INTERPRET=1 was set at import: run again without it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    sys.exit(subprocess.run([sys.executable, "-m", "fastdit.tools.aot", *sys.argv[1:]], env=env).returncode)


def main(argv=None) -> int:
    args = parse_args(argv)
    if runtime.TRITON_INTERPRET:
        _reexec_compiled()
    recorders = []
    for arch in args.arch:
        recorder = Recorder(arch)
        for name in args.model:
            for image_size in args.image_size:
                for dtype_name in args.dtype:
                    if dtype_name == "fp8" and arch < FP8_MIN_ARCH:
                        continue
                    for block in args.block:
                        record_model(recorder, name, image_size, dtype_name, block, args.batch)
        recorders.append(recorder)
    if "fp8" in args.dtype and min(args.arch) < FP8_MIN_ARCH:
        print(f"--dtype fp8: not recorded for sm_{min(args.arch)}: E4M3 conversion needs sm_{FP8_MIN_ARCH} or newer",
              file=sys.stderr)
    rows = sorted(compile_all(recorders, args.workers, args.record_only, args.defaults_only),
                  key=lambda r: (-r["arch"], r["kernel"], r["shape"], not r["default"], r["candidate"]))
    command = "python -m fastdit.tools.aot " + " ".join(argv if argv is not None else sys.argv[1:])
    print("\n".join(table(rows)))
    facts = summary(rows)
    if args.json:
        # Compact: the file is for tools (a thousand rows), the markdown for people.
        write_atomic(args.json, json.dumps({"triton": triton.__version__, "command": command.strip(),
                                             "launches": rows}, separators=(",", ":")))
    if args.markdown:
        write_atomic(args.markdown, markdown(rows, command.strip()))
    for row in facts["failing"]:
        print(f"FAIL sm_{row['arch']} {row['kernel']} {row['shape']} {row['config']}: "
              f"{row.get('error') or row['status']}", file=sys.stderr)
    print(f"{facts['launches']} launches compiled, {len(facts['failing'])} failing", file=sys.stderr)
    return 1 if facts["failing"] else 0


if __name__ == "__main__":
    sys.exit(main())
