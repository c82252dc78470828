"""``sample``: class-conditional latents from a DiT, with classifier-free guidance and a CUDA-graph loop.

One denoising step = one (guided) forward of the model + one solver update (``fastdit.diffusion.samplers``). On CUDA
the whole step is captured once into a CUDA graph over static buffers (x, the labels, the model's timestep,
the step's coefficient row, the step's noise) and replayed for every step, so a step costs one graph launch;
step 0 runs eagerly first, as the warm-up that capture needs. The captured step is kept with the model and
replayed by later calls with the same batch shape and settings, so a run of many batches captures once.

Noise is per image: image k (``first_index + k``) draws its initial latent and then, step by step, its
sampler noise from its own generator seeded by (seed, k). An image is therefore the same whatever batch
it is drawn in, and a long run can be split into batches or over processes.
"""
import collections
import contextlib
import copy
import functools
import itertools
import warnings

import numpy as np
import torch

from fastdit.diffusion import caching
from fastdit.diffusion import settings
from fastdit.diffusion.samplers import SAMPLERS, make_solver
from fastdit.diffusion.settings import has_null_class
from fastdit.models.validation import check_class_ids, first_nonfinite
from fastdit.reference import classifier_free_guidance


def image_seed(seed: int, index: int) -> int:
    """A 64-bit generator seed for image ``index`` of run ``seed`` (SeedSequence mixes the pair)."""
    high, low = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return (int(high) << 32) | int(low)


class ImageNoise:
    """Standard normal noise of ``shape`` per image, drawn on the CPU (device-independent) from one
    generator per image: ``next()`` returns the next (count, *shape) draw, the first being x_T."""

    def __init__(self, seed: int, first_index: int, count: int, shape):
        self.generators = [torch.Generator().manual_seed(image_seed(seed, first_index + k)) for k in range(count)]
        self.shape = tuple(shape)

    def next(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])


class BatchNoise:
    """Standard normal noise for the whole batch from one generator, as diffusers' pipelines draw it: ``next()``
    returns the next (count, *shape) draw, the first being x_T. The generator starts from ``state`` at every
    construction, so a rerun of the same call draws the same noise."""

    def __init__(self, device, state, count: int, shape):
        self.generator = torch.Generator(device=device)
        self.generator.set_state(state)
        self.shape = (count, *shape)

    def next(self) -> torch.Tensor:
        return torch.randn(self.shape, generator=self.generator, device=self.generator.device)


NOISE_DRAWS = ("per-image", "batch")


class GuidedDenoiser:
    """(x, t) -> (eps, variance values or None), in fp32, with classifier-free guidance when cfg_scale != 1:
    one forward over [cond; null] and eps[:, :g] = eps_null + s (eps_cond - eps_null) on the first g =
    ``guidance_channels`` channels; the other eps channels and the variance channels come from the
    conditional half (the release's ``forward_with_cfg``)."""

    def __init__(self, forward, labels, null_label, cfg_scale, guidance_channels, channels, dtype):
        self.forward, self.cfg_scale, self.dtype = forward, cfg_scale, dtype
        self.guided = cfg_scale != 1.0
        self.channels, self.guidance_channels = channels, guidance_channels
        self.y = torch.cat([labels, torch.full_like(labels, null_label)]) if self.guided else labels

    def __call__(self, x, t):
        n, c = x.shape[0], self.channels
        x_in = x.to(self.dtype)
        if self.guided:
            x_in, t = torch.cat([x_in, x_in]), torch.cat([t, t])
        out = self.forward(x_in, t, self.y).float()
        if self.guided:
            out = classifier_free_guidance(out, self.cfg_scale, self.guidance_channels)[:n]
        return out[:, :c], (out[:, c:] if out.shape[1] == 2 * c else None)


class GraphCaptureError(RuntimeError):
    """The denoising step could not be captured into a CUDA graph."""


def _run_eager(denoiser, solver, noise, x, iterate, stop=None, cache=None):
    """The steps one by one; ``stop(i, eps, x)``, when given, is asked after each step whether to stop there.
    ``cache``: the denoiser's forward when it is a ``caching.FeatureCache``, told each step's index."""
    coefficients = solver.coefficients.to(x.device, torch.float32)
    state = solver.initial_state(x)
    t = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for i in iterate(range(len(solver))):
        t.fill_(int(solver.timesteps[i]))
        if cache is not None:
            cache.prepare(i)
        step_noise = noise.next().to(x.device) if solver.draws_noise else None
        eps, variance_values = denoiser(x, t)
        x, state = solver.step(x, eps, variance_values, coefficients[i], step_noise, state)
        if stop is not None and stop(i, eps, x):
            break
    return x


class NonFiniteSampleError(ValueError):
    """Sampling gave NaN or infinite values (a ValueError: the model or the settings are what is wrong)."""


