"""What ``fastdit bench`` and ``pytest benchmarks/`` time: the implementations of DiT they
compare and the workloads they run on one configuration.

Implementations (the names every report uses):
- ``reference-eager-fp32``: ``fastdit.reference`` in fp32, the baseline and the oracle;
- ``reference-eager-bf16``: the same model in bf16 (under autocast for training);
- ``reference-compiled``: the reference in the benchmark dtype under ``torch.compile``;
- ``fastdit-eager``, ``fastdit-compiled``: the fast model in the benchmark dtype;
- ``fastdit-cudagraphs``: the fast model's step captured into one CUDA graph and replayed.
Workloads: ``forward``, ``sampling-step`` (one guided DDPM step: the model on the batch and its
unconditional copy, then the solver update) and ``training-step`` (the diffusion loss, backward,
AdamW). Every workload has an ``output`` compared with the reference's before its ``step`` is timed.

``cached_sampling_run``: a whole guided DDIM run of the fast model under a feature cache (or exact, every
block at every step), the rows "cached vs exact sampling" of ``fastdit bench --cache``; a cache is checked
against exact sampling from the same noise, not against the reference's tolerance.
"""
import contextlib
import copy
import dataclasses
import math
from collections.abc import Callable

import torch

import fastdit
from fastdit import reference
from fastdit.diffusion import caching
from fastdit.diffusion.cuda_graphs import capture, warm_up
from fastdit.diffusion.denoising import GuidedDenoiser
from fastdit.diffusion.gaussian import create_diffusion
from fastdit.diffusion.samplers import make_solver
from fastdit.diffusion.sampling import sample
from fastdit.models import DTYPES
from fastdit.models.parity import MODEL_TOLERANCE, perturb_, relative_max_error

IMPLEMENTATIONS = ("reference-eager-fp32", "reference-eager-bf16", "reference-compiled",
                   "fastdit-eager", "fastdit-compiled", "fastdit-cudagraphs")
BASELINE = "reference-eager-fp32"
WORKLOADS = ("forward", "sampling-step", "training-step")

CFG_SCALE = 4.0  # the paper's guidance scale for its samples
SAMPLING_STEPS = 250  # the release's DDPM schedule; one of its steps is timed
GUIDANCE_CHANNELS = 3  # the release guides the first 3 latent channels


class ParityError(AssertionError):
    """An implementation's output differs from the reference's by more than the tolerance."""


def compile_mode(device: torch.device) -> str | None:
    # max-autotune searches GEMM configurations (and uses CUDA graphs) on the GPU; on the CPU
    # it only adds compile time.
    return "max-autotune" if device.type == "cuda" else None


def compiled(model, device: torch.device, fullgraph: bool = False):
    # dynamic=False: every batch shape gets its own specialised graph, as a deployment would.
    return torch.compile(model, mode=compile_mode(device), dynamic=False, fullgraph=fullgraph)


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
    return {"reference-eager-fp32": torch.float32, "reference-eager-bf16": torch.bfloat16}.get(implementation, dtype)


def unavailable_reason(implementation: str, device: torch.device, workload: str | None = None,
                       compile_on_cpu: bool = False) -> str | None:
    """Why ``implementation`` cannot (or by default does not) run ``workload`` on ``device``; None if it can."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation: expected one of {', '.join(IMPLEMENTATIONS)}, got {implementation!r}")
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
        model = perturb_(reference.DiT_models[name](input_size=input_size), seed=seed)
        with torch.no_grad():  # values every precision in play holds exactly
            for parameter in model.parameters():
                for precision in (torch.bfloat16, dtype):
                    parameter.copy_(parameter.to(precision))
        self.reference = model.to(self.device).eval()
        self._models = {BASELINE: self.reference}

    def _eager(self, family: str) -> torch.nn.Module:
        if family == "reference":
            return copy.deepcopy(self.reference)
        fast = fastdit.DiT_models[self.name](input_size=self.input_size)
        fast.load_state_dict(self.reference.state_dict(), strict=True)
        return fast.to(self.device).eval()

    def model(self, implementation: str):
        """The model (a module, maybe compiled) that ``implementation`` runs inference with."""
        if implementation == "fastdit-cudagraphs":  # the eager model; the workload captures it
            implementation = "fastdit-eager"
        if implementation not in self._models:
            family = implementation.split("-")[0]
            model = self._eager(family).to(implementation_dtype(implementation, self.dtype))
            if implementation.endswith("-compiled"):
                model = compiled(model, self.device, fullgraph=family == "fastdit")
            self._models[implementation] = model
        return self._models[implementation]

    def trainable(self, implementation: str):
        """(fp32 module to optimise, its forward, autocast dtype or None) for a training step."""
        family = implementation.split("-")[0]
        module = forward = self._eager(family)
        if implementation.endswith("-compiled"):
            forward = compiled(module, self.device, fullgraph=family == "fastdit")
        dtype = implementation_dtype(implementation, self.dtype)
        return module, forward, (None if dtype == torch.float32 else dtype)


@dataclasses.dataclass
class Workload:
    """``output()``: named tensors compared with the reference's (no lasting side effects);
    ``step()``: what is timed; ``images``: images one step processes."""

    output: Callable[[], dict[str, torch.Tensor]]
    step: Callable[[], object]
    images: int


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
        # sees them; a parameter whose gradients are all tiny would make its own ratio noise.
        gradients = torch.cat([p.grad.float().flatten() for p in module.parameters() if p.grad is not None])
        module.zero_grad(set_to_none=True)
        return {"loss": loss.detach().float(), "gradients": gradients}

    return Workload(output=output, step=step, images=len(inputs.x))


WORKLOAD_BUILDERS = {
    "forward": forward_workload,
    "sampling-step": sampling_step_workload,
    "training-step": training_step_workload,
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
