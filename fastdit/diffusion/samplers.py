"""The fast solver steps: one batched tensor update per denoising step.

Each solver turns its schedule into a float64 table ``coefficients`` (one row per step, in sampling order)
with every per-step scalar folded in, so that one step is a few fused elementwise ops whose only per-step
inputs are that row, the model's timestep and (DDPM, DDIM with eta > 0) a noise slice. The step therefore
has no Python branches on the step index and captures into one CUDA graph that every step replays.
Notation as in ``fastdit.diffusion.gaussian``; x0 = sra_t x - srm1_t eps with sra = sqrt(1/abar), srm1 = sqrt(1/abar - 1).
``fastdit.diffusion.reference`` computes the same updates formula by formula, step by step.
"""
import numpy as np
import torch

from fastdit.diffusion.gaussian import NUM_TIMESTEPS, create_diffusion, space_timesteps

SAMPLERS = ("ddpm", "ddim", "dpm++")
SPACINGS = ("release", "leading", "trailing", "linspace")  # DDIM's timesteps: the release's or diffusers'
DPM_FINAL_STEPS = ("release", "zero")  # DPM-Solver++'s last step: to t = 0 (the release's) or to sigma = 0


class Solver:
    """A sampler's schedule (``timesteps``: the model's timesteps, in sampling order; ``coefficients``:
    one float64 row per step) and its ``step(x, eps, variance_values, coef, noise, state)``."""

    name = ""
    draws_noise = False
    state_size = 0

    def __init__(self, timesteps, coefficients):
        self.timesteps = torch.as_tensor(timesteps, dtype=torch.long)
        self.coefficients = torch.as_tensor(coefficients, dtype=torch.float64)

    def __len__(self):
        return len(self.timesteps)

    def initial_state(self, x):
        return [torch.zeros_like(x) for _ in range(self.state_size)]


class DDPM(Solver):
    """Ancestral sampling of p(x_{t-1} | x_t) (Ho et al. 2020) with the learned range variance:
        x_{t-1} = c1 x0 + c2 x_t + [t > 0] exp(log sigma_t^2 / 2) z
                = A x_t - B eps + [t > 0] exp((frac log beta_t + (1 - frac) log btilde_t) / 2) z,
        A = c1 sra + c2,  B = c1 srm1,  frac = (v + 1) / 2.
    A model without learned sigma uses the fixed large variance beta_t (Ho et al.'s sigma_t^2 = beta_t).
    Row: [A, B, log beta_t, log btilde_t (clipped), [t > 0]].
    """

    name = "ddpm"
    draws_noise = True

    def __init__(self, diffusion):
        d = diffusion
        order = torch.arange(d.num_timesteps - 1, -1, -1)
        rows = torch.stack([
            d.posterior_mean_coef1 * d.sqrt_recip_alphas_cumprod + d.posterior_mean_coef2,
            d.posterior_mean_coef1 * d.sqrt_recipm1_alphas_cumprod,
            torch.log(d.betas),
            d.posterior_log_variance_clipped,
            (torch.arange(d.num_timesteps) > 0).double(),
        ], dim=1)
        super().__init__(d.timestep_map[order], rows[order])

    def step(self, x, eps, variance_values, coef, noise, state):
        mean = coef[0] * x - coef[1] * eps
        if variance_values is None:
            log_variance = coef[2]
        else:
            frac = (variance_values + 1) / 2
            log_variance = frac * coef[2] + (1 - frac) * coef[3]
        return mean + coef[4] * torch.exp(0.5 * log_variance) * noise, state


