"""What ``fastdit bench`` and ``pytest benchmarks/`` time: the implementations of DiT they
compare and the workloads they run on one configuration.

Implementations (the names every report uses):
- ``reference-eager-fp32``: ``fastdit.reference`` in fp32, the baseline and the oracle;
- ``reference-eager-bf16``: the same model in bf16 (under autocast for training);
- ``reference-compiled``: the reference in the benchmark dtype under ``torch.compile``;
- ``fastdit-eager``, ``fastdit-compiled``: the fast model in the benchmark dtype;
- ``fastdit-cudagraphs``: the fast model's step captured into one CUDA graph and replayed.
``fastdit bench`` also runs (``BENCH_IMPLEMENTATIONS``):
- ``reference-sdpa-fp32``, ``reference-sdpa-bf16``: the reference with its attention computed by
  ``F.scaled_dot_product_attention``, as the release's timm Attention does (the reference writes the
  softmax out, as the paper's code did): the baseline of "x the release" ratios;
- ``fastdit-fp8``: the fast model after ``model.quantize("fp8")``;
- ``torchao-fp8``: the FP8 baseline a user would otherwise pick, torchao's row-wise dynamic FP8 on the
  release's model, compiled (``fastdit.bench.torchao_baseline``).
Workloads: ``forward``, ``sampling-step`` (one guided DDPM step: the model on the batch and its
unconditional copy, then the solver update) and ``training-step`` (the diffusion loss, backward,
AdamW); ``fastdit bench`` adds ``sampling-run``, a whole 250-step guided DDPM sample through
``fastdit.sample``. Every workload has an ``output`` compared with the reference's before its ``step``
is timed (a sampling run's error is reported, not bounded: 250 steps compound each step's rounding, and
``sampling-step`` checks the step).

``cached_sampling_run``: a whole guided DDIM run of the fast model under a feature cache (or exact, every
block at every step), the rows "cached vs exact sampling" of ``fastdit bench --cache``; a cache is checked
against exact sampling from the same noise, not against the reference's tolerance.
"""
import contextlib
import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

import fastdit
from fastdit import reference
from fastdit.bench import torchao_baseline
from fastdit.diffusion import caching
from fastdit.diffusion.cuda_graphs import capture, warm_up
from fastdit.diffusion.denoising import GuidedDenoiser
from fastdit.diffusion.gaussian import create_diffusion
from fastdit.diffusion.samplers import make_solver
from fastdit.diffusion.sampling import sample
from fastdit.models import DTYPES, modulation
from fastdit.models.fp8 import check_fp8_device
from fastdit.models.parity import MODEL_TOLERANCE, perturb_, relative_max_error

IMPLEMENTATIONS = ("reference-eager-fp32", "reference-eager-bf16", "reference-compiled",
                   "fastdit-eager", "fastdit-compiled", "fastdit-cudagraphs")
BASELINE = "reference-eager-fp32"
RELEASE = "reference-sdpa-fp32"  # the release's path: fp32, timm's Attention on SDPA
BENCH_IMPLEMENTATIONS = IMPLEMENTATIONS + (RELEASE, "reference-sdpa-bf16", "fastdit-fp8", torchao_baseline.TORCHAO_FP8)
# Their error against the reference is reported, not bounded by the dtype's model tolerance: FP8's quantization
# error is a stated quality cost (docs/performance.md), not a parity failure.
REPORTED_ERROR_IMPLEMENTATIONS = ("fastdit-fp8", torchao_baseline.TORCHAO_FP8)
WORKLOADS = ("forward", "sampling-step", "training-step")
BENCH_WORKLOADS = WORKLOADS + ("sampling-run",)

CFG_SCALE = 4.0  # the paper's guidance scale for its samples
SAMPLING_STEPS = 250  # the release's DDPM schedule; one of its steps is timed
GUIDANCE_CHANNELS = 3  # the release guides the first 3 latent channels


class ParityError(AssertionError):
    """An implementation's output differs from the reference's by more than the tolerance."""


def compile_mode(device: torch.device, family: str = "reference") -> str | None:
    # max-autotune searches GEMM configurations (and uses CUDA graphs) on the GPU; on the CPU it only adds
    # compile time. fastdit-compiled is the step compiled without CUDA graphs: fastdit-cudagraphs is the
    # same step with them, and the pair is what a batch-1 step gains from graphs.
    if device.type != "cuda":
        return None
    return "max-autotune" if family == "reference" else "max-autotune-no-cudagraphs"


def compiled(model, device: torch.device, family: str = "reference"):
    # dynamic=False: every batch shape gets its own specialised graph, as a deployment would.
    return torch.compile(model, mode=compile_mode(device, family), dynamic=False, fullgraph=family == "fastdit")


