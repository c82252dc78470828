"""``sample``: class-conditional latents from a DiT, with classifier-free guidance and a CUDA-graph loop.

One denoising step = one (guided) forward of the model + one solver update (``fastdit.diffusion.samplers``). The
step and the plain loop are ``denoising.py``'s; on CUDA the whole step is captured once into a CUDA graph and
replayed for every step (``cuda_graphs.py``); the arguments and the output are checked by ``sample_checks.py``.
Noise is per image, so an image is the same whatever batch it is drawn in (``denoising.ImageNoise``).
"""
import contextlib
import warnings

import torch

from fastdit.diffusion import caching
from fastdit.diffusion.cuda_graphs import GraphCaptureError, run_cuda_graph
from fastdit.diffusion.denoising import NOISE_DRAWS, BatchNoise, GuidedDenoiser, ImageNoise, run_eager
from fastdit.diffusion.sample_checks import (
    NonFiniteSampleError,
    check_int,
    check_labels,
    check_number,
    nonfinite_cause,
)
from fastdit.diffusion import settings
from fastdit.diffusion.samplers import SAMPLERS, make_solver
from fastdit.diffusion.settings import has_null_class


def _progress(enabled, description):
    if not enabled:
        return lambda steps: steps
    try:
        from tqdm.auto import tqdm
    except ImportError as error:
        raise ImportError("progress=True needs tqdm (pip install tqdm)") from error
    return lambda steps: tqdm(steps, desc=description, leave=False)


def default_guidance_channels(in_channels: int) -> int | None:
    """The release guides 3 of its 4 latent channels; a pixel model's channels are all guided (None)."""
    return 3 if in_channels == 4 else None


