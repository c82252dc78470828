"""Gaussian diffusion as DiT is trained and sampled with (the DDPM / improved-DDPM / ADM lineage).

Forward process (Ho et al. 2020), T = 1000 steps, linear betas 1e-4 -> 0.02 (scaled by 1000/T):
    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I),   abar_t = prod_{s<=t} (1 - beta_s)
Posterior:
    q(x_{t-1} | x_t, x_0) = N(c1_t x_0 + c2_t x_t, btilde_t I)
    c1_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t),  c2_t = (1 - abar_{t-1}) sqrt(1 - beta_t) / (1 - abar_t)
    btilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)    (abar_{-1} = 1; log btilde_0 is clipped to log btilde_1)
The model predicts eps (x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)) and, with learned sigma, a second
half of channels v interpolating the log-variance (Nichol & Dhariwal 2021, "learned range"):
    frac = (v + 1) / 2,   log sigma_t^2 = frac log beta_t + (1 - frac) log btilde_t
Respacing keeps a subset S of the timesteps, recomputes beta_i = 1 - abar_{s_i} / abar_{s_{i-1}} from the kept
abar, and feeds the model the ORIGINAL timestep s_i (``timestep_map``). The schedule math is float64; tables
are gathered per timestep and cast to the data's dtype, as the release does.
"""
import math
from collections.abc import Sequence

import torch

NUM_TIMESTEPS = 1000


