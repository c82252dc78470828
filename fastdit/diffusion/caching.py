"""Feature caching for sampling: skip the transformer blocks at some steps, reusing or forecasting what they add.

Adjacent denoising steps change a DiT's features slowly, so the blocks' contribution to the residual stream,
R = x_after_blocks - x_before_blocks, can stand in for computing them. Three policies:

- ``FORA(interval)``: all blocks run every ``interval`` steps; the steps between reuse the last R (Selvaraju
  et al. 2024 reuse each block's attention and MLP outputs; here the whole stack's R is reused).
- ``TaylorSeer(interval, order)``: all blocks run every ``interval`` steps and R is forecast between them by a
  Taylor series whose derivatives are finite differences of R over the full steps (Liu et al. 2025):
  factor 0 = R, factor k+1 = (new factor k - old factor k) / steps between them; R(full + s) = sum_k factor k s^k / k!.
  FORA is its order 0.
- ``FirstBlockCache(threshold)``: the first block always runs; the others are skipped, and their last R reused,
  while the first block's residual changed by less than ``threshold`` (mean |r - r_ref| / mean |r_ref|, r_ref:
  that residual at the last full step) since the blocks last ran.

Classifier-free guidance runs its two halves in one forward over the doubled batch, so every decision covers
both halves; the first-block change is measured over that whole batch (so with FirstBlockCache an image's
sample depends on the batch it is drawn in; the static policies keep images batch-independent). A cached step
adds R to the stream after the patch embedding (after the first block, for FirstBlockCache) and runs the final
layer on it, so the step's output still follows x_t and t.

The static policies' steps are planned before sampling: ``prepare(i)`` loads step i's kind and its row of
Taylor coefficients into a buffer, and the forward of each kind reads only buffers, so a CUDA graph of each
kind replays correctly. FirstBlockCache reads one scalar per step on the host (its decision) and runs without
CUDA graphs. R and the Taylor factors are kept in fp32 whatever the model's dtype.
"""
import dataclasses
import math

import numpy as np
import torch

from fastdit.reference import CONDITION_TOKENS

METHODS = ("taylorseer", "fbcache", "fora")
MAX_ORDER = 2


def _check_int(method, name, value, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{method} {name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{method} {name} must be an int >= {low}, got {value}")


@dataclasses.dataclass(frozen=True)
class FORA:
    """All blocks every ``interval`` steps (and at the first ``warmup`` steps); the last R reused between."""

    interval: int = 2  # docs/caching.md: interval 3 is 14.5% off exact's Frechet distance unguided
    warmup: int = 0
    method = "fora"
    order = 0

    def __post_init__(self):
        _check_int(self.method, "interval", self.interval, 1)
        _check_int(self.method, "warmup", self.warmup, 0)


@dataclasses.dataclass(frozen=True)
class TaylorSeer:
    """All blocks every ``interval`` steps (and at the first ``warmup`` steps); R forecast between them by a
    Taylor series of ``order`` 1 or 2."""

    # docs/caching.md: (4, 1) is the fastest setting within 1 point of exact accuracy and 10% of its Frechet
    # distance; (5, 2) is 1.03 points under exact unguided on 3,000 samples. (4, 2): same blocks, more accurate.
    interval: int = 4
    order: int = 1
    warmup: int = 0
    method = "taylorseer"

    def __post_init__(self):
        _check_int(self.method, "interval", self.interval, 1)
        _check_int(self.method, "warmup", self.warmup, 0)
        _check_int(self.method, "order", self.order, 1)
        if self.order > MAX_ORDER:
            raise ValueError(f"taylorseer order must be 1 or {MAX_ORDER} (forecasts up to second order are "
                             f"supported), got {self.order}")


@dataclasses.dataclass(frozen=True)
class FirstBlockCache:
    """The first block every step; the others only when its residual changed by ``threshold`` or more since
    they last ran (and at the first ``warmup`` steps)."""

    threshold: float = 0.05  # docs/caching.md: within the bounds; 0.1 is 3 points under exact's accuracy unguided
    warmup: int = 1
    method = "fbcache"

    def __post_init__(self):
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float, np.floating, np.integer)):
            raise TypeError(f"fbcache threshold must be a number, got {type(self.threshold).__name__}")
        if not math.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"fbcache threshold must be a finite number >= 0 (0: never skip), got {self.threshold}")
        _check_int(self.method, "warmup", self.warmup, 1)  # the first step has nothing to compare with


CONFIGS = {"taylorseer": TaylorSeer, "fbcache": FirstBlockCache, "fora": FORA}


