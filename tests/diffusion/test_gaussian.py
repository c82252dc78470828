"""Tests of fastdit.diffusion.gaussian (schedule, respacing, posterior, q_sample, training loss), against the
formula-by-formula ``fastdit.diffusion.reference`` and the release's outputs in tests/data/release_diffusion.pt
(how that fixture was made: see tests/diffusion/test_sampling.py's docstring)."""
import math
import os

import pytest
import torch
from parity import relative_max_error

from fastdit.diffusion import reference as reference_diffusion
from fastdit.diffusion.gaussian import GaussianDiffusion, create_diffusion, linear_betas, space_timesteps
from fastdit.reference import DiT

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "release_diffusion.pt")


def tiny_dit(seed=0, class_dropout_prob=0.1, learn_sigma=True):
    """The tests' tiny DiT with every weight drawn from a seeded generator, in sorted name order.

    The adaLN-Zero init zeroes the output layer (eps = 0 everywhere), so the weights are replaced:
    N(0, 1/fan_in) for matrices, N(0, 0.02^2) for vectors; pos_embed keeps its fixed sin-cos values.
    The recipe depends only on parameter names and shapes, not on the init code, so the committed
    fixture of the release's outputs stays valid.
    """
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10,
                class_dropout_prob=class_dropout_prob, learn_sigma=learn_sigma)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if name == "pos_embed":
                continue
            std = parameter[0].numel() ** -0.5 if parameter.dim() > 1 else 0.02
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model.eval()


def release_fixture():
    """Outputs of the DiT release's ``diffusion`` package on ``tiny_dit()`` (see test_sampling's docstring)."""
    fixture = torch.load(FIXTURE, weights_only=True)
    probe = tiny_dit()(fixture["probe_x"], fixture["probe_t"], fixture["probe_y"])
    assert relative_max_error(probe, fixture["probe"]) < 1e-5, \
        "tiny_dit() no longer computes what it did when the fixture was made: fix the model or remake the fixture"
    return fixture


def test_linear_schedule_is_float64_and_matches_reference():
    betas = linear_betas()
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4, abs=1e-18) and betas[-1].item() == pytest.approx(0.02, abs=1e-17)
    torch.testing.assert_close(betas, torch.tensor(reference_diffusion.linear_betas(), dtype=torch.float64),
                               rtol=1e-14, atol=0)
    torch.testing.assert_close(create_diffusion("").alphas_cumprod,
                               torch.tensor(reference_diffusion.alphas_cumprod(), dtype=torch.float64),
                               rtol=1e-13, atol=0)


def test_spacing_equals_the_releases():
    for spacing, kept in release_fixture()["spacings"].items():
        assert space_timesteps(1000, spacing) == kept, spacing
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    assert space_timesteps(1000, [10, 15, 20]) == space_timesteps(1000, "10,15,20")


@pytest.mark.parametrize("spacing, message", [("ddim600", "no integer stride"), ("600,600", "cannot take 600"),
                                              ("0", "positive")])
def test_spacing_errors(spacing, message):
    with pytest.raises(ValueError, match=message):
        space_timesteps(1000, spacing)


def test_respacing_keeps_alphas_cumprod_and_maps_timesteps():
    full = create_diffusion("")
    spaced = create_diffusion("250")
    kept = space_timesteps(1000, "250")
    assert spaced.num_timesteps == 250 and spaced.timestep_map.tolist() == kept
    torch.testing.assert_close(spaced.alphas_cumprod, full.alphas_cumprod[kept], rtol=1e-12, atol=0)
    assert spaced.model_timesteps(torch.tensor([0, 249])).tolist() == [0, 999]


