"""Tests of feature caching for sampling (``fastdit.diffusion.caching``, ``sample(..., cache=)``): the forward in
parts is the forward, the cache off and the policies at their exact settings are bit-equal to exact sampling,
each policy runs exactly the blocks it should, conservative settings stay close on the bundled digits model,
the CUDA-graph loop (faked on the CPU) equals the eager one, and each bad setting is one clear error."""
import contextlib
import os

import pytest
import torch
from parity import relative_max_error
from test_cuda_graphs import FakeCapture
from test_gaussian import tiny_dit

import fastdit
from fastdit.diffusion import caching, cuda_graphs
from fastdit.diffusion.caching import FORA, FeatureCache, FirstBlockCache, TaylorSeer
from fastdit.diffusion.denoising import GuidedDenoiser, ImageNoise, run_eager
from fastdit.diffusion.samplers import make_solver
from fastdit.diffusion.sampling import sample
from fastdit.reference import ADAPTIVE_DESIGNS, CONDITION_TOKENS

DIGITS = os.path.join(os.path.dirname(fastdit.__file__), "assets", "digits")
SAMPLERS = [("ddpm", 8, 0.0), ("ddim", 7, 0.0), ("ddim", 6, 0.5), ("dpm++", 7, 0.0)]


pytestmark = pytest.mark.usefixtures("torch_path")  # the cache logic, not the kernels: see conftest