def _nonfinite_cause(model, denoiser, solver, start, cache=None) -> str:
    """Why a call's samples are not finite: non-finite weights, else the first step that went wrong, found by
    running the steps again eagerly with a check after each (only on this failure path)."""
    if (name := first_nonfinite(itertools.chain(model.named_parameters(), model.named_buffers()))) is not None:
        return f"the model's weights are not finite ({name} holds NaN or inf)"
    image_noise, x_T = start()
    if not bool(torch.isfinite(x_T).all()):
        return "the initial noise is not finite (the noise argument holds NaN or inf)"
    found = []

    def stop(i, eps, x):
        where = f"step {i + 1} of {len(solver)} (timestep {int(solver.timesteps[i])})"
        if not bool(torch.isfinite(eps).all()):
            found.append(f"the model's output is not finite from {where} on, in {denoiser.dtype}")
        elif not bool(torch.isfinite(x).all()):
            found.append(f"the {solver.name} update is not finite from {where} on")
        return bool(found)

    _run_eager(denoiser, solver, image_noise, x_T, lambda steps: steps, stop, cache)
    return found[0] if found else "a rerun of the steps was finite: the sampling is not deterministic here"


def warm_up(fn, device):
    """Run fn eagerly on a side stream, as capture needs: it warms up the allocator, cuBLAS and torch.compile."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)


def capture(fn, device):
    """Record fn's kernels into a CUDA graph (nothing runs) and return its replay.

    Not ``torch.cuda.graph``: its exit ends the capture before it leaves the capture stream, so when fn fails,
    ``capture_end`` raises (a capture-invalidated error, fn's own error only as its ``__context__``) and the
    thread stays on the capture stream. Here the stream is always left, and the error raised is fn's."""
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))
    try:
        with torch.cuda.stream(stream):
            graph.capture_begin()
            try:
                fn()
            except BaseException:
                with contextlib.suppress(RuntimeError):  # ends the capture fn broke; fn's error is the cause
                    graph.capture_end()
                raise
            graph.capture_end()
    except RuntimeError as error:  # e.g. a model that copies a CPU tensor to the GPU in its forward
        raise GraphCaptureError(str(error).splitlines()[0] if str(error) else type(error).__name__) from error
    torch.cuda.current_stream(device).wait_stream(stream)
    return graph.replay


class GraphedStep:
    """One denoising step captured into a CUDA graph over static buffers: x, the labels, the model's timestep,
    the step's coefficient row and noise, and the solver's state. A capture costs a warm-up step, a recording
    pass and a private memory pool, so a step is captured once per key (``_graph_key``) and replayed for every
    step of every ``sample`` call with that key, i.e. of every batch of a long run. With a static feature cache
    (``cache``, the denoiser's forward, whose buffers the graphs read and write) each kind of step, all blocks
    or none, is its own graph, and the host picks the one its plan says."""

    def __init__(self, denoiser, solver, x, cache=None):
        self.denoiser = copy.copy(denoiser)
        self.denoiser.y = denoiser.y.clone()  # the graph reads the labels here; each call loads its own
        self.solver = solver
        self.x, self.state = x.clone(), solver.initial_state(x)
        self.t = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
        self.coef = torch.empty(solver.coefficients.shape[1], dtype=torch.float32, device=x.device)
        self.noise = torch.zeros_like(x) if solver.draws_noise else None
        self.cache = cache
        self.replays = {}  # step kind (None without a cache) -> its graph's replay

    def step(self, kind=None):
        if kind is not None:  # bound into the captured function: a replay of this graph is a step of this kind
            self.cache.kind = kind
        eps, variance_values = self.denoiser(self.x, self.t)
        x_next, next_state = self.solver.step(self.x, eps, variance_values, self.coef, self.noise, self.state)
        self.x.copy_(x_next)
        for buffer, value in zip(self.state, next_state):
            buffer.copy_(value)

    def run(self, denoiser, solver, noise, x, iterate):
        """Sample with this call's labels, schedule (same sampler, any number of steps), noise and x_T."""
        coefficients = solver.coefficients.to(x.device, torch.float32)
        self.x.copy_(x)
        self.denoiser.y.copy_(denoiser.y)
        for buffer, value in zip(self.state, solver.initial_state(x)):
            buffer.copy_(value)
        if self.cache is not None:
            self.cache.plan(len(solver))
        for i in iterate(range(len(solver))):
            self.t.fill_(int(solver.timesteps[i]))
            self.coef.copy_(coefficients[i])
            if self.noise is not None:
                self.noise.copy_(noise.next())
            kind = None
            if self.cache is not None:
                self.cache.prepare(i)
                kind = self.cache.kind
            if kind in self.replays:
                self.replays[kind]()
            else:  # the first step of its kind: run for real, as the warm-up, then recorded
                step = functools.partial(self.step, kind)
                warm_up(step, x.device)
                self.replays[kind] = capture(step, x.device)
        return self.x.clone()


MAX_GRAPHS_PER_MODEL = 4  # each holds its activations' memory pool: a few batch shapes, not every one ever seen


class _GraphCache(collections.OrderedDict):
    """A model's captured steps, least recently used first. A copy of the model gets none (its weights, which
    the graphs read by address, live elsewhere), and neither does a pickled one (a graph cannot be saved)."""

    def __deepcopy__(self, memo):
        return _GraphCache()

    def __reduce__(self):
        return _GraphCache, ()