@pytest.mark.parametrize("t", [1, 37, 999])
def test_posterior_is_the_product_of_the_two_gaussians(t):
    """q(x_{t-1} | x_t, x_0) ~ q(x_t | x_{t-1}) q(x_{t-1} | x_0): precisions add, means are precision-weighted."""
    d = create_diffusion("")
    x_start, x_t = torch.randn(2, 3, 4, 4, dtype=torch.float64).unbind(0)
    steps = torch.full((3,), t)
    mean, variance, log_variance = d.q_posterior_mean_variance(x_start, x_t, steps)
    beta, abar_prev = d.betas[t].item(), d.alphas_cumprod[t - 1].item()
    precision = 1 / (1 - abar_prev) + (1 - beta) / beta
    expected_mean = (math.sqrt(abar_prev) * x_start / (1 - abar_prev) + math.sqrt(1 - beta) * x_t / beta) / precision
    torch.testing.assert_close(mean, expected_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(variance.flatten(), torch.full((3,), 1 / precision, dtype=torch.float64))
    torch.testing.assert_close(log_variance.exp(), variance)


def test_q_sample_formula_and_errors():
    d = create_diffusion("")
    x_start, noise = torch.randn(2, 2, 4, 4, 4).unbind(0)
    t = torch.tensor([0, 500])
    expected = torch.stack([math.sqrt(a) * x_start[i] + math.sqrt(1 - a) * noise[i]
                            for i, a in enumerate(reference_diffusion.alphas_cumprod()[s] for s in t.tolist())])
    torch.testing.assert_close(d.q_sample(x_start, t, noise), expected)
    with pytest.raises(ValueError, match="noise has shape"):
        d.q_sample(x_start, t, noise[:1])
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion(torch.tensor([0.1, 1.5]))


def test_learned_range_interpolates_log_variance():
    d = create_diffusion("")
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 10, 999])
    eps = torch.randn_like(x)
    low = d.p_mean_variance(torch.cat([eps, -torch.ones_like(x)], 1), x, t)["log_variance"]
    high = d.p_mean_variance(torch.cat([eps, torch.ones_like(x)], 1), x, t)["log_variance"]
    mid = d.p_mean_variance(torch.cat([eps, torch.zeros_like(x)], 1), x, t)["log_variance"]
    clipped = [math.log(d.posterior_variance[max(s, 1)].item()) for s in t.tolist()]
    torch.testing.assert_close(low[:, 0, 0, 0], torch.tensor(clipped, dtype=torch.float64))
    torch.testing.assert_close(high[:, 0, 0, 0], torch.log(d.betas[t]))
    torch.testing.assert_close(mid, (low + high) / 2)
    fixed = d.p_mean_variance(eps, x, t)  # no variance channels: fixed large variance beta_t
    torch.testing.assert_close(fixed["log_variance"][1:], high[1:])
    with pytest.raises(ValueError, match="channels"):
        d.p_mean_variance(eps[:, :3], x, t)


def test_training_losses_equal_the_releases_and_the_reference():
    loss = release_fixture()["loss"]
    model = tiny_dit()
    with torch.no_grad():
        x_start, t, y, noise = loss["x_start"], loss["t"], loss["y"], loss["noise"]
        terms = create_diffusion("").training_losses(model, x_start, t, dict(y=y), noise=noise)
        mse, vb, total = reference_diffusion.training_losses(model, x_start, t, y, noise)
    for name, reference in (("mse", mse), ("vb", vb), ("loss", total)):
        torch.testing.assert_close(terms[name], loss[name], rtol=1e-5, atol=1e-6, msg=f"{name} vs release")
        # fp32 vs float64: the decoder term's bin probability Phi(b) - Phi(a) cancels, ~1e-5 relative in fp32.
        torch.testing.assert_close(terms[name].double(), reference, rtol=1e-4, atol=1e-6, msg=f"{name} vs reference")


def test_variational_term_trains_only_the_variance():
    d = create_diffusion("")
    output = torch.randn(4, 8, 4, 4, requires_grad=True)
    x_start = torch.rand(4, 4, 4, 4) * 2 - 1
    terms = d.training_losses(lambda x, t: output, x_start, torch.tensor([0, 3, 400, 999]))
    (grad_vb,) = torch.autograd.grad(terms["vb"].sum(), output, retain_graph=True)
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), output)
    assert grad_vb[:, :4].abs().max() == 0 and grad_vb[:, 4:].abs().max() > 0
    assert grad_mse[:, 4:].abs().max() == 0 and grad_mse[:, :4].abs().max() > 0
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    rescaled = create_diffusion("250").training_losses(lambda x, t: output, x_start, torch.tensor([0, 3, 40, 249]),
                                                      noise=torch.zeros_like(x_start), rescale_vb=True)
    plain = create_diffusion("250").training_losses(lambda x, t: output, x_start, torch.tensor([0, 3, 40, 249]),
                                                   noise=torch.zeros_like(x_start))
    torch.testing.assert_close(rescaled["vb"], plain["vb"] * 0.25)