def linear_betas(num_timesteps: int = NUM_TIMESTEPS) -> torch.Tensor:
    """Ho et al.'s linear schedule, stretched so that any T covers the same noise range."""
    scale = 1000 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def space_timesteps(num_timesteps: int, spacing: str | Sequence[int]) -> list[int]:
    """The timesteps (ascending) a respaced process keeps.

    ``"ddimN"``: the integer stride k for which ``range(0, T, k)`` has exactly N steps (DDIM's striding).
    ``"a,b,c"`` (or a list of counts): split [0, T) into equal sections (the first T mod k one longer) and
    take a, b, c evenly spread steps from each, first and last step of a section included.
    """
    if isinstance(spacing, str) and spacing.startswith("ddim"):
        count = int(spacing[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == count:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"no integer stride gives exactly {count} of {num_timesteps} steps (spacing {spacing!r})")
    counts = [int(c) for c in spacing.split(",")] if isinstance(spacing, str) else [int(c) for c in spacing]
    if not counts or min(counts) < 1:
        raise ValueError(f"section counts must be positive integers, got {spacing!r}")
    base, longer = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for section, count in enumerate(counts):
        size = base + (section < longer)
        if count > size:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps (spacing {spacing!r})")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        # The position is accumulated by repeated addition (not j * stride) so that .5 ties round the same
        # way as the release's respacing; Python's round() is round-half-even like the release's.
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


def _normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    """Phi(x) ~= (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2, the approximation the ADM loss uses."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) for data quantised to 256 levels in [-1, 1] under N(means, e^(2 log_scales)).

    The bin of x is [x - 1/255, x + 1/255]; the edge bins extend to -inf (x < -0.999) and +inf (x > 0.999).
    """
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (x - means + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (x - means - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(x):
    return x.mean(dim=tuple(range(1, x.dim())))


class GaussianDiffusion:
    """A (possibly respaced) diffusion process: float64 tables indexed by the process's own step index.

    ``timestep_map[i]`` is the original timestep the model sees at step i (identity when not respaced).
    """

    def __init__(self, betas, timestep_map: Sequence[int] | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D schedule with every value in (0, 1]")
        self.num_timesteps = T = betas.numel()
        self.timestep_map = torch.arange(T) if timestep_map is None else torch.as_tensor(timestep_map, dtype=torch.long)
        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = abar = torch.cumprod(alphas, 0)
        self.alphas_cumprod_prev = abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        self.sqrt_recip_alphas_cumprod = torch.sqrt(1.0 / abar)
        self.sqrt_recipm1_alphas_cumprod = torch.sqrt(1.0 / abar - 1.0)
        self.posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        # btilde_0 = 0: its log is clipped to log btilde_1 (for T = 1 to log beta_0, never used for noise).
        first = self.posterior_variance[1:2] if T > 1 else betas[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first, self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * torch.sqrt(abar_prev) / (1.0 - abar)
        self.posterior_mean_coef2 = (1.0 - abar_prev) * torch.sqrt(alphas) / (1.0 - abar)

    @staticmethod
    def _at(table, t, like):
        """table[t] as a (N, 1, ..., 1) tensor in like's dtype and device."""
        values = table.to(t.device)[t].to(like.dtype)
        return values.reshape(-1, *([1] * (like.dim() - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The original timesteps the model is conditioned on for process steps t."""
        return self.timestep_map.to(t.device)[t]

    def q_sample(self, x_start, t, noise=None):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        noise = torch.randn_like(x_start) if noise is None else noise
        if noise.shape != x_start.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, x_start {tuple(x_start.shape)}")
        return (self._at(torch.sqrt(self.alphas_cumprod), t, x_start) * x_start
                + self._at(torch.sqrt(1.0 - self.alphas_cumprod), t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at(self.posterior_mean_coef1, t, x_t) * x_start + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self._at(self.posterior_variance, t, x_t), self._at(self.posterior_log_variance_clipped, t, x_t)

    def predict_xstart_from_eps(self, x_t, t, eps):
        """x_0 = sqrt(1 / abar_t) x_t - sqrt(1 / abar_t - 1) eps."""
        return (self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - self._at(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def p_mean_variance(self, model_output, x_t, t):
        """p(x_{t-1} | x_t) from the model's output at (x_t, t).

        ``model_output`` has 2C channels (eps, v: learned range variance) or C channels (eps with the fixed
        large variance beta_t of Ho et al.; at t = 0, where no noise is added, btilde_1).
        Returns a dict with ``mean``, ``variance``, ``log_variance``, ``pred_xstart``.
        """
        channels = x_t.shape[1]
        eps = model_output[:, :channels]
        if model_output.shape[1] == 2 * channels:
            frac = (model_output[:, channels:] + 1) / 2
            log_variance = (frac * self._at(torch.log(self.betas), t, x_t)
                            + (1 - frac) * self._at(self.posterior_log_variance_clipped, t, x_t))
        elif model_output.shape[1] == channels:
            fixed_large = self.betas.clone()
            fixed_large[0] = self.posterior_variance[1] if self.num_timesteps > 1 else self.betas[0]
            log_variance = self._at(torch.log(fixed_large), t, x_t).expand_as(x_t)
        else:
            raise ValueError(f"model output has {model_output.shape[1]} channels; "
                             f"expected {channels} or {2 * channels}")
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": mean, "variance": torch.exp(log_variance), "log_variance": log_variance,
                "pred_xstart": pred_xstart}

    def vb_terms_bpd(self, model_output, x_start, x_t, t):
        """One term of the variational bound per image, in bits per dimension:
        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, the decoder's -log p(x_0 | x_1) at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = _mean_flat(_normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -_mean_flat(
            discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None, rescale_vb=False):
        """The DiT training objective at process steps t, per image: {"loss", "mse", "vb" (learned sigma only)}.

        mse = mean((eps - eps_theta(x_t, t))^2). With learned sigma, loss = mse + vb where vb is
        ``vb_terms_bpd`` evaluated with the eps half DETACHED, so the bound trains only the variance
        (Nichol & Dhariwal's L_hybrid). The release's DiT trains with this unscaled vb (its loss type
        MSE); ``rescale_vb=True`` multiplies vb by T / 1000 (improved-DDPM's RESCALED_MSE), which is the
        same at T = 1000.
        """
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        model_output = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        channels = x_start.shape[1]
        terms = {"mse": _mean_flat((noise - model_output[:, :channels]) ** 2)}
        terms["loss"] = terms["mse"]
        if model_output.shape[1] == 2 * channels:
            frozen = torch.cat([model_output[:, :channels].detach(), model_output[:, channels:]], dim=1)
            terms["vb"] = self.vb_terms_bpd(frozen, x_start, x_t, t)
            if rescale_vb:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
            terms["loss"] = terms["mse"] + terms["vb"]
        return terms


def create_diffusion(timestep_respacing: str | Sequence[int] | None = "", num_timesteps: int = NUM_TIMESTEPS):
    """The release's process: linear betas over ``num_timesteps``, respaced to ``timestep_respacing``
    ("" or None: all steps; "250": 250 evenly spread steps; "ddim25": DDIM's stride-40 steps)."""
    betas = linear_betas(num_timesteps)
    if timestep_respacing is None or timestep_respacing == "":
        return GaussianDiffusion(betas)
    kept = space_timesteps(num_timesteps, timestep_respacing)
    abar = torch.cumprod(1.0 - betas, 0)[kept]
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    return GaussianDiffusion(1.0 - abar / abar_prev, timestep_map=kept)