def fast_tiny_dit(block="adaln-zero", depth=3):
    """A tiny fast DiT with tiny_dit's recipe of weights (the adaLN-Zero init would make eps 0 everywhere):
    N(0, 1/fan_in) matrices, N(0, 0.02^2) vectors, LayerNorm weights 1 + N(0, 0.02^2)."""
    model = fastdit.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=depth, num_heads=4,
                        num_classes=10, class_dropout_prob=0.1, block=block)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if name == "pos_embed":
                continue
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.dim() >= 2:
                parameter.copy_(noise / parameter[0].numel() ** 0.5)
            else:
                parameter.copy_(noise * 0.02 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model.eval()


@contextlib.contextmanager
def counted_blocks(model):
    """Counts every block forward (one per block per model forward, whatever the batch)."""
    counts = []
    handles = [block.register_forward_hook(lambda *_: counts.append(1)) for block in model.blocks]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def monolithic_forward(model, x, t, y):
    """The fast DiT's forward as one loop, as it was before it was split into parts (commit 7f646b0)."""
    from fastdit.kernels.modulate import modulate_layernorm
    from fastdit.kernels.patch_embed import patch_embed

    from fastdit.models.dit import linear_dtype
    from fastdit.models.modulation import modulations as modulations_of
    proj = model.x_embedder.proj
    dtype = linear_dtype(proj.weight)
    x = patch_embed(x.to(dtype), proj.weight.to(dtype), proj.bias, model.pos_embed)
    c = model.condition(t, y)
    c = torch.nn.functional.silu(c) if model.block in ADAPTIVE_DESIGNS else c.to(x.dtype)
    if model.block == "in-context":
        x = torch.cat([c, x], dim=1)
    layers = [*model.blocks, model.final_layer]
    if model.block in ADAPTIVE_DESIGNS:  # every adaLN modulation from the one stacked GEMM
        modulations = [output.chunk(layer.modulations, dim=1)
                       for layer, output in zip(layers, modulations_of(model, layers, c))]
    else:
        modulations = [layer.modulation(c) for layer in layers]
    h = modulate_layernorm(x, *modulations[0][:2])
    for block, modulation, (next_shift, next_scale, *_) in zip(model.blocks, modulations, modulations[1:]):
        x, h = block(x, h, modulation, next_shift, next_scale)
    if model.block == "in-context":
        h = h[:, CONDITION_TOKENS:]
    return model.unpatchify(model.final_layer(h))


@pytest.mark.parametrize("block", ["adaln-zero", "adaln", "cross-attn", "in-context"])
def test_the_forward_in_parts_is_bit_equal_to_the_one_loop(block):
    model = fast_tiny_dit(block)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([1, 2, 10])
    with torch.no_grad():
        assert torch.equal(model(x, t, y), monolithic_forward(model, x, t, y))


@pytest.mark.parametrize("sampler, steps, eta", SAMPLERS)
@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_cache_off_and_exact_settings_are_bit_equal_to_exact_sampling(sampler, steps, eta, cfg_scale):
    """cache=None is today's loop; interval 1 and threshold 0 run every block at every step, through the cache."""
    model, labels = fast_tiny_dit(), [3, 0, 9]
    kwargs = {"sampler": sampler, "steps": steps, "eta": eta, "cfg_scale": cfg_scale, "seed": 5}
    denoiser = GuidedDenoiser(model, torch.tensor(labels), 10, cfg_scale, 3, 4, torch.float32)
    noise = ImageNoise(5, 0, len(labels), (4, 8, 8))
    with torch.no_grad():
        loop = run_eager(denoiser, make_solver(sampler, steps, eta), noise, noise.next(), iter)
    exact = sample(model, labels, **kwargs)
    assert torch.equal(exact, loop)
    assert torch.equal(sample(model, labels, cache=None, **kwargs), exact)
    for policy in (FORA(interval=1), TaylorSeer(interval=1, order=2), FirstBlockCache(threshold=0.0)):
        assert torch.equal(sample(model, labels, cache=policy, **kwargs), exact), policy


@pytest.mark.parametrize("batch, cfg_scale", [(1, 1.0), (3, 4.0)])
@pytest.mark.parametrize("policy, steps, full_steps", [
    (FORA(interval=3), 10, 4),  # steps 0, 3, 6, 9
    (FORA(interval=4, warmup=3), 10, 5),  # 0, 1, 2, then 3, 7
    (TaylorSeer(interval=4, order=2), 10, 3),  # 0, 4, 8
    (TaylorSeer(interval=3, order=1, warmup=2), 9, 5),  # 0, 1, then 2, 5, 8
    (FirstBlockCache(threshold=1e9), 10, 1),  # only the first step runs every block
    (FirstBlockCache(threshold=1e9, warmup=4), 10, 4),
])
def test_each_policy_runs_exactly_the_blocks_it_should(policy, steps, full_steps, batch, cfg_scale):
    depth = 3
    model = fast_tiny_dit(depth=depth)
    with counted_blocks(model) as counts:
        out = sample(model, list(range(batch)), sampler="ddim", steps=steps, cfg_scale=cfg_scale, seed=0, cache=policy)
    skipped_steps_blocks = 1 if policy.method == "fbcache" else 0  # fbcache runs the first block every step
    expected = full_steps * depth + (steps - full_steps) * skipped_steps_blocks
    assert len(counts) == expected == caching.block_evaluations(policy, steps, depth, full_steps)
    assert len(counts) < steps * depth
    assert torch.isfinite(out).all()


def test_first_block_cache_runs_the_blocks_when_the_change_reaches_the_threshold():
    """Threshold 0 never skips; a huge threshold skips all but the warm-up; one between skips some steps (this
    random model's first-block change is 0.8 to 1.5 from step to step)."""
    model = fast_tiny_dit()
    runs = {}
    for threshold in (0.0, 1.0, 1e9):
        with counted_blocks(model) as counts:
            sample(model, [1, 2], sampler="ddim", steps=20, seed=0, cache=FirstBlockCache(threshold=threshold))
        runs[threshold] = len(counts)
    assert runs[0.0] == 20 * 3 and runs[1e9] == 3 + 19
    assert runs[1e9] < runs[1.0] < runs[0.0]


class LinearResidualModel(torch.nn.Module):
    """A stand-in DiT whose blocks add a residual linear in t and whose output is the stream after them."""

    block, blocks = "adaln-zero", torch.nn.ModuleList([torch.nn.Identity()] * 2)

    def __init__(self):
        super().__init__()
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, 4, 3), requires_grad=False)

    def embed(self, x, t, y):
        return x, x, None

    def run_blocks(self, x, h, modulations, start, stop):
        x = x + 2.0 - 0.25 * self.t.view(-1, 1, 1)
        return x, x

    def normed_input(self, x, modulations, index):
        return x

    def final_output(self, h):
        return h


