"""The CUDA-graph runner: one whole denoising step captured over static buffers (x, the labels, the model's
timestep, the step's coefficient row, the step's noise) and replayed for every step, so a step costs one graph
launch; step 0 runs eagerly first, as the warm-up that capture needs. The captured step is kept with the model
and replayed by later calls with the same batch shape and settings, so a run of many batches captures once.
"""
import collections
import contextlib
import copy
import functools
import itertools

import torch


class GraphCaptureError(RuntimeError):
    """The denoising step could not be captured into a CUDA graph."""


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


def run_cuda_graph(model, denoiser, solver, noise, x, iterate, compile=False, cache=None):
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