def make_config(method, **settings):
    """A cache policy by name with its settings (those left out, or None, keep their defaults)."""
    if method not in CONFIGS:
        raise ValueError(f"cache: unknown method {method!r}; expected one of {', '.join(METHODS)}")
    config_class = CONFIGS[method]
    names = {field.name for field in dataclasses.fields(config_class)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise ValueError(f"cache {method}: unknown setting {unknown[0]!r}; {method} takes {', '.join(sorted(names))}")
    return config_class(**{name: value for name, value in settings.items() if value is not None})


def resolve(cache):
    """``sample``'s ``cache`` argument as a policy: None, a method name (its defaults) or a policy object."""
    if cache is None or isinstance(cache, tuple(CONFIGS.values())):
        return cache
    if isinstance(cache, str):
        return make_config(cache)
    raise TypeError(f"cache must be None, one of {', '.join(METHODS)} or a fastdit.diffusion.caching policy "
                    f"(FORA, TaylorSeer, FirstBlockCache), got {type(cache).__name__}")


def static_plan(config, steps):
    """(full, coefficients): whether each step runs all blocks, and its row [forecast c_0..c_order, update
    u_0..u_order-1]: a cached step's R is sum_k c_k factor_k, a full step sets factor_k+1 = (new factor_k -
    old factor_k) u_k. A factor that the full steps so far cannot give has a 0 coefficient."""
    order = config.order
    full = [i < config.warmup or (i - config.warmup) % config.interval == 0 for i in range(steps)]
    rows = np.zeros((steps, 2 * order + 1))
    last, computed = None, 0
    for i in range(steps):
        if full[i]:
            if last is not None:
                rows[i, order + 1:order + 1 + min(order, computed)] = 1.0 / (i - last)
            last, computed = i, computed + 1
        else:
            distance = i - last
            for k in range(min(order, computed - 1) + 1):
                rows[i, k] = distance**k / math.factorial(k)
    return full, torch.as_tensor(rows, dtype=torch.float32)


def block_evaluations(config, steps, depth, full_steps=None):
    """Blocks run per forward summed over a run (a guided forward's two halves count once): FirstBlockCache
    needs the number of steps that ran all blocks."""
    if config is None:
        return steps * depth
    if config.method == "fbcache":
        return full_steps * depth + (steps - full_steps) * min(depth, 1)
    return sum(static_plan(config, steps)[0]) * depth


class FeatureCache:
    """``model(x, t, y)`` for one sampling run under a cache policy: the denoiser calls it once per step, after
    ``prepare(i)`` (i = 0 starts the run over). ``kind`` is the step's: "full" or "cached" (static plans; set by
    ``prepare``, or by a captured step) or "decide" (FirstBlockCache: the first block decides)."""

    def __init__(self, model, config, steps, compile=False):
        if not hasattr(model, "run_blocks"):
            raise TypeError(f"cache needs a fastdit.DiT (its forward in parts), got {type(model).__module__}."
                            f"{type(model).__name__}")
        if config.method == "fbcache" and len(model.blocks) < 1:
            raise ValueError("cache fbcache needs a model with at least one block")
        self.model, self.config, self.depth = model, config, len(model.blocks)
        self.static = config.method != "fbcache"
        device = next(model.parameters()).device
        self.plan(steps)
        self.coef = torch.zeros(2 * getattr(config, "order", 0) + 1, dtype=torch.float32, device=device)
        self.factors = None  # the Taylor factors of R (static); FirstBlockCache: [R of blocks 1.., r_ref]
        self.kind, self.have_reference = "full" if self.static else "decide", False
        wrap = torch.compile if compile else (lambda fn: fn)
        self.functions = {"full": wrap(self._full), "cached": wrap(self._cached)} if self.static else {
            "first": wrap(self._first), "rest-full": wrap(self._rest_full), "rest-cached": wrap(self._rest_cached)}

    def plan(self, steps):
        """Step kinds and Taylor coefficients for a run of ``steps`` steps."""
        if self.static:
            self.full, coefficients = static_plan(self.config, steps)
            self.coefficients = coefficients.to(next(self.model.parameters()).device)

    def prepare(self, i):
        if i == 0:
            for factor in self.factors or ():
                factor.zero_()
            self.have_reference = False
        self.step = i
        if self.static:
            self.kind = "full" if self.full[i] else "cached"
            self.coef.copy_(self.coefficients[i])

    def _allocate(self, x, count):
        tokens = self.model.pos_embed.shape[1] + (CONDITION_TOKENS if self.model.block == "in-context" else 0)
        shape = (x.shape[0], tokens, self.model.pos_embed.shape[2])
        self.factors = [torch.zeros(shape, dtype=torch.float32, device=x.device) for _ in range(count)]

    def __call__(self, x, t, y):
        if self.factors is None:
            self._allocate(x, self.config.order + 1 if self.static else 2)
        if self.static:
            return self.functions[self.kind](x, t, y)
        x1, h, modulations, first_residual, change = self.functions["first"](x, t, y)
        # The decision is data-dependent: one scalar read per step.
        full = not self.have_reference or self.step < self.config.warmup or bool(change >= self.config.threshold)
        self.have_reference = True
        return self.functions["rest-full" if full else "rest-cached"](x1, h, modulations, first_residual)

    def _full(self, x, t, y):
        x0, h, modulations = self.model.embed(x, t, y)
        x, h = self.model.run_blocks(x0, h, modulations, 0, self.depth)
        order, coef = self.config.order, self.coef
        new = [x.float() - x0.float()]
        for k in range(order):
            new.append((new[k] - self.factors[k]) * coef[order + 1 + k])
        for factor, value in zip(self.factors, new):
            factor.copy_(value)
        return self.model.final_output(h)

    def _cached(self, x, t, y):
        x0, _, modulations = self.model.embed(x, t, y)
        residual = self.factors[0] * self.coef[0]
        for k in range(1, self.config.order + 1):
            residual = residual + self.factors[k] * self.coef[k]
        x = (x0.float() + residual).to(x0.dtype)
        return self.model.final_output(self.model.normed_input(x, modulations, self.depth))

    def _first(self, x, t, y):
        x0, h, modulations = self.model.embed(x, t, y)
        x1, h = self.model.run_blocks(x0, h, modulations, 0, 1)
        first_residual, reference = x1.float() - x0.float(), self.factors[1]
        change = (first_residual - reference).abs().mean() / reference.abs().mean().clamp_min(1e-12)
        return x1, h, modulations, first_residual, change

    def _rest_full(self, x1, h, modulations, first_residual):
        x, h = self.model.run_blocks(x1, h, modulations, 1, self.depth)
        self.factors[0].copy_(x.float() - x1.float())
        self.factors[1].copy_(first_residual)
        return self.model.final_output(h)

    def _rest_cached(self, x1, h, modulations, first_residual):
        x = (x1.float() + self.factors[0]).to(x1.dtype)
        return self.model.final_output(self.model.normed_input(x, modulations, self.depth))