def _graph_key(model, denoiser, solver, x, compile, cache=None):
    """What a captured step depends on: shapes, dtypes, device, the weights' addresses (a step reads them there,
    so weights replaced rather than updated in place need a new capture), the guidance settings, the
    solver's update rule (not its schedule, which the step reads from its buffers) and the cache policy."""
    weights = tuple(tensor.data_ptr() for tensor in itertools.chain(model.parameters(), model.buffers()))
    autocast = torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type)
    return (tuple(x.shape), x.device, denoiser.dtype, denoiser.cfg_scale, denoiser.guidance_channels,
            solver.name, solver.draws_noise, compile, autocast, weights, cache and cache.config)


def _run_cuda_graph(model, denoiser, solver, noise, x, iterate, compile=False, cache=None):
    # Graph capture and replay, streams and Triton launches use the current device, not the tensors': make
    # x's device current, or a model on cuda:1 would capture and replay on GPU 0's stream.
    with torch.cuda.device(x.device):
        graphs = vars(model).setdefault("_fastdit_cuda_graphs", _GraphCache())
        key = _graph_key(model, denoiser, solver, x, compile, cache)
        step = graphs.get(key)
        if isinstance(step, str):  # this step failed to capture before: do not warm up and fail again
            raise GraphCaptureError(step)
        if step is None:
            step = GraphedStep(denoiser, solver, x, cache)
            try:
                out = step.run(denoiser, solver, noise, x, iterate)
            except GraphCaptureError as error:
                graphs[key] = str(error)
                raise
            graphs[key] = step
            while len(graphs) > MAX_GRAPHS_PER_MODEL:
                graphs.popitem(last=False)
            return out
        graphs.move_to_end(key)
        return step.run(denoiser, solver, noise, x, iterate)


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


def _check_int(name, value, low=None, high=None):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return int(value)


def _check_number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def _check_labels(class_labels, num_classes, device):
    """class_labels as int64 on ``device``: a tensor, a numpy array or a sequence of int class ids."""
    if isinstance(class_labels, (str, bytes)) or not hasattr(class_labels, "__len__"):
        raise TypeError(f"class_labels must be a sequence of int class ids (a list, numpy array or tensor), got "
                        f"{type(class_labels).__name__} {class_labels!r:.40}")
    if len(class_labels) == 0:
        raise ValueError("class_labels must be a non-empty 1-D list of class ids, got an empty one")
    if isinstance(class_labels, torch.Tensor):
        labels = class_labels
    else:
        try:
            labels = torch.as_tensor(class_labels)
        except (TypeError, ValueError, RuntimeError, OverflowError) as error:
            huge = [label for label in class_labels if isinstance(label, int) and not -2**63 <= label < 2**63]
            if huge:
                raise ValueError(f"class_labels: class ids must be in [0, {num_classes - 1}] (the model has "
                                 f"{num_classes} classes), got {huge[0]}") from None
            raise TypeError(f"class_labels must be int class ids, got {class_labels!r:.60} ({error})") from None
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"class_labels must be integers, got dtype {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"class_labels must be a non-empty 1-D list of class ids, got shape {tuple(labels.shape)}")
    if labels.device.type == "meta":
        raise ValueError("class_labels: got a tensor on the meta device, which holds no values")
    check_class_ids(labels, num_classes, "class_labels")
    return labels.to(device=device, dtype=torch.long)


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
        size, sampler and guidance (at most ``MAX_GRAPHS_PER_MODEL`` such steps are kept per model).
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
    steps = _check_int("steps", steps, 1, 1000)
    cfg_scale = _check_number("cfg_scale", cfg_scale)
    eta = _check_number("eta", eta)
    first_index = _check_int("first_index", first_index, 0)
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
        guidance_channels = _check_int("guidance_channels", guidance_channels, 1, channels)
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
    labels = _check_labels(class_labels, model.num_classes, device)
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
        seed = _check_int("seed", seed, 0)
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
                    x = _run_cuda_graph(model, denoiser, solver, *start(), iterate, compile, feature_cache)
                except GraphCaptureError as error:
                    if cuda_graphs is True:
                        raise RuntimeError(f"cuda_graphs=True, but the model's step cannot be captured into a CUDA "
                                           f"graph: {error}") from error
                    warnings.warn(f"sampling without CUDA graphs: the step could not be captured ({error})",
                                  stacklevel=2)
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                if x is None:
                    x = _run_eager(denoiser, solver, *start(), iterate, cache=feature_cache)
                if not bool(torch.isfinite(x).all()):  # a call's one host sync: no step checks its output
                    raise NonFiniteSampleError(f"{sampler} sampling ({steps} steps, cfg_scale={cfg_scale}) gave "
                                               f"non-finite samples: "
                                               f"{_nonfinite_cause(model, denoiser, solver, start, feature_cache)}")
            return x
    finally:
        model.train(was_training)
