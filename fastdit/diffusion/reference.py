"""The reference diffusion math: plain loops and scalar float64 formulas, the oracle for the fast paths.

Nothing here is vectorised over timesteps or folded: every step recomputes its scalars from the kept
cumulative products abar (``math`` on Python floats) and applies the papers' formulas one by one, in
float64. The model runs on x cast to its own dtype; its cond and null forwards are separate calls.

Process (Ho et al. 2020): beta_t linear 1e-4 -> 0.02 over T = 1000, abar_t = prod_{s<=t} (1 - beta_s),
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps. A respaced process keeps timesteps s_0 < ... < s_{S-1}
(``fastdit.diffusion.gaussian.space_timesteps``, the release's definition) and is the Markov chain through them:
beta'_i = 1 - abar_{s_i} / abar_{s_{i-1}} (abar_{s_{-1}} = 1); the model is called at the original s_i.

eps-prediction: x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t).
Classifier-free guidance (Ho & Salimans 2022): eps = eps_null + s (eps_cond - eps_null) on the guided channels.
"""
import math

import torch


def linear_betas(num_timesteps=1000):
    """beta_t = beta_1 + t (beta_T - beta_1) / (T - 1), beta_1 = 1e-4 * 1000/T, beta_T = 0.02 * 1000/T."""
    start, end = 1e-4 * 1000 / num_timesteps, 0.02 * 1000 / num_timesteps
    return [start + t * (end - start) / (num_timesteps - 1) for t in range(num_timesteps)]


def alphas_cumprod(num_timesteps=1000):
    products, running = [], 1.0
    for beta in linear_betas(num_timesteps):
        running *= 1.0 - beta
        products.append(running)
    return products


@torch.no_grad()
def guided_output(model, x, t, labels, cfg_scale=1.0, guidance_channels=3):
    """(eps, v or None) in float64 at original timestep t, with separate cond and null forwards."""
    channels = x.shape[1]
    dtype = next(model.parameters()).dtype
    timesteps = torch.full((x.shape[0],), t, dtype=torch.long)
    cond = model(x.to(dtype), timesteps, labels).double()
    eps = cond[:, :channels].clone()
    if cfg_scale != 1.0:
        null = model(x.to(dtype), timesteps, torch.full_like(labels, model.num_classes)).double()
        g = channels if guidance_channels is None else guidance_channels
        eps[:, :g] = null[:, :g] + cfg_scale * (cond[:, :g] - null[:, :g])
    return eps, (cond[:, channels:] if cond.shape[1] == 2 * channels else None)


@torch.no_grad()
def ddpm_sample(model, x_T, labels, kept, next_noise, cfg_scale=1.0, guidance_channels=3):
    """Ancestral sampling through the kept timesteps (Ho et al. 2020; learned range, Nichol & Dhariwal 2021).

    At kept step i (t = s_i, abar = abar_{s_i}, abar_prev = abar_{s_{i-1}}, beta = 1 - abar / abar_prev):
        btilde = beta (1 - abar_prev) / (1 - abar)        (for i = 0 use btilde at i = 1 in the log: "clipped")
        mean   = beta sqrt(abar_prev) / (1 - abar) x0 + (1 - abar_prev) sqrt(1 - beta) / (1 - abar) x_t
        log sigma^2 = frac log beta + (1 - frac) log btilde,  frac = (v + 1) / 2   (v absent: log beta)
        x_prev = mean + sigma z   (no noise at i = 0)
    ``next_noise()`` gives z for each step in sampling order.
    """
    abar_all = alphas_cumprod()
    abar = [abar_all[s] for s in kept]
    x = x_T.double()
    for i in reversed(range(len(kept))):
        abar_prev = abar[i - 1] if i > 0 else 1.0
        beta = 1.0 - abar[i] / abar_prev
        eps, v = guided_output(model, x, kept[i], labels, cfg_scale, guidance_channels)
        x0 = (x - math.sqrt(1 - abar[i]) * eps) / math.sqrt(abar[i])
        c1 = beta * math.sqrt(abar_prev) / (1 - abar[i])
        c2 = (1 - abar_prev) * math.sqrt(1 - beta) / (1 - abar[i])
        mean = c1 * x0 + c2 * x
        if len(kept) > 1:
            j = max(i, 1)  # btilde_0 = 0 is clipped to btilde_1
            beta_j = 1.0 - abar[j] / abar[j - 1]
            log_btilde = math.log(beta_j * (1 - abar[j - 1]) / (1 - abar[j]))
        else:
            log_btilde = math.log(beta)
        frac = torch.ones_like(x) if v is None else (v + 1) / 2
        log_variance = frac * math.log(beta) + (1 - frac) * log_btilde
        z = next_noise().double()
        x = mean + (torch.exp(0.5 * log_variance) * z if i > 0 else 0.0)
    return x


@torch.no_grad()
def ddim_sample(model, x_T, labels, kept, next_noise=None, eta=0.0, cfg_scale=1.0, guidance_channels=3):
    """DDIM (Song et al. 2021, eq. 12) through the kept timesteps:
        x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
        sigma  = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev).
    ``next_noise()`` is called only when eta > 0.
    """
    abar_all = alphas_cumprod()
    abar = [abar_all[s] for s in kept]
    x = x_T.double()
    for i in reversed(range(len(kept))):
        abar_prev = abar[i - 1] if i > 0 else 1.0
        eps, _ = guided_output(model, x, kept[i], labels, cfg_scale, guidance_channels)
        x0 = (x - math.sqrt(1 - abar[i]) * eps) / math.sqrt(abar[i])
        sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar[i])) * math.sqrt(1 - abar[i] / abar_prev)
        x = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev - sigma**2) * eps
        if eta > 0:
            x = x + sigma * next_noise().double()
    return x


