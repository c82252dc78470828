"""``fastdit.sample``'s checks: the guidance default fits the model, eta's range, the class labels a user may
pass, and non-finite samples, which are an error that names their cause (one host sync per call)."""
import numpy as np
import pytest
import torch
from test_gaussian import tiny_dit
from test_sampling import GaussianData

import fastdit
from fastdit.cli.options import BUNDLED_MODEL
from fastdit.diffusion.sampling import NonFiniteSampleError, sample


@pytest.fixture(scope="module")
def bundled():
    return fastdit.load(BUNDLED_MODEL)


def test_the_bundled_model_samples_with_the_defaults(bundled):
    """One channel: the default guides it (the release's 3 of 4 is for 4-channel latents only)."""
    out = sample(bundled, [1, 2], sampler="ddim", steps=2, seed=0)
    assert out.shape == (2, 1, 16, 16) and bool(torch.isfinite(out).all())
    guided = sample(bundled, [1, 2], sampler="ddim", steps=2, seed=0, cfg_scale=4.0)
    assert torch.equal(guided, sample(bundled, [1, 2], sampler="ddim", steps=2, seed=0, cfg_scale=4.0,
                                      guidance_channels=1))


@pytest.mark.parametrize("guidance_channels", [None, 1, 3, 4, 99, 0, "all"])
def test_guidance_channels_do_not_matter_without_guidance(guidance_channels):
    model = tiny_dit()
    unguided = sample(model, [1, 2], sampler="ddim", steps=3, seed=0, cfg_scale=1.0)
    assert torch.equal(sample(model, [1, 2], sampler="ddim", steps=3, seed=0, cfg_scale=1.0,
                              guidance_channels=guidance_channels), unguided)


def test_eta_is_checked_and_its_bounds_are_finite():
    model = tiny_dit()
    with pytest.raises(ValueError, match=r"^eta must be in \[0, 1\] .*got 1\.5$"):
        sample(model, [1], sampler="ddim", steps=5, eta=1.5, seed=0)
    for eta in (0.0, 1.0):  # both ends of the range give finite samples (eta > 1 made the DDIM update NaN)
        assert bool(torch.isfinite(sample(model, [1, 2], sampler="ddim", steps=5, eta=eta, seed=0)).all())


@pytest.mark.parametrize("labels, error, message", [
    ([], ValueError, r"^class_labels must be a non-empty 1-D list of class ids, got an empty one$"),
    (torch.tensor([], dtype=torch.long), ValueError, "class_labels must be a non-empty"),
    ("3", TypeError, r"^class_labels must be a sequence of int class ids .*got str '3'$"),
    (3, TypeError, r"^class_labels must be a sequence of int class ids .*got int 3$"),
    (2**70, TypeError, r"^class_labels must be a sequence"),
    ([2**70], ValueError, r"^class_labels: class ids must be in \[0, 9\] .*got 1180591620717411303424$"),
    ([1, -2**70], ValueError, r"^class_labels: class ids must be in \[0, 9\]"),
    (["a"], TypeError, r"^class_labels must be int class ids"),
    ([None], TypeError, r"^class_labels must be int class ids"),
    (torch.tensor([1], device="meta"), ValueError, "meta device"),
])
def test_bad_class_labels_name_the_argument(labels, error, message):
    with pytest.raises(error, match=message):
        sample(tiny_dit(), labels, steps=2, seed=0)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32])
def test_small_integer_labels_are_accepted(dtype):
    model = tiny_dit()
    expected = sample(model, [1, 7], steps=3, seed=0)
    assert torch.equal(sample(model, np.array([1, 7], dtype), steps=3, seed=0), expected)
    assert torch.equal(sample(model, torch.tensor([1, 7], dtype=torch.from_numpy(np.zeros(1, dtype)).dtype),
                              steps=3, seed=0), expected)


def test_nonfinite_weights_are_named():
    model = tiny_dit()
    with torch.no_grad():
        model.blocks[1].mlp.fc2.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteSampleError, match=r"^ddim sampling \(4 steps, cfg_scale=4\.0\) gave non-finite "
                                                   r"samples: the model's weights are not finite "
                                                   r"\(blocks\.1\.mlp\.fc2\.weight holds NaN or inf\)$"):
        sample(model, [1, 2], sampler="ddim", steps=4, seed=0)
    assert issubclass(NonFiniteSampleError, ValueError)  # the CLI prints it as one line and exits 2


class OverflowsAt(GaussianData):
    """Exact eps, except inf from ``timestep`` down: a model that overflows part way through sampling."""

    def __init__(self, timestep):
        super().__init__()
        self.timestep = timestep

    def forward(self, x, t, y):
        eps = super().forward(x, t, y)
        return torch.where((t <= self.timestep).view(-1, 1, 1, 1), torch.full_like(eps, float("inf")), eps)


def test_the_first_nonfinite_step_is_named():
    with pytest.raises(NonFiniteSampleError, match=r"the model's output is not finite from step 3 of 5 "
                                                   r"\(timestep 599\) on, in torch\.float32$"):
        sample(OverflowsAt(600), [0, 1], sampler="dpm++", steps=5, seed=0)


def test_nonfinite_noise_is_named():
    noise = torch.zeros(1, 4, 4, 4)
    noise[0, 1, 2, 3] = float("nan")
    with pytest.raises(NonFiniteSampleError, match=r"the initial noise is not finite"):
        sample(GaussianData(), [0], sampler="ddim", steps=3, noise=noise)


def test_finite_samples_cost_one_check_per_call(monkeypatch):
    """The check runs once, on the final samples: no step pays a host sync for it."""
    calls = []
    isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda tensor: calls.append(tuple(tensor.shape)) or isfinite(tensor))
    sample(tiny_dit(), [1, 2, 3], sampler="ddpm", steps=7, seed=0)
    assert calls == [(3, 4, 8, 8)]
