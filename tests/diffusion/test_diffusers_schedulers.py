"""fastdit's solvers with diffusers' conventions step as diffusers' schedulers do: DDIMScheduler's
"leading", "trailing" and "linspace" timesteps, DPMSolverMultistepScheduler's final step to sigma = 0.
The release's conventions (the defaults) are checked against the step-by-step oracle elsewhere
(tests/diffusion/test_sampling.py)."""
import pytest
import torch
from parity import perturb_

from fastdit import reference
from fastdit.diffusion.samplers import make_solver
from fastdit.models.parity import relative_max_error

diffusers = pytest.importorskip("diffusers")

# DiT's schedule as diffusers' schedulers are configured for it (the facebook/DiT-XL-2-256 pipeline).
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
PARITY = 1e-5  # fp32; diffusers keeps its schedule in fp32, fastdit in fp64


@pytest.fixture(scope="module")
def denoiser():
    torch.manual_seed(0)
    model = perturb_(reference.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                                   num_classes=10, learn_sigma=False), seed=0).eval()
    labels = torch.tensor([0, 3, 9])

    @torch.no_grad()
    def eps(x, t):
        return model(x, torch.full((len(x),), int(t)), labels)

    return eps


def x_T():
    return torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))


def run_fastdit(solver, eps):
    x, state = x_T(), None
    state = solver.initial_state(x)
    coefficients = solver.coefficients.float()
    for i, t in enumerate(solver.timesteps):
        x, state = solver.step(x, eps(x, t), None, coefficients[i], None, state)
    return x


def run_diffusers(scheduler, steps, eps):
    scheduler.set_timesteps(steps)
    x = x_T()
    for t in scheduler.timesteps:
        x = scheduler.step(eps(x, t), t, x).prev_sample
    return x


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [10, 25, 30, 7])
def test_ddim_spacings_step_as_diffusers(denoiser, spacing, steps):
    scheduler = diffusers.DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                                        timestep_spacing=spacing)
    solver = make_solver("ddim", steps, spacing=spacing)
    expected = run_diffusers(scheduler, steps, denoiser)
    assert solver.timesteps.tolist() == scheduler.timesteps.tolist()
    assert relative_max_error(run_fastdit(solver, denoiser), expected) <= PARITY


@pytest.mark.parametrize("steps", [10, 20, 25])
def test_dpm_solver_final_step_to_sigma_zero_steps_as_diffusers(denoiser, steps):
    scheduler = diffusers.DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type="dpmsolver++", solver_order=2,
                                                      final_sigmas_type="zero")
    solver = make_solver("dpm++", steps, final="zero")
    expected = run_diffusers(scheduler, steps, denoiser)
    assert solver.timesteps.tolist() == scheduler.timesteps.tolist()
    assert relative_max_error(run_fastdit(solver, denoiser), expected) <= PARITY
    release = run_fastdit(make_solver("dpm++", steps), denoiser)
    assert relative_max_error(release, expected) > PARITY  # the conventions differ measurably


def test_release_ddim_differs_from_leading_where_the_strides_differ(denoiser):
    # 25 steps: both are 960, 920, ..., 0; 30 steps: the release strides by 34, diffusers by 33.
    assert make_solver("ddim", 25).timesteps.tolist() == make_solver("ddim", 25, spacing="leading").timesteps.tolist()
    assert make_solver("ddim", 30).timesteps[0] == 986 and make_solver("ddim", 30, spacing="leading").timesteps[0] == 957


@pytest.mark.parametrize("arguments, message", [
    (dict(sampler="ddim", steps=10, spacing="even"), "spacing: expected one of release, leading, trailing, linspace"),
    (dict(sampler="ddpm", steps=10, spacing="leading"), "spacing='leading' applies to the ddim sampler only"),
    (dict(sampler="dpm++", steps=10, final="sigma_min"), "final: expected one of release, zero"),
    (dict(sampler="ddim", steps=10, final="zero"), "final='zero' applies to the dpm\\+\\+ sampler only"),
])
def test_bad_conventions(arguments, message):
    with pytest.raises(ValueError, match=message):
        make_solver(**arguments)


@pytest.mark.parametrize("scheduler_name, sampler, options", [
    ("DDIMScheduler", "ddim", dict(spacing="leading")),
    ("DDIMScheduler", "ddim", dict(spacing="trailing")),
    ("DPMSolverMultistepScheduler", "dpm++", dict(final="zero")),
])
def test_fastdit_sample_reproduces_a_diffusers_run(scheduler_name, sampler, options):
    """A DiTPipeline-style run (noise for the batch from one generator, guidance on every channel, diffusers'
    schedule) through fastdit.sample with the matching options."""
    import fastdit

    torch.manual_seed(0)
    model = perturb_(reference.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                                   num_classes=10), seed=0).eval()
    labels, steps, scale = torch.tensor([0, 3, 9]), 7, 4.0
    scheduler = getattr(diffusers, scheduler_name)(**SCHEDULE, **(
        dict(clip_sample=False, set_alpha_to_one=True, timestep_spacing=options["spacing"]) if sampler == "ddim"
        else dict(algorithm_type="dpmsolver++", final_sigmas_type="zero")))
    scheduler.set_timesteps(steps)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = model(torch.cat([x, x]), torch.full((6,), int(t)), torch.cat([labels, torch.full_like(labels, 10)]))
            cond, null = out[:, :4].chunk(2)
            x = scheduler.step(null + scale * (cond - null), t, x).prev_sample
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    actual = fastdit.sample(model, labels, sampler=sampler, steps=steps, cfg_scale=scale, guidance_channels=4,
                            noise_draw="batch", generator=generator, **options)
    assert relative_max_error(actual, x) <= PARITY
    assert torch.equal(generator.get_state(), state)  # read, not advanced
    seeded = fastdit.sample(model, labels, sampler=sampler, steps=steps, cfg_scale=scale, guidance_channels=4,
                            noise_draw="batch", seed=3, **options)
    assert torch.equal(seeded, actual)
    with pytest.raises(ValueError, match="noise_draw must be one of per-image, batch, got 'shared'"):
        fastdit.sample(model, labels, sampler=sampler, steps=steps, noise_draw="shared", seed=3)