class DDIM(Solver):
    """DDIM (Song et al. 2021, eq. 12), from abar_t to abar_prev (1 after the last step):
        x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z
               = A x_t + B eps + sigma z,
        A = sqrt(abar_prev) sra,  B = sqrt(1 - abar_prev - sigma^2) - sqrt(abar_prev) srm1,
        sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)   (0 at the last step).
    Row: [A, B, sigma]. Noise is drawn only when eta > 0. ``timesteps``, ``abar`` and ``abar_prev`` are in
    sampling order: the release's previous step is the previous kept one (``release_ddim``), diffusers' is
    t - T // steps whatever the spacing (``diffusers_ddim``).
    """

    name = "ddim"

    def __init__(self, timesteps, abar, abar_prev, eta=0.0):
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        rows = torch.stack([
            torch.sqrt(abar_prev) * torch.sqrt(1.0 / abar),
            torch.sqrt(1 - abar_prev - sigma**2) - torch.sqrt(abar_prev) * torch.sqrt(1.0 / abar - 1.0),
            sigma,
        ], dim=1)
        super().__init__(timesteps, rows)
        self.draws_noise = eta > 0

    def step(self, x, eps, variance_values, coef, noise, state):
        x_prev = coef[0] * x + coef[1] * eps
        return (x_prev if noise is None else x_prev + coef[2] * noise), state


def release_ddim(diffusion, eta=0.0) -> DDIM:
    """DDIM over a respaced process (the release's): each step goes to the previous kept timestep."""
    order = torch.arange(diffusion.num_timesteps - 1, -1, -1)
    return DDIM(diffusion.timestep_map[order], diffusion.alphas_cumprod[order], diffusion.alphas_cumprod_prev[order],
                eta)


def diffusers_ddim(spacing: str, steps: int, eta=0.0, num_timesteps: int = NUM_TIMESTEPS) -> DDIM:
    """DDIM as diffusers' DDIMScheduler steps it (``set_alpha_to_one=True``, ``steps_offset=0``): its
    "leading", "trailing" or "linspace" timesteps, each step from t to t - T // steps (abar = 1 below 0),
    which for "trailing" and "linspace" need not be the next kept timestep."""
    if steps > num_timesteps:
        raise ValueError(f"ddim takes 1 to {num_timesteps} steps, got {steps}")
    if spacing == "leading":
        timesteps = np.arange(steps)[::-1] * (num_timesteps // steps)
    elif spacing == "trailing":
        timesteps = np.round(np.arange(num_timesteps, 0, -num_timesteps / steps)).astype(np.int64) - 1
    else:  # linspace
        timesteps = np.linspace(0, num_timesteps - 1, steps).round()[::-1].astype(np.int64)
    timesteps = torch.as_tensor(timesteps.copy(), dtype=torch.long)
    previous = timesteps - num_timesteps // steps
    abar = create_diffusion("", num_timesteps).alphas_cumprod
    abar_prev = torch.where(previous >= 0, abar[previous.clamp(min=0)], torch.ones((), dtype=abar.dtype))
    return DDIM(timesteps, abar[timesteps], abar_prev, eta)


class DPMSolverPP2M(Solver):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in data-prediction form on the VP process
    alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t), over the grid
    t_0 > t_1 > ... > t_S = 0 (``dpm_solver_timesteps``): step i evaluates the model at t_i and moves to t_{i+1},
        h_i = lambda_{i+1} - lambda_i,   x_{i+1} = (sigma_{i+1} / sigma_i) x_i + alpha_{i+1} (1 - e^{-h_i}) D_i
        D_i = (1 + 1/(2 r_i)) x0_i - 1/(2 r_i) x0_{i-1},  r_i = h_{i-1} / h_i   (second order),
        D_i = x0_i at the first step and at the last, which spans the largest log-SNR jump (t_{S-1} -> 0): a
        second-order extrapolation from the much shorter previous step overshoots there ("lower order final").
    Row: [sra, srm1, sigma_{i+1} / sigma_i, alpha_{i+1} (1 - e^{-h_i}), w_cur, w_prev]; state: [x0_{i-1}].
    """

    name = "dpm++"
    state_size = 1

    def __init__(self, diffusion, grid, final="release"):
        d = diffusion
        grid = torch.as_tensor(grid, dtype=torch.long)
        abar = d.alphas_cumprod[grid]
        if final == "zero":
            # diffusers' final_sigmas_type="zero": the last step ends at sigma = 0 (abar = 1, lambda = inf),
            # where its first-order update is x0 itself.
            abar = torch.cat([abar[:-1], abar.new_ones(1)])
        alpha, sigma = torch.sqrt(abar), torch.sqrt(1 - abar)
        lam = torch.log(alpha) - torch.log(sigma)
        h = lam[1:] - lam[:-1]
        w_prev = torch.zeros_like(h)
        w_prev[1:-1] = -h[1:-1] / (2 * h[:-2])  # -1/(2 r_i), r_i = h_{i-1} / h_i
        rows = torch.stack([
            d.sqrt_recip_alphas_cumprod[grid[:-1]], d.sqrt_recipm1_alphas_cumprod[grid[:-1]],
            sigma[1:] / sigma[:-1], alpha[1:] * (1 - torch.exp(-h)), 1 - w_prev, w_prev,
        ], dim=1)
        super().__init__(grid[:-1], rows)

    def step(self, x, eps, variance_values, coef, noise, state):
        (x0_prev,) = state
        x0 = coef[0] * x - coef[1] * eps
        denoised = coef[4] * x0 + coef[5] * x0_prev
        return coef[2] * x + coef[3] * denoised, [x0]


def dpm_solver_timesteps(steps: int, num_timesteps: int = NUM_TIMESTEPS) -> list[int]:
    """The DPM-Solver++ grid: steps + 1 timesteps uniform in t from T - 1 down to 0, rounded (half to even),
    as diffusers' DPMSolverMultistepScheduler spaces them; the model runs at the first ``steps``."""
    if not 1 <= steps < num_timesteps:
        raise ValueError(f"dpm++ takes 1 to {num_timesteps - 1} steps, got {steps}")
    return [round((num_timesteps - 1) * i / steps) for i in range(steps, -1, -1)]