@pytest.mark.parametrize("policy, exact", [
    (TaylorSeer(interval=3, order=1), True), (TaylorSeer(interval=4, order=2, warmup=1), True),
    (FORA(interval=3), False)])
def test_taylor_forecasts_a_residual_linear_in_the_step_exactly(policy, exact):
    """Once two full steps gave TaylorSeer its first difference, the slope of a linear R, its forecasts are exact
    (the second difference is 0); FORA's reuse lags behind."""
    model, steps = LinearResidualModel(), 12
    cache = FeatureCache(model, policy, steps)
    x = torch.randn(2, 4, 3)
    errors = []
    for i in range(steps):
        model.t = torch.full((2,), 100.0 - 8 * i)
        cache.prepare(i)
        expected = model.run_blocks(x, None, None, 0, 2)[0]
        errors.append(float((cache(x, model.t, None) - expected).abs().max()))
    second_full = [i for i in range(steps) if cache.full[i]][1]
    assert (max(errors[second_full:]) <= 1e-5) == exact, errors


@pytest.mark.parametrize("policy", [FORA(interval=2), TaylorSeer(interval=2, order=1), TaylorSeer(interval=3, order=2),
                                    FirstBlockCache(threshold=0.05)])
def test_conservative_settings_stay_close_to_exact_on_the_digits_model(policy):
    """The bundled digits model (trained), its sampling settings: ddim, 50 steps, guidance 4."""
    model, labels = fastdit.load(DIGITS), list(range(10))
    kwargs = {"sampler": "ddim", "steps": 50, "cfg_scale": 4.0, "seed": 3}
    exact = sample(model, labels, **kwargs)
    cached = sample(model, labels, cache=policy, **kwargs)
    assert torch.isfinite(cached).all()
    assert 0 < relative_max_error(cached, exact) <= 0.1  # measured: 0.02 to 0.08


@pytest.mark.parametrize("method", caching.METHODS)
@pytest.mark.parametrize("sampler, steps, eta", SAMPLERS)
def test_every_sampler_is_deterministic_with_a_cache(method, sampler, steps, eta):
    model = fast_tiny_dit()
    runs = [sample(model, [1, 7], sampler=sampler, steps=steps, eta=eta, cfg_scale=2.0, seed=11, cache=method)
            for _ in range(2)]
    assert torch.isfinite(runs[0]).all()
    assert torch.equal(*runs)


@pytest.mark.parametrize("method", ["fora", "taylorseer"])
def test_static_policies_keep_an_image_independent_of_its_batch(method):
    model = fast_tiny_dit()
    whole = sample(model, [4, 1, 8], sampler="ddim", steps=8, cfg_scale=3.0, seed=2, cache=method)
    alone = sample(model, [8], sampler="ddim", steps=8, cfg_scale=3.0, seed=2, first_index=2, cache=method)
    assert relative_max_error(alone, whole[2:]) <= 1e-5  # only the batch's matmul blocking differs


@pytest.mark.parametrize("policy, kinds", [(FORA(interval=3), 2), (TaylorSeer(interval=2, order=2), 2),
                                           (TaylorSeer(interval=1, order=1), 1)])
@pytest.mark.parametrize("sampler, steps, eta", [("ddpm", 8, 0.0), ("dpm++", 7, 0.0)])
def test_graph_loop_with_a_static_cache_equals_eager(policy, kinds, sampler, steps, eta, monkeypatch):
    """One captured graph per step kind, which reads the plan from buffers; a second call (another plan, a new
    cache object) replays the first call's graphs on their cache's buffers."""
    fake, model, labels = FakeCapture(monkeypatch), fast_tiny_dit(), torch.tensor([4, 0])

    def run(graphed, seed, steps):
        cache = FeatureCache(model, policy, steps)
        denoiser = GuidedDenoiser(cache, labels, model.num_classes, 3.0, 3, 4, torch.float32)
        solver, noise = make_solver(sampler, steps, eta), ImageNoise(seed, 0, len(labels), (4, 8, 8))
        with torch.no_grad():
            if graphed:
                return cuda_graphs.run_cuda_graph(model, denoiser, solver, noise, noise.next(), iter, False, cache)
            return run_eager(denoiser, solver, noise, noise.next(), iter, cache=cache)

    for seed, call_steps in ((0, steps), (1, steps + 3)):
        assert torch.equal(run(True, seed, call_steps), run(False, seed, call_steps))
        assert fake.captures == fake.warm_ups == kinds


