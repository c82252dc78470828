"""The sampling settings a model recommends, which ``fastdit.sample`` and ``fastdit sample`` both use where the
caller gives none.

A model carries them as ``model.sampling_defaults`` (a dict of ``sampler``, ``steps``, ``cfg_scale``):
``fastdit.load`` sets it from a checkpoint folder's ``sampling.json`` (the bundled digits model's: DDIM 50 at
guidance 4), and ``save_pretrained`` writes it back. A model without one (the release's checkpoints, a
training checkpoint, random weights) samples as the release's ``sample.py`` does: DDPM, 250 steps, guidance 4;
a model without a null class cannot be guided, and samples unguided.
"""
from fastdit.diffusion.samplers import SAMPLERS

SETTINGS_KEYS = ("sampler", "steps", "cfg_scale")
RELEASE_SETTINGS = {"sampler": "ddpm", "steps": 250, "cfg_scale": 4.0}  # the release's sample.py
# Steps for a sampler other than the model's recommended one: the release's DDPM 250 and "ddim25", and
# DPM-Solver++ 2M within the 10-25 steps its paper recommends.
DEFAULT_STEPS = {"ddpm": 250, "ddim": 25, "dpm++": 20}


def has_null_class(model) -> bool:
    """Whether ``model`` (fast or reference DiT) has the null class that classifier-free guidance needs: its
    label table has a row past the classes only when it was built with label dropout."""
    table = getattr(getattr(model, "y_embedder", None), "embedding_table", None)
    if table is not None:
        return table.num_embeddings > model.num_classes
    return getattr(model, "class_dropout_prob", 1.0) > 0


def recommended(model) -> dict:
    """The model's ``sampling_defaults``, else the release's settings (unguided without a null class)."""
    carried = getattr(model, "sampling_defaults", None)
    if carried is not None:
        return check(carried, "sampling_defaults")
    return {**RELEASE_SETTINGS, "cfg_scale": RELEASE_SETTINGS["cfg_scale"] if has_null_class(model) else 1.0}


def resolve(model, sampler=None, steps=None, cfg_scale=None) -> tuple[str, int, float]:
    """(sampler, steps, cfg_scale) with each None filled in: the sampler and guidance the model recommends, and
    its steps when the sampler is its own, else ``DEFAULT_STEPS`` of the sampler given."""
    settings = recommended(model)
    if sampler is None:
        sampler = settings["sampler"]
    if steps is None:
        steps = settings["steps"] if sampler == settings["sampler"] else DEFAULT_STEPS.get(sampler)
    return sampler, steps, settings["cfg_scale"] if cfg_scale is None else cfg_scale


def check(settings, source) -> dict:
    """A settings dict (``sampling.json``'s, or a model's ``sampling_defaults``) with its three keys checked."""
    if not isinstance(settings, dict) or any(key not in settings for key in SETTINGS_KEYS):
        raise ValueError(f"{source}: expected a dict with {', '.join(SETTINGS_KEYS)}, got {settings!r}")
    sampler, steps, cfg_scale = (settings[key] for key in SETTINGS_KEYS)
    if sampler not in SAMPLERS:
        raise ValueError(f"{source}: sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise ValueError(f"{source}: steps must be an integer in [1, 1000], got {steps!r}")
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or cfg_scale < 0:
        raise ValueError(f"{source}: cfg_scale must be a number >= 0, got {cfg_scale!r}")
    return {"sampler": sampler, "steps": steps, "cfg_scale": float(cfg_scale)}
