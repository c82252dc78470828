"""Tests of ``fastdit.sample`` and the solver steps, against the release and ``fastdit.diffusion.reference``.

Fixture tests/data/release_diffusion.pt: outputs of the DiT release's ``diffusion`` package (facebookresearch/DiT
at ed81ce2229091fd4ecc9a223645f95cf379d582b) on ``tiny_dit()``, made by tests/data/make_release_fixtures.py (not
run by the tests: it imports the release; its docstring says how to get it): with the release on the path, build
``tiny_dit()``, draw from ``torch.Generator().manual_seed(2024)`` the initial noise (4, 4, 8, 8) for labels
[1, 4, 7, 9] and per-step noise (values rounded to fp16, stored as fp16), then run
``create_diffusion("ddim25").ddim_sample_loop(fn, z.shape, z, clip_denoised=False, model_kwargs=..., eta=0)``
with ``fn = model.forward`` (z = noise) and with the release's ``DiT.forward_with_cfg`` applied to the model
(z = [noise; noise], y = [labels; 10], cfg_scale 4), keeping the first half; likewise eta=1 (cfg 1.5) and
``create_diffusion("20").p_sample_loop`` (cfg 1 and 4) with the release's per-step ``th.randn_like`` replaced
by the stored step noise; plus ``create_diffusion("").training_losses`` on a batch with t = 0, 1, 500, 999,
several ``space_timesteps`` lists, and one model output as a probe that the model is unchanged.
"""
import warnings

import pytest
import torch
from parity import build_pair, relative_max_error
from test_gaussian import release_fixture, tiny_dit

import fastdit
from fastdit.diffusion import reference as reference_diffusion
from fastdit.diffusion.gaussian import create_diffusion, space_timesteps
from fastdit.diffusion.samplers import dpm_solver_timesteps, make_solver
from fastdit.diffusion.denoising import GuidedDenoiser, ImageNoise, run_eager
from fastdit.diffusion.sampling import sample

RELEASE_TOLERANCE = 1e-3  # the bound; the measured error is ~1e-6 (fp32 rounding order)
REFERENCE_TOLERANCE = 1e-5  # fp32 fast path vs the float64 reference
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class StoredNoise:
    def __init__(self, steps):
        self.steps = iter(steps.float())

    def next(self):
        return next(self.steps)


@pytest.mark.parametrize("cfg_scale, key", [(1.0, "ddim25"), (4.0, "ddim25_cfg4")])
def test_ddim25_equals_the_release(cfg_scale, key):
    fixture = release_fixture()
    out = sample(tiny_dit(), fixture["labels"], sampler="ddim", steps=25, cfg_scale=cfg_scale,
                 noise=fixture["noise"].float())
    assert relative_max_error(out, fixture[key]) <= RELEASE_TOLERANCE


@pytest.mark.parametrize("key, sampler, steps, cfg_scale, eta", [
    ("ddpm20", "ddpm", 20, 1.0, 0.0), ("ddpm20_cfg4", "ddpm", 20, 4.0, 0.0),
    ("ddim25_eta1_cfg1.5", "ddim", 25, 1.5, 1.0)])
def test_noisy_samplers_equal_the_release_given_its_step_noise(key, sampler, steps, cfg_scale, eta):
    fixture, model = release_fixture(), tiny_dit()
    labels, noise = fixture["labels"], fixture["noise"].float()
    step_noise = fixture["ddpm_step_noise" if sampler == "ddpm" else "ddim_step_noise"]
    denoiser = GuidedDenoiser(model, labels, model.num_classes, cfg_scale, 3, 4, torch.float32)
    with torch.no_grad():
        fast = run_eager(denoiser, make_solver(sampler, steps, eta), StoredNoise(step_noise), noise, iter)
    assert relative_max_error(fast, fixture[key]) <= RELEASE_TOLERANCE
    kept = space_timesteps(1000, "20" if sampler == "ddpm" else "ddim25")
    if sampler == "ddpm":
        reference = reference_diffusion.ddpm_sample(model, noise, labels, kept, StoredNoise(step_noise).next, cfg_scale)
    else:
        reference = reference_diffusion.ddim_sample(model, noise, labels, kept, StoredNoise(step_noise).next, eta,
                                                    cfg_scale)
    assert relative_max_error(reference, fixture[key]) <= RELEASE_TOLERANCE