def test_compiled_cached_steps_equal_eager_on_the_cpu():
    """compile=True compiles each step kind (full, cached) on its own: same blocks run, same samples."""
    model, labels = fast_tiny_dit(), [3, 8]
    kwargs = {"sampler": "ddim", "steps": 6, "cfg_scale": 4.0, "seed": 5, "cache": TaylorSeer(interval=2, order=2)}
    with counted_blocks(model) as counts:
        eager = sample(model, labels, **kwargs)
        eager_blocks = len(counts)
        counts.clear()
        compiled = sample(model, labels, compile=True, cuda_graphs=False, **kwargs)
    assert eager_blocks == len(counts) == caching.block_evaluations(kwargs["cache"], 6, len(model.blocks))
    assert relative_max_error(compiled, eager) <= 1e-5  # inductor may fuse the fp32 elementwise work differently


@pytest.mark.parametrize("cache, error, match", [
    ("nearest", ValueError, "cache: unknown method 'nearest'; expected one of taylorseer, fbcache, fora"),
    (3, TypeError, "cache must be None, one of taylorseer, fbcache, fora or a fastdit.diffusion.caching policy"),
])
def test_a_bad_cache_argument_is_one_clear_error(cache, error, match):
    with pytest.raises(error, match=match):
        sample(fast_tiny_dit(), [1], steps=2, cache=cache)


@pytest.mark.parametrize("build, error, match", [
    (lambda: FirstBlockCache(threshold=-0.1), ValueError, r"fbcache threshold must be a finite number >= 0 .*got -0.1"),
    (lambda: FirstBlockCache(threshold=float("nan")), ValueError, "fbcache threshold must be a finite number"),
    (lambda: FirstBlockCache(threshold="0.1"), TypeError, "fbcache threshold must be a number, got str"),
    (lambda: FirstBlockCache(warmup=0), ValueError, "fbcache warmup must be an int >= 1, got 0"),
    (lambda: FORA(interval=0), ValueError, "fora interval must be an int >= 1, got 0"),
    (lambda: FORA(interval=2.5), TypeError, "fora interval must be an int, got float 2.5"),
    (lambda: TaylorSeer(interval=0), ValueError, "taylorseer interval must be an int >= 1, got 0"),
    (lambda: TaylorSeer(order=3), ValueError, r"taylorseer order must be 1 or 2 \(forecasts up to second order"),
    (lambda: TaylorSeer(order=0), ValueError, "taylorseer order must be an int >= 1, got 0"),
    (lambda: TaylorSeer(warmup=-1), ValueError, "taylorseer warmup must be an int >= 0, got -1"),
    (lambda: caching.make_config("fora", order=2), ValueError, "cache fora: unknown setting 'order'"),
    (lambda: caching.make_config("taylor"), ValueError, "cache: unknown method 'taylor'"),
])
def test_each_bad_setting_is_one_clear_error(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_make_config_keeps_defaults_for_settings_left_out():
    assert caching.make_config("taylorseer", interval=5, order=None) == TaylorSeer(interval=5)


def test_a_cache_needs_the_fast_model():
    with pytest.raises(TypeError, match="cache needs a fastdit.DiT .*got fastdit.reference.DiT"):
        sample(tiny_dit(), [1], steps=2, cache="fora")


def test_fbcache_refuses_cuda_graphs_true():
    with pytest.raises(ValueError, match="cache fbcache decides each step on the host .* runs without CUDA graphs"):
        sample(fast_tiny_dit(), [1], steps=2, cache="fbcache", cuda_graphs=True)
