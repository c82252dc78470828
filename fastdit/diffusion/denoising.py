"""One denoising step and the plain loop over the steps: the noise each image draws, the guided denoiser
(one forward of the model over [cond; null], mixed with the guidance scale) and ``run_eager``, which runs the
solver's steps one by one. ``sampling.sample`` builds them; ``cuda_graphs`` replays the same step from a graph.

Noise is per image: image k (``first_index + k``) draws its initial latent and then, step by step, its
sampler noise from its own generator seeded by (seed, k). An image is therefore the same whatever batch
it is drawn in, and a long run can be split into batches or over processes.
"""
import numpy as np
import torch

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


def run_eager(denoiser, solver, noise, x, iterate, stop=None, cache=None):
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