def _reference(model, labels, sampler, steps, seed, cfg_scale, guidance_channels, eta):
    noise = ImageNoise(seed, 0, len(labels), (4, 8, 8))
    x_T, labels = noise.next(), torch.tensor(labels)
    if sampler == "dpm++":
        return reference_diffusion.dpmpp_2m_sample(model, x_T, labels, dpm_solver_timesteps(steps), cfg_scale,
                                                   guidance_channels)
    spacing = f"ddim{steps}" if sampler == "ddim" else str(steps)
    run = reference_diffusion.ddpm_sample if sampler == "ddpm" else reference_diffusion.ddim_sample
    extra = (eta,) if sampler == "ddim" else ()
    return run(model, x_T, labels, space_timesteps(1000, spacing), noise.next, *extra, cfg_scale, guidance_channels)


@pytest.mark.parametrize("sampler, steps, eta", [("ddpm", 50, 0.0), ("ddim", 25, 0.0), ("ddim", 10, 0.5),
                                                 ("dpm++", 10, 0.0), ("dpm++", 25, 0.0)])
@pytest.mark.parametrize("cfg_scale, guidance_channels", [(1.0, 3), (4.0, 3), (2.5, 4)])
def test_fast_samplers_equal_the_reference(sampler, steps, eta, cfg_scale, guidance_channels):
    model, labels = tiny_dit(), [0, 3, 9]
    out = sample(model, labels, sampler=sampler, steps=steps, eta=eta, cfg_scale=cfg_scale,
                 guidance_channels=guidance_channels, seed=11)
    expected = _reference(model, labels, sampler, steps, 11, cfg_scale, guidance_channels, eta)
    assert relative_max_error(out, expected) <= REFERENCE_TOLERANCE


def test_guidance_channels_and_unit_scale():
    model, labels = tiny_dit(), [1, 2]
    three = sample(model, labels, sampler="ddim", steps=10, cfg_scale=4.0, guidance_channels=3, seed=0)
    every = sample(model, labels, sampler="ddim", steps=10, cfg_scale=4.0, guidance_channels=4, seed=0)
    assert relative_max_error(three, every) > 1e-3
    assert torch.equal(sample(model, labels, sampler="ddim", steps=10, cfg_scale=4.0, seed=0), three)  # the default
    assert torch.equal(sample(model, labels, sampler="ddim", steps=10, seed=0), three)  # the release's scale, 4
    assert torch.equal(sample(model, labels, steps=10, seed=0, cfg_scale=1), sample(model, labels, steps=10, seed=0,
                                                                                    cfg_scale=1.0))


def test_an_images_noise_depends_only_on_seed_and_index():
    model, labels = tiny_dit(), [5, 6, 7, 8]
    whole = sample(model, labels, steps=20, seed=123)
    tail = sample(model, labels[2:], steps=20, seed=123, first_index=2)
    assert relative_max_error(tail, whole[2:]) <= REFERENCE_TOLERANCE  # only the batch's matmul blocking differs
    assert torch.equal(whole, sample(model, labels, steps=20, seed=123))
    assert relative_max_error(sample(model, labels, steps=20, seed=124), whole) > 1e-2
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(sample(model, labels, steps=5, generator=gen()), sample(model, labels, steps=5, generator=gen()))
    torch.manual_seed(9)
    first = sample(model, labels, steps=5)
    torch.manual_seed(9)
    assert torch.equal(first, sample(model, labels, steps=5))
    given = sample(model, labels, steps=20, seed=123, noise=ImageNoise(123, 0, 4, (4, 8, 8)).next())
    assert torch.equal(given, whole)  # explicit x_T leaves the step noise as it was