@torch.no_grad()
def dpmpp_2m_sample(model, x_T, labels, grid, cfg_scale=1.0, guidance_channels=3):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), data prediction, on alpha_t = sqrt(abar_t),
    sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t), over the descending ``grid`` t_0 > ... > t_S:
    the model runs at t_0 .. t_{S-1}; each step goes from t_i to t_{i+1}:
        h = lambda_next - lambda_cur
        D = x0 at the first and the last step, else (1 + 1/(2r)) x0 - 1/(2r) x0_prev with r = h_prev / h
        x_next = (sigma_next / sigma_cur) x - alpha_next (e^{-h} - 1) D
    """
    abar_all = alphas_cumprod()
    x = x_T.double()
    x0_prev = h_prev = None
    steps = len(grid) - 1
    for i in range(steps):
        alpha, sigma = math.sqrt(abar_all[grid[i]]), math.sqrt(1 - abar_all[grid[i]])
        alpha_next, sigma_next = math.sqrt(abar_all[grid[i + 1]]), math.sqrt(1 - abar_all[grid[i + 1]])
        eps, _ = guided_output(model, x, grid[i], labels, cfg_scale, guidance_channels)
        x0 = (x - sigma * eps) / alpha
        h = math.log(alpha_next / sigma_next) - math.log(alpha / sigma)
        if i == 0 or i == steps - 1:
            denoised = x0
        else:
            r = h_prev / h
            denoised = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = (sigma_next / sigma) * x - alpha_next * (math.exp(-h) - 1) * denoised
        x0_prev, h_prev = x0, h
    return x


def _phi(x):
    """The tanh approximation of the standard normal CDF that the ADM decoder likelihood uses."""
    return 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


@torch.no_grad()
def training_losses(model, x_start, t, y, noise, kept=None):
    """The DiT loss per image, element by element: (mse, vb in bits/dim, loss = mse + vb).

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps;  mse = mean (eps - eps_theta)^2;
    vb (t > 0) = mean KL(N(mu~, btilde) || N(mu_theta, sigma^2)) / log 2,
        KL = 1/2 (-1 + log sigma^2 - log btilde + btilde / sigma^2 + (mu~ - mu_theta)^2 / sigma^2),
        mu~ = posterior mean from the true x_0, mu_theta from x0(eps_theta), btilde clipped at t = 0;
    vb (t = 0) = -mean log P(x_0 | x_1) / log 2, P = Phi((x_0 + 1/255 - mu)/sigma) - Phi((x_0 - 1/255 - mu)/sigma),
        the edge bins (x_0 < -0.999, x_0 > 0.999) open to -inf / +inf, probabilities floored at 1e-12.
    t indexes the kept timesteps ``kept`` (default: all 1000).
    """
    kept = list(range(1000)) if kept is None else kept
    abar_all = alphas_cumprod()
    abar = [abar_all[s] for s in kept]
    x_start, noise = x_start.double(), noise.double()
    results = []
    for n in range(x_start.shape[0]):
        i = int(t[n])
        abar_prev = abar[i - 1] if i > 0 else 1.0
        beta = 1 - abar[i] / abar_prev
        x_t = math.sqrt(abar[i]) * x_start[n] + math.sqrt(1 - abar[i]) * noise[n]
        dtype = next(model.parameters()).dtype
        out = model(x_t[None].to(dtype), torch.tensor([kept[i]]), y[n:n + 1])[0].double()
        channels = x_start.shape[1]
        eps, v = out[:channels], out[channels:]
        mse = ((noise[n] - eps) ** 2).mean().item()
        c1, c2 = beta * math.sqrt(abar_prev) / (1 - abar[i]), (1 - abar_prev) * math.sqrt(1 - beta) / (1 - abar[i])
        j = max(i, 1)
        beta_j = 1 - abar[j] / abar[j - 1]
        log_btilde = math.log(beta_j * (1 - abar[j - 1]) / (1 - abar[j]))
        true_mean = c1 * x_start[n] + c2 * x_t
        x0 = (x_t - math.sqrt(1 - abar[i]) * eps) / math.sqrt(abar[i])
        mean = c1 * x0 + c2 * x_t
        frac = (v + 1) / 2
        log_var = frac * math.log(beta) + (1 - frac) * log_btilde
        total = 0.0
        for a, mu, lv, mt in zip(x_start[n].flatten().tolist(), mean.flatten().tolist(),
                                 log_var.flatten().tolist(), true_mean.flatten().tolist()):
            if i > 0:
                total += 0.5 * (-1 + lv - log_btilde + math.exp(log_btilde - lv) + (mt - mu) ** 2 * math.exp(-lv))
            else:
                std = math.exp(0.5 * lv)
                upper = 1.0 if a > 0.999 else _phi((a - mu + 1 / 255) / std)
                lower = 0.0 if a < -0.999 else _phi((a - mu - 1 / 255) / std)
                total -= math.log(max(upper - lower, 1e-12))
        vb = total / x_start[n].numel() / math.log(2)
        results.append((mse, vb, mse + vb))
    return torch.tensor(results, dtype=torch.float64).T