def sample(model, class_labels, *, sampler=None, steps=None, cfg_scale=None, guidance_channels=None, noise=None,
           generator=None, seed=None, eta=0.0, first_index=0, progress=False, compile=False, cuda_graphs="auto",
           cache=None, spacing="release", final="release", noise_draw="per-image"):
    """Sample latents (N, C, H, W), fp32 on the model's device, for N = len(class_labels).

    model: a DiT (``fastdit.DiT`` or ``fastdit.reference.DiT``): ``model(x, t, y)`` -> (N, C or 2C, H, W).
    sampler, steps, cfg_scale: None takes the model's recommended settings (``fastdit.diffusion.settings``:
        the bundled digits model's DDIM 50 at guidance 4, else the release's DDPM 250 at guidance 4), and for a
        sampler other than the model's own its default steps (ddpm 250, ddim 25, dpm++ 20).
    sampler: "ddpm" (ancestral, learned variance; ``steps`` evenly respaced steps, 250 as the release),
        "ddim" (``eta``; ``steps=25`` uses the release's "ddim25" steps 960, 920, ..., 0),
        "dpm++" (DPM-Solver++ 2M, good at 10-25 steps).
    cfg_scale: classifier-free guidance scale s (1: none); guidance uses the null class ``model.num_classes``
        and applies to the first ``guidance_channels`` eps channels (None: the model's default, 3 of a 4-channel
        latent model's as the release, all of any other model's; ignored when cfg_scale == 1).
    noise: initial latents x_T (N, C, H, W); default drawn per image from (seed, first_index + k).
    seed / generator: the run's seed (int >= 0), or a torch.Generator to draw it from; default: drawn
        from torch's global generator (so torch.manual_seed makes runs repeatable).
    eta: DDIM's noise scale, in [0, 1] (0: deterministic DDIM; above 1 the update's sqrt goes negative).
    first_index: the global index of the first image (to draw a long run in batches with the same noise).
    compile: run the model through torch.compile. cuda_graphs: capture one whole step into a CUDA graph
        and replay it ("auto": when the model is on CUDA, falling back to eager steps with a warning when
        the model's forward cannot be captured, e.g. it copies a CPU tensor to the GPU; True: such a model
        is an error, as is a model on the CPU). A captured step is reused by later calls with the same batch
        size, sampler and guidance (at most ``cuda_graphs.MAX_GRAPHS_PER_MODEL`` such steps are kept per model).
    cache: skip the blocks at some steps, reusing or forecasting their contribution (``fastdit.diffusion.caching``,
        docs/caching.md): None (off: every block at every step), "taylorseer", "fbcache" or "fora" with their
        defaults, or a policy object such as ``caching.TaylorSeer(interval=3, order=1)``. Needs a ``fastdit.DiT``.
        "fbcache" decides per step from the data (one host read per step) and so runs without CUDA graphs
        (an error with cuda_graphs=True).
    spacing / final: diffusers' conventions, to reproduce a diffusers run (``fastdit.diffusion.samplers``):
        ddim's timesteps "release" (default), or DDIMScheduler's "leading", "trailing", "linspace"; dpm++'s last
        step "release" (to t = 0) or "zero" (DPMSolverMultistepScheduler's final_sigmas_type="zero").
    noise_draw: "per-image" (default: image k's noise from (seed, first_index + k), the same in any batch) or
        "batch" (diffusers' way: x_T and each step's noise for the whole batch from ``generator``, or from a
        generator seeded with ``seed``; the generator's state is read, not advanced).
    """
    for name in ("in_channels", "out_channels", "input_size", "num_classes"):
        if not hasattr(model, name):
            raise TypeError(f"model must be a DiT with attribute {name!r}; got {type(model).__name__}")
    sampler, steps, cfg_scale = settings.resolve(model, sampler, steps, cfg_scale)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    steps = check_int("steps", steps, 1, 1000)
    cfg_scale = check_number("cfg_scale", cfg_scale)
    eta = check_number("eta", eta)
    first_index = check_int("first_index", first_index, 0)
    if eta != 0 and sampler != "ddim":
        raise ValueError(f"eta applies to the ddim sampler only, got eta={eta} with sampler {sampler!r}")
    if eta > 1:  # sqrt(1 - abar_prev - sigma^2) is NaN once sigma^2 passes 1 - abar_prev
        raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: ancestral noise), got {eta}")
    channels, size = model.in_channels, model.input_size
    if cfg_scale == 1.0:
        guidance_channels = channels  # no guidance: the setting is unused, whatever it is
    elif guidance_channels is None:
        guidance_channels = default_guidance_channels(channels) or channels
    else:
        guidance_channels = check_int("guidance_channels", guidance_channels, 1, channels)
    if cfg_scale != 1.0 and not has_null_class(model):
        raise ValueError(f"cfg_scale={cfg_scale} needs the null class, but this model has no null class embedding "
                         "(it was built with class_dropout_prob=0); use cfg_scale=1")
    if cuda_graphs not in ("auto", True, False):
        raise ValueError(f"cuda_graphs must be 'auto', True or False, got {cuda_graphs!r}")
    cache_config = caching.resolve(cache)
    if cache_config is not None and cache_config.method == "fbcache":
        if cuda_graphs is True:
            raise ValueError("cache fbcache decides each step on the host from the first block's output, so it runs "
                             "without CUDA graphs; pass cuda_graphs='auto' or False, or a static cache (fora, "
                             "taylorseer)")
        cuda_graphs = False
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None else torch.float32
    use_graph = device.type == "cuda" if cuda_graphs == "auto" else cuda_graphs
    if use_graph and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs the model on a CUDA device; it is on {device}")
    labels = check_labels(class_labels, model.num_classes, device)
    shape = (len(labels), channels, size, size)
    if noise is not None:
        if not isinstance(noise, torch.Tensor) or not noise.dtype.is_floating_point:
            raise TypeError(f"noise must be a floating-point tensor, got {type(noise).__name__}")
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape} (labels, channels, size, size), got {tuple(noise.shape)}")
    if seed is not None and generator is not None:
        raise ValueError("pass seed or generator, not both")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if noise_draw not in NOISE_DRAWS:
        raise ValueError(f"noise_draw must be one of {', '.join(NOISE_DRAWS)}, got {noise_draw!r}")
    batch_generator = generator if noise_draw == "batch" else None  # used as it is: no seed drawn from it
    if batch_generator is None:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), generator=generator,
                                     device=generator.device if generator is not None else "cpu"))
        seed = check_int("seed", seed, 0)
        if noise_draw == "batch":
            batch_generator = torch.Generator().manual_seed(seed)
    batch_noise_state = None if batch_generator is None else batch_generator.get_state()

    solver = make_solver(sampler, steps, eta, spacing=spacing, final=final)

    def start():
        if noise_draw == "batch":
            image_noise = BatchNoise(batch_generator.device, batch_noise_state, len(labels), shape[1:])
        else:
            image_noise = ImageNoise(seed, first_index, len(labels), shape[1:])
        x_T = image_noise.next()  # drawn even when noise is given, so the step noise is the same either way
        return image_noise, (x_T if noise is None else noise).to(device=device, dtype=torch.float32)

    feature_cache = None if cache_config is None else caching.FeatureCache(model, cache_config, steps, compile)
    forward = feature_cache or (torch.compile(model) if compile else model)
    denoiser = GuidedDenoiser(forward, labels, model.num_classes, cfg_scale, guidance_channels, channels, dtype)
    iterate = _progress(progress, f"{sampler} sampling")
    was_training = model.training
    model.eval()  # label dropout is a training-time augmentation
    try:
        with torch.no_grad():
            x = None
            if use_graph:
                try:
                    x = run_cuda_graph(model, denoiser, solver, *start(), iterate, compile, feature_cache)
                except GraphCaptureError as error:
                    if cuda_graphs is True:
                        raise RuntimeError(f"cuda_graphs=True, but the model's step cannot be captured into a CUDA "
                                           f"graph: {error}") from error
                    warnings.warn(f"sampling without CUDA graphs: the step could not be captured ({error})",
                                  stacklevel=2)
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                if x is None:
                    x = run_eager(denoiser, solver, *start(), iterate, cache=feature_cache)
                if not bool(torch.isfinite(x).all()):  # a call's one host sync: no step checks its output
                    raise NonFiniteSampleError(f"{sampler} sampling ({steps} steps, cfg_scale={cfg_scale}) gave "
                                               f"non-finite samples: "
                                               f"{nonfinite_cause(model, denoiser, solver, start, feature_cache)}")
            return x
    finally:
        model.train(was_training)