class GaussianData(torch.nn.Module):
    """The exact eps for data ~ N(mu, s^2): eps(x_t) = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar).
    Its probability-flow ODE keeps u = (x_t - sqrt(abar_t) mu) / sqrt(abar_t s^2 + 1 - abar_t) constant."""

    in_channels, out_channels, input_size, num_classes, learn_sigma = 4, 4, 4, 10, False

    def __init__(self, mu=0.3, s=0.5, variance_value=None):
        super().__init__()
        self.mu, self.s, self.variance_value = mu, s, variance_value
        self.out_channels = 4 if variance_value is None else 8
        self.abar = create_diffusion("").alphas_cumprod

    def forward(self, x, t, y):
        abar = self.abar[t].view(-1, 1, 1, 1).float()
        eps = (1 - abar).sqrt() * (x - abar.sqrt() * self.mu) / (abar * self.s**2 + 1 - abar)
        return eps if self.variance_value is None else torch.cat([eps, torch.full_like(eps, self.variance_value)], 1)

    def flow(self, x, t_from, abar_to):
        a = self.abar[t_from].item()
        u = (x - a**0.5 * self.mu) / (a * self.s**2 + 1 - a) ** 0.5
        return abar_to**0.5 * self.mu + (abar_to * self.s**2 + 1 - abar_to) ** 0.5 * u


def test_ode_solvers_follow_the_exact_flow_of_gaussian_data():
    model, x = GaussianData(), torch.randn(8, 4, 4, 4)
    errors = {}
    for sampler, steps in (("ddim", 25), ("ddim", 250), ("dpm++", 25)):
        out = sample(model, [0] * 8, sampler=sampler, steps=steps, noise=x)
        first = int(make_solver(sampler, steps).timesteps[0])
        end = 1.0 if sampler == "ddim" else model.abar[0].item()  # dpm++ ends at t = 0, DDIM at x0
        errors[sampler, steps] = relative_max_error(out, model.flow(x, first, end))
    assert errors["ddim", 250] < 0.02 < errors["ddim", 25]  # first order: error ~ 1 / steps
    assert errors["dpm++", 25] < errors["ddim", 25] / 3  # second order at the same cost


def test_ddpm_samples_the_gaussian_data_distribution():
    fixed = sample(GaussianData(), [0] * 400, steps=250, seed=1)
    learned = sample(GaussianData(variance_value=1.0), [0] * 400, steps=250, seed=1)
    assert torch.equal(fixed, learned)  # v = +1 is the fixed large variance beta_t
    assert abs(fixed.mean().item() - 0.3) < 0.01 and abs(fixed.std().item() / 0.5 - 1) < 0.02