def cuda_graphed(fn: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], torch.Tensor]:
    """``fn`` (on fixed input tensors) captured into a CUDA graph: each call replays it and
    returns the graph's output buffer."""
    outputs = []
    warm_up(fn, device)
    replay = capture(lambda: outputs.append(fn()), device)

    def run():
        replay()
        return outputs[0]

    return run


@contextlib.contextmanager
def true_fp32():
    """cuDNN convolutions default to TF32 on a GPU (about 1e-3 relative): within this context the
    fp32 reference, the oracle, computes in fp32 throughout."""
    allowed = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = allowed


def dtype_name(dtype: torch.dtype) -> str:
    """"fp32", "bf16", "fp16": the names of ``fastdit.models.DTYPES``."""
    return {value: key for key, value in DTYPES.items()}[dtype]


def implementation_dtype(implementation: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype an implementation computes in, in a benchmark of ``dtype``."""
    return {"reference-eager-fp32": torch.float32, "reference-eager-bf16": torch.bfloat16,
            RELEASE: torch.float32, "reference-sdpa-bf16": torch.bfloat16,
            "fastdit-fp8": torch.bfloat16, torchao_baseline.TORCHAO_FP8: torch.bfloat16,  # FP8 GEMMs, bf16 model
            }.get(implementation, dtype)


def unavailable_reason(implementation: str, device: torch.device, workload: str | None = None,
                       compile_on_cpu: bool = False) -> str | None:
    """Why ``implementation`` cannot (or by default does not) run ``workload`` on ``device``; None if it can."""
    if implementation not in BENCH_IMPLEMENTATIONS:
        raise ValueError(f"implementation: expected one of {', '.join(BENCH_IMPLEMENTATIONS)}, got {implementation!r}")
    if implementation in ("fastdit-fp8", torchao_baseline.TORCHAO_FP8) and workload == "training-step":
        return "not measured: FP8 is an inference path"
    if implementation == "fastdit-fp8":
        try:
            check_fp8_device(device)
        except ValueError as error:
            return str(error)
    if implementation == torchao_baseline.TORCHAO_FP8 and (reason := torchao_baseline.unavailable_reason(device)):
        return reason
    if workload == "sampling-run" and implementation not in SAMPLING_RUNS:
        return f"not measured: a whole sampling run is timed for {', '.join(SAMPLING_RUNS)}"
    if implementation == "fastdit-cudagraphs":
        if device.type != "cuda":
            return "CUDA graphs need a CUDA device"
        if workload == "training-step":
            return "not measured: fastdit captures sampling steps, not training steps"
    if implementation.endswith("-compiled") and device.type != "cuda" and not compile_on_cpu:
        return "torch.compile is off on the CPU by default (compiling takes minutes there)"
    return None


@dataclasses.dataclass(frozen=True)
class Inputs:
    """One batch: latents x, timesteps t, labels y and the noise a sampling or training step uses."""

    x: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor
    noise: torch.Tensor

    @classmethod
    def draw(cls, batch: int, model, device: torch.device, seed: int = 0) -> "Inputs":
        generator = torch.Generator().manual_seed(seed)
        shape = (batch, model.in_channels, model.input_size, model.input_size)
        x, noise = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
        t = torch.randint(0, 1000, (batch,), generator=generator)
        y = torch.randint(0, model.num_classes, (batch,), generator=generator)
        return cls(*(tensor.to(device) for tensor in (x, t, y, noise)))


class ModelSet:
    """The models of one configuration, all with one set of perturbed weights rounded to bf16 and
    ``dtype`` (so the fp32 reference is the oracle of every precision). ``model(implementation)`` is built
    once and kept; ``trainable(implementation)`` is a fresh fp32 copy, as training mutates it."""

    def __init__(self, name: str, input_size: int, dtype: torch.dtype, device, seed: int = 0):
        self.name, self.input_size, self.dtype, self.device = name, input_size, dtype, torch.device(device)
        with self.device:  # initialised where it runs: an XL/2's init on the host takes seconds
            model = perturb_(reference.DiT_models[name](input_size=input_size), seed=seed)
        with torch.no_grad():  # values every precision in play holds exactly
            for parameter in model.parameters():
                for precision in (torch.bfloat16, dtype):
                    parameter.copy_(parameter.to(precision))
        self.reference = model.eval()
        self._models = {BASELINE: self.reference}

    def _eager(self, implementation: str) -> torch.nn.Module:
        """A fresh fp32 copy of the weights as ``implementation``'s module: built on the meta device and
        given the copy (``assign=True``), so no initialisation runs only to be overwritten."""
        family = implementation.split("-")[0]
        with torch.device("meta"):
            module = (reference.DiT_models if family == "reference" else fastdit.DiT_models)[self.name](
                input_size=self.input_size)
        state = {name: tensor.clone() for name, tensor in self.reference.state_dict().items()}
        module.load_state_dict(state, strict=True, assign=True)
        if "-sdpa-" in implementation:
            for block in module.blocks:
                block.attn.forward = _sdpa_attention.__get__(block.attn)
        return module.eval()

    def model(self, implementation: str):
        """The model (a module, maybe compiled) that ``implementation`` runs inference with."""
        if implementation == "fastdit-cudagraphs":  # the eager model; the workload captures it
            implementation = "fastdit-eager"
        if implementation not in self._models:
            torchao = implementation == torchao_baseline.TORCHAO_FP8  # the release's model, then torchao's pass
            model = self._eager("reference-sdpa-bf16" if torchao else implementation)
            model = model.to(implementation_dtype(implementation, self.dtype))
            if implementation == "fastdit-fp8":
                model.quantize("fp8")
            if torchao:
                model = compiled(torchao_baseline.quantize_(model), self.device)
            if implementation.endswith("-compiled"):
                model = compiled(model, self.device, implementation.split("-")[0])
            self._models[implementation] = model
        return self._models[implementation]

    def trainable(self, implementation: str):
        """(fp32 module to optimise, its forward, autocast dtype or None) for a training step."""
        module = forward = self._eager(implementation)
        if implementation.endswith("-compiled"):
            forward = compiled(module, self.device, implementation.split("-")[0])
        dtype = implementation_dtype(implementation, self.dtype)
        return module, forward, (None if dtype == torch.float32 else dtype)


def _sdpa_attention(self, x):
    """The reference's Attention.forward with its softmax computed by SDPA, as timm's Attention does."""
    B, T, D = x.shape
    q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D))


@dataclasses.dataclass
class Workload:
    """``output()``: named tensors compared with the reference's (no lasting side effects);
    ``step()``: what is timed; ``images``: images one step processes; ``bounded``: whether the output must be
    within the model tolerance of the reference's (else its error is only reported)."""

    output: Callable[[], dict[str, torch.Tensor]]
    step: Callable[[], object]
    images: int
    bounded: bool = True


def _inference(step, implementation, device, images):
    if implementation == "fastdit-cudagraphs":
        step = cuda_graphed(step, device)
    return Workload(output=lambda: {"output": step().float()}, step=step, images=images)


def forward_workload(models: ModelSet, implementation: str, inputs: Inputs) -> Workload:
    model = models.model(implementation)
    x = inputs.x.to(implementation_dtype(implementation, models.dtype))

    @torch.no_grad()
    def step():
        return model(x, inputs.t, inputs.y)

    return _inference(step, implementation, models.device, len(x))


def sampling_step_workload(models: ModelSet, implementation: str, inputs: Inputs) -> Workload:
    model, device = models.model(implementation), models.device
    solver = make_solver("ddpm", SAMPLING_STEPS)
    index = len(solver) // 2  # every step costs the same; a middle one has unremarkable coefficients
    denoiser = GuidedDenoiser(model, inputs.y, model.num_classes, CFG_SCALE, GUIDANCE_CHANNELS,
                              model.in_channels, implementation_dtype(implementation, models.dtype))
    t = torch.full_like(inputs.t, int(solver.timesteps[index]))
    coefficients = solver.coefficients[index].to(device, torch.float32)
    state = solver.initial_state(inputs.x)

    @torch.no_grad()
    def step():
        eps, variance_values = denoiser(inputs.x, t)
        return solver.step(inputs.x, eps, variance_values, coefficients, inputs.noise, state)[0]

    return _inference(step, implementation, device, len(inputs.x))


def training_step_workload(models: ModelSet, implementation: str, inputs: Inputs) -> Workload:
    module, forward, autocast_dtype = models.trainable(implementation)
    # train.py's optimizer: AdamW, lr 1e-4, no weight decay.
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, weight_decay=0.0, foreach=True)
    diffusion = create_diffusion("")
    device_type = models.device.type

    def losses():
        autocast = (torch.autocast(device_type, autocast_dtype) if autocast_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            return diffusion.training_losses(forward, inputs.x, inputs.t, {"y": inputs.y}, noise=inputs.noise)["loss"]

    def step():
        loss = losses().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    def output():
        module.zero_grad(set_to_none=True)
        loss = losses()
        loss.mean().backward()
        # All gradients as one vector: measured against the largest gradient, as the optimizer
        # sees them; a parameter whose gradients are all tiny would make its own ratio noise. In the
        # release's order, so the fast model's stacked adaLN gradients line up with the reference's.
        named = {name: p.grad for name, p in module.named_parameters() if p.grad is not None}
        if modulation.WEIGHT in named:
            modulation.split_into_release_keys(module, named)
        gradients = torch.cat([grad.float().flatten() for grad in named.values()])
        module.zero_grad(set_to_none=True)
        return {"loss": loss.detach().float(), "gradients": gradients}

    return Workload(output=output, step=step, images=len(inputs.x))


SAMPLING_RUNS = {  # implementation -> how ``fastdit.sample`` runs it
    BASELINE: {"cuda_graphs": False}, "fastdit-eager": {"cuda_graphs": False}, "fastdit-cudagraphs": {"cuda_graphs": True}}


def sampling_run_workload(models: ModelSet, implementation: str, inputs: Inputs) -> Workload:
    """A whole guided DDPM sample (the release's 250 steps) of the batch through ``fastdit.sample``, from the
    same noise for every implementation."""
    model = models.model(implementation)

    def step():
        return sample(model, inputs.y, sampler="ddpm", steps=SAMPLING_STEPS, cfg_scale=CFG_SCALE, noise=inputs.x,
                      seed=0, **SAMPLING_RUNS[implementation])

    return Workload(output=lambda: {"latents": step().float()}, step=step, images=len(inputs.x), bounded=False)


WORKLOAD_BUILDERS = {
    "forward": forward_workload,
    "sampling-step": sampling_step_workload,
    "training-step": training_step_workload,
    "sampling-run": sampling_run_workload,
}


def max_error(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest relative max error over the named outputs, and its name."""
    if actual.keys() != expected.keys():
        raise ParityError(f"outputs {sorted(actual)} differ from the reference's {sorted(expected)}")
    return max((relative_max_error(actual[name], expected[name]), name) for name in expected)


def check_parity(actual, expected, dtype: torch.dtype, what: str) -> float:
    """Raise ParityError unless every output is within the model tolerance of ``dtype``; return the error."""
    error, name = max_error(actual, expected)
    tolerance = MODEL_TOLERANCE[dtype]
    if not error <= tolerance:
        raise ParityError(f"{what}: {name} differs from the reference by {error:.3e} (relative max error), "
                          f"more than the {dtype_name(dtype)} tolerance {tolerance:.0e}")
    return error


CACHE_SAMPLER = "ddim"  # the digits model's sampler; DDIM is deterministic, so a run is a function of its noise
CACHE_IMPLEMENTATIONS = {  # fastdit implementation -> how ``sample`` runs it
    "fastdit-eager": {"compile": False, "cuda_graphs": False},
    "fastdit-compiled": {"compile": True, "cuda_graphs": False},
    "fastdit-cudagraphs": {"compile": False, "cuda_graphs": True},
}


@dataclasses.dataclass
class CachedRun:
    """``run()``: one sampling run's latents; ``blocks_per_image()``: the blocks the last ``run()`` ran per image
    (a guided forward's two halves count once)."""

    run: Callable[[], torch.Tensor]
    blocks_per_image: Callable[[], int]
    images: int


def cached_sampling_run(models: ModelSet, implementation: str, inputs: Inputs, cache, steps: int) -> CachedRun:
    """A guided DDIM run of ``steps`` steps of the fast model on ``inputs.y`` from seed 0's noise, under ``cache``
    (None: exact sampling) and ``implementation`` (one of CACHE_IMPLEMENTATIONS)."""
    if implementation not in CACHE_IMPLEMENTATIONS:
        raise ValueError(f"implementation: expected one of {', '.join(CACHE_IMPLEMENTATIONS)} for a cached "
                         f"sampling run, got {implementation!r}")
    model = models.model("fastdit-eager")  # sample compiles or captures it itself, per step kind under a cache
    config, depth, counts = caching.resolve(cache), len(model.blocks), []
    # A static plan's block count is fixed (tests/diffusion/test_caching.py counts it); FirstBlockCache decides
    # per step, so its blocks are counted with hooks, which fire in eager and compiled runs alike. (A static
    # cache's count under CUDA graphs could not be: hooks fire only while a graph is captured.)
    counted = config is not None and config.method == "fbcache"

    def run():
        counts.clear()
        hooks = [block.register_forward_hook(lambda *_: counts.append(1)) for block in model.blocks] if counted else []
        try:
            return sample(model, inputs.y, sampler=CACHE_SAMPLER, steps=steps, cfg_scale=CFG_SCALE, seed=0,
                          cache=config, **CACHE_IMPLEMENTATIONS[implementation])
        finally:
            for hook in hooks:
                hook.remove()

    def blocks_per_image():
        return len(counts) if counted else caching.block_evaluations(config, steps, depth)

    return CachedRun(run=run, blocks_per_image=blocks_per_image, images=len(inputs.y))


def latent_psnr(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """PSNR (dB) of ``actual`` against ``expected``, the peak being ``expected``'s range (latents have no fixed
    peak as uint8 images do); inf when they are equal."""
    expected, actual = expected.double(), actual.double()
    mse = float(((actual - expected) ** 2).mean())
    peak = float(expected.max() - expected.min())
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse) if peak > 0 else -math.inf