def solver_spacing(sampler: str, steps: int, num_timesteps: int = NUM_TIMESTEPS) -> str:
    """The respacing DDPM and DDIM use: DDIM takes the release's "ddimN" stride when one gives exactly N steps
    (``steps=25`` -> "ddim25": 0, 40, ..., 960), anything else N evenly spread steps from 0 to T - 1."""
    if sampler == "ddim":
        try:
            space_timesteps(num_timesteps, f"ddim{steps}")
            return f"ddim{steps}"
        except ValueError:
            pass
    return str(steps)


def make_solver(sampler: str, steps: int, eta: float = 0.0, num_timesteps: int = NUM_TIMESTEPS, spacing: str = "release",
                final: str = "release") -> Solver:
    """The solver of ``sampler`` over ``steps`` steps. ``spacing`` (ddim): the release's timesteps, or diffusers'
    DDIMScheduler "leading", "trailing" or "linspace" ones. ``final`` (dpm++): the release's last step (first order,
    to t = 0), or diffusers' ``final_sigmas_type="zero"`` (first order, to sigma = 0: the denoised x0)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing: expected one of {', '.join(SPACINGS)}, got {spacing!r}")
    if final not in DPM_FINAL_STEPS:
        raise ValueError(f"final: expected one of {', '.join(DPM_FINAL_STEPS)}, got {final!r}")
    if spacing != "release" and sampler != "ddim":
        raise ValueError(f"spacing={spacing!r} applies to the ddim sampler only, got sampler {sampler!r}")
    if final != "release" and sampler != "dpm++":
        raise ValueError(f"final={final!r} applies to the dpm++ sampler only, got sampler {sampler!r}")
    if sampler == "dpm++":
        return DPMSolverPP2M(create_diffusion("", num_timesteps), dpm_solver_timesteps(steps, num_timesteps), final)
    if spacing != "release":
        return diffusers_ddim(spacing, steps, eta, num_timesteps)
    diffusion = create_diffusion(solver_spacing(sampler, steps, num_timesteps), num_timesteps)
    return DDPM(diffusion) if sampler == "ddpm" else release_ddim(diffusion, eta)