def test_model_mode_is_restored_and_cfg_needs_the_null_class():
    model = tiny_dit().train()
    sample(model, [1], steps=2, seed=0)
    assert model.training
    with pytest.raises(ValueError, match="null class"):
        sample(tiny_dit(class_dropout_prob=0.0), [1], cfg_scale=4.0)
    sample(tiny_dit(class_dropout_prob=0.0), [1], steps=2, seed=0)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(sampler="euler"), ValueError, "ddpm, ddim, dpm\\+\\+"),
    (dict(steps=0), ValueError, "steps"),
    (dict(steps=2.5), TypeError, "steps"),
    (dict(cfg_scale=-1.0), ValueError, "cfg_scale"),
    (dict(class_labels=[3, 10]), ValueError, "class_labels.*\\[10\\]"),
    (dict(class_labels=[-1]), ValueError, "class_labels"),
    (dict(class_labels=[[1]]), ValueError, "1-D"),
    (dict(class_labels=[1.5]), TypeError, "integers"),
    (dict(noise=torch.zeros(2, 4, 8, 8)), ValueError, "noise must have shape \\(1, 4, 8, 8\\)"),
    (dict(noise=torch.zeros(1, 4, 8, 8, dtype=torch.long)), TypeError, "noise"),
    (dict(guidance_channels=5, cfg_scale=4.0), ValueError, "guidance_channels"),
    (dict(guidance_channels=0, cfg_scale=4.0), ValueError, "guidance_channels"),
    (dict(eta=0.5), ValueError, "eta applies to the ddim sampler"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=1, generator=torch.Generator()), ValueError, "seed or generator"),
    (dict(sampler="dpm++", steps=1000), ValueError, "dpm\\+\\+ takes"),
    (dict(cuda_graphs="yes"), ValueError, "cuda_graphs"),
])
def test_bad_arguments_are_clear_errors(kwargs, error, message):
    kwargs = {"class_labels": [1], **kwargs}
    with pytest.raises(error, match=message):
        sample(tiny_dit(), kwargs.pop("class_labels"), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_graphs_on_cpu_is_an_error():
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a CUDA device"):
        sample(tiny_dit(), [1], cuda_graphs=True)


def fast_dit(model_class=None):
    """fastdit's DiT (its Triton kernels on a GPU) with the tests' tiny shape and perturbed weights (an adaLN-Zero
    init would make eps 0 everywhere), on the GPU; ``model_class``: a subclass of fastdit.DiT to load them into."""
    _, fast = build_pair(None, 8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4)
    if model_class is not None:
        with torch.device("meta"):
            model = model_class(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                                num_classes=10)
        model.load_state_dict(fast.state_dict(), assign=True)
        fast = model.eval()
    return fast.cuda()


@pytest.fixture
def fp32_oracle(monkeypatch):
    """TF32 off (cuDNN and matmul): the eager fp32 run is the oracle that the CPU and the graphs are held to."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@cuda
@pytest.mark.launches_kernels
@pytest.mark.parametrize("sampler, steps, eta", [("ddpm", 50, 0.0), ("ddim", 25, 0.5), ("dpm++", 20, 0.0)])
@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_equals_eager(sampler, steps, eta, cfg_scale, compile, fp32_oracle):
    model, labels = fast_dit(), [0, 3, 9, 9, 2]
    kwargs = dict(sampler=sampler, steps=steps, eta=eta, cfg_scale=cfg_scale, seed=4)
    eager = sample(model, labels, cuda_graphs=False, **kwargs)
    with warnings.catch_warnings():
        # A failed capture must not fall back silently here; other warnings (Inductor's advice to enable
        # TF32, which this test turns off) are no failure.
        warnings.filterwarnings("error", message="sampling without CUDA graphs")
        graphed = sample(model, labels, cuda_graphs=True, compile=compile, **kwargs)
        again = sample(model, labels[::-1], cuda_graphs=True, compile=compile, **kwargs)  # the same captured step
    assert graphed.device.type == "cuda" and graphed.shape == (5, 4, 8, 8)
    assert relative_max_error(graphed, eager) <= (1e-4 if compile else 1e-6)
    assert relative_max_error(again, sample(model, labels[::-1], cuda_graphs=False, **kwargs)) <= (
        1e-4 if compile else 1e-6)
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    cpu = sample(model.cpu(), labels, **kwargs)
    assert relative_max_error(eager.cpu(), cpu) <= 1e-4  # same noise on every device


class HostReadingDiT(fastdit.DiT):
    """fastdit's DiT with a host read in its forward (a data-dependent Python branch): a CUDA graph cannot capture
    the device-to-host copy and sync that it needs."""

    def forward(self, x, t, y):
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x: expected finite latents")
        return super().forward(x, t, y)


@cuda
@pytest.mark.launches_kernels
def test_uncapturable_model_falls_back_to_eager_or_raises():
    model, labels = fast_dit(HostReadingDiT), [1, 2]
    eager = sample(model, labels, steps=10, seed=0, cuda_graphs=False)
    with pytest.warns(UserWarning, match="without CUDA graphs: the step could not be captured"):
        auto = sample(model, labels, steps=10, seed=0)
    assert torch.cuda.current_stream() == torch.cuda.default_stream()  # the failed capture left its stream
    assert relative_max_error(auto, eager) <= 1e-6
    with pytest.raises(RuntimeError, match="cuda_graphs=True"):
        sample(model, labels, steps=10, seed=0, cuda_graphs=True)


def test_compile_equals_eager():
    model = tiny_dit()
    eager = sample(model, [1, 2], sampler="dpm++", steps=5, cfg_scale=4.0, seed=0)
    compiled = sample(model, [1, 2], sampler="dpm++", steps=5, cfg_scale=4.0, seed=0, compile=True, cuda_graphs=False)
    assert relative_max_error(compiled, eager) <= 1e-4
