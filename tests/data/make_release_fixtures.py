"""Make, check or extend the fixtures in tests/data from the DiT release's own code.

Not part of the package and never run by the tests: it imports the release (facebookresearch/DiT), which
the tests must not download or run. To get the release's code at the commit the fixtures were made with:

    git clone https://github.com/facebookresearch/DiT /tmp/DiT-release
    git -C /tmp/DiT-release checkout ed81ce2229091fd4ecc9a223645f95cf379d582b
    pip install timm          # the release's models.py takes PatchEmbed, Attention and Mlp from timm
                              # (timm imports torchvision, so a torchvision built for the installed torch too)

and run, from the repository root, with the release first on the path (its top-level ``models`` and
``diffusion`` modules; fastdit's own packages are ``fastdit.models`` and ``fastdit.diffusion``, no clash):

    PYTHONPATH=/tmp/DiT-release python tests/data/make_release_fixtures.py check
    PYTHONPATH=/tmp/DiT-release python tests/data/make_release_fixtures.py configs
    PYTHONPATH=/tmp/DiT-release python tests/data/make_release_fixtures.py make --out /tmp/fixtures

``check`` recomputes every release output stored in the committed fixtures from the inputs, weights and noise
stored beside it, with the release's code, and prints the largest relative error per entry (exit 1 above 1e-5).
The committed fixtures were made with an earlier version of ``make``'s recipe whose random draws were not
recorded, so ``make`` writes fixtures with fresh draws: valid replacements (the tests read the inputs from the
file), not byte copies. ``configs`` is the command behind the README's "matches the release's models.py on all 12
configurations": fastdit.reference against the release's DiT for every entry of DiT_models.

release_dit_tiny.pt: a small DiT built with the release's models.py (config below), its weights replaced by
seeded draws (adaLN-Zero zeroes the output, which would make the check vacuous), inputs x, t, y, and the
release's ``forward`` and ``forward_with_cfg`` (scale 4) outputs. Read by tests/test_reference.py.

release_diffusion.pt: outputs of the release's ``diffusion`` package on tests/diffusion/test_gaussian.py's
``tiny_dit()`` (see tests/diffusion/test_sampling.py's docstring for the entries). Read by tests/diffusion/.
"""
import argparse
import contextlib
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TINY_CONFIG = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
LABELS = [1, 4, 7, 9]
SPACINGS = ["ddim25", "ddim50", "250", "21", "100", "10,15,20"]
TOLERANCE = 1e-5


def release():
    """The release's modules; a clear error when they are not on the path (or when fastdit's shadow them)."""
    try:
        import diffusion
        import models
    except ImportError as error:
        raise SystemExit(f"the DiT release's code must be on PYTHONPATH (see this file's docstring): {error}")
    if not hasattr(models, "DiT_models") or not hasattr(diffusion, "create_diffusion"):
        raise SystemExit(f"models/diffusion on the path are not the release's: {models.__file__}")
    return models, diffusion


def tiny_dit():
    sys.path.insert(0, os.path.join(ROOT, "tests", "diffusion"))
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_gaussian import tiny_dit as make
    return make()


def relative_error(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@contextlib.contextmanager
def stored_step_noise(steps, copies):
    """Replace the release's per-step ``th.randn_like`` by the stored step noise (repeated over the cfg halves)."""
    it = iter(steps.float())
    original = torch.randn_like

    def next_noise(x, *args, **kwargs):
        return torch.cat([next(it)] * copies).to(x.dtype)

    torch.randn_like = next_noise
    try:
        yield
    finally:
        torch.randn_like = original


def release_samples(diffusion, model, labels, noise, spacing, cfg_scale, step_noise=None, eta=None):
    """The release's sample loop as its sample.py calls it: with guidance, [noise; noise] and the null class."""
    d = diffusion.create_diffusion(spacing)
    if cfg_scale == 1.0:
        z, kwargs, fn, copies = noise, dict(y=labels), model.forward, 1
    else:
        z = torch.cat([noise, noise])
        kwargs = dict(y=torch.cat([labels, torch.full_like(labels, model.num_classes)]), cfg_scale=cfg_scale)
        fn, copies = model.forward_with_cfg, 2
    with torch.no_grad(), (stored_step_noise(step_noise, copies) if step_noise is not None
                           else contextlib.nullcontext()):
        if spacing.startswith("ddim"):
            out = d.ddim_sample_loop(fn, z.shape, z, clip_denoised=False, model_kwargs=kwargs,
                                     device=noise.device, eta=eta)
        else:
            out = d.p_sample_loop(fn, z.shape, z, clip_denoised=False, model_kwargs=kwargs, device=noise.device)
    return out[: len(noise)]


def with_release_cfg(model, models):
    """Give fastdit.reference's tiny DiT the release's own ``forward_with_cfg`` (not fastdit's copy)."""
    model.forward_with_cfg = models.DiT.forward_with_cfg.__get__(model)
    return model


def dit_tiny_outputs(models, fixture):
    model = models.DiT(**fixture["config"]).eval()
    model.load_state_dict(fixture["state_dict"], strict=True)
    with torch.no_grad():
        return dict(out=model(fixture["x"], fixture["t"], fixture["y"]),
                    cfg_out=model.forward_with_cfg(fixture["x"], fixture["t"], fixture["y"], fixture["cfg_scale"]))


def diffusion_outputs(models, diffusion, fixture):
    model = with_release_cfg(tiny_dit(), models)
    labels, noise = fixture["labels"], fixture["noise"].float()
    out = dict(
        ddim25=release_samples(diffusion, model, labels, noise, "ddim25", 1.0, eta=0.0),
        ddim25_cfg4=release_samples(diffusion, model, labels, noise, "ddim25", 4.0, eta=0.0),
        **{"ddim25_eta1_cfg1.5": release_samples(diffusion, model, labels, noise, "ddim25", 1.5,
                                                 fixture["ddim_step_noise"], eta=1.0)},
        ddpm20=release_samples(diffusion, model, labels, noise, "20", 1.0, fixture["ddpm_step_noise"]),
        ddpm20_cfg4=release_samples(diffusion, model, labels, noise, "20", 4.0, fixture["ddpm_step_noise"]),
    )
    with torch.no_grad():
        out["probe"] = model(fixture["probe_x"], fixture["probe_t"], fixture["probe_y"])
        loss = fixture["loss"]
        terms = diffusion.create_diffusion("").training_losses(model, loss["x_start"], loss["t"],
                                                                dict(y=loss["y"]), noise=loss["noise"])
    out.update({f"loss.{k}": terms[k] for k in ("mse", "vb", "loss")})
    from diffusion.respace import space_timesteps
    spacings = {s: sorted(space_timesteps(1000, s)) for s in fixture["spacings"]}
    return out, spacings


def check(_args):
    models, diffusion = release()
    worst = 0.0
    tiny = torch.load(os.path.join(HERE, "release_dit_tiny.pt"), weights_only=True)
    for name, value in dit_tiny_outputs(models, tiny).items():
        error = relative_error(value, tiny[name])
        worst = max(worst, error)
        print(f"release_dit_tiny.pt {name}: {error:.2e}")
    fixture = torch.load(os.path.join(HERE, "release_diffusion.pt"), weights_only=True)
    outputs, spacings = diffusion_outputs(models, diffusion, fixture)
    for name, value in outputs.items():
        stored = fixture["loss"][name[5:]] if name.startswith("loss.") else fixture[name]
        error = relative_error(value, stored)
        worst = max(worst, error)
        print(f"release_diffusion.pt {name}: {error:.2e}")
    same = spacings == fixture["spacings"]
    print(f"release_diffusion.pt spacings: {'equal' if same else 'DIFFER'}")
    return 0 if worst <= TOLERANCE and same else 1


def perturb(model, generator):
    """N(0, 1/fan_in) for matrices, N(0, 0.02^2) for vectors, in sorted name order; pos_embed kept."""
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if name != "pos_embed":
                std = parameter[0].numel() ** -0.5 if parameter.dim() > 1 else 0.02
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model.eval()


def make(args):
    models, diffusion = release()
    os.makedirs(args.out, exist_ok=True)
    g = torch.Generator().manual_seed(2024)
    model = perturb(models.DiT(**TINY_CONFIG), g)
    tiny = dict(config=TINY_CONFIG, state_dict=model.state_dict(), x=torch.randn(4, 4, 8, 8, generator=g),
                t=torch.tensor([0, 10, 500, 999]), y=torch.tensor([0, 3, 10, 10]), cfg_scale=4.0)
    tiny.update(dit_tiny_outputs(models, tiny))
    torch.save(tiny, os.path.join(args.out, "release_dit_tiny.pt"))

    g = torch.Generator().manual_seed(2024)
    fixture = dict(labels=torch.tensor(LABELS),
                   noise=torch.randn(4, 4, 8, 8, generator=g).half(),  # rounded so fp16 storage is exact
                   ddim_step_noise=torch.randn(25, 4, 4, 8, 8, generator=g).half(),
                   ddpm_step_noise=torch.randn(20, 4, 4, 8, 8, generator=g).half(),
                   probe_x=torch.randn(2, 4, 8, 8, generator=g), probe_t=torch.tensor([3, 700]),
                   probe_y=torch.tensor([2, 10]), spacings={s: [] for s in SPACINGS},
                   loss=dict(x_start=torch.randn(4, 4, 8, 8, generator=g), t=torch.tensor([0, 1, 500, 999]),
                             noise=torch.randn(4, 4, 8, 8, generator=g), y=torch.tensor([0, 5, 9, 10])))
    outputs, fixture["spacings"] = diffusion_outputs(models, diffusion, fixture)
    for name, value in outputs.items():
        if name.startswith("loss."):
            fixture["loss"][name[5:]] = value
        else:
            fixture[name] = value
    torch.save(fixture, os.path.join(args.out, "release_diffusion.pt"))
    print(f"wrote {args.out}/release_dit_tiny.pt and {args.out}/release_diffusion.pt")
    return 0


def configs(args):
    """fastdit.reference against the release's models.py on every DiT_models entry, same weights and inputs."""
    models, _ = release()
    sys.path.insert(0, ROOT)
    from fastdit import reference

    worst = 0.0
    for name in reference.DiT_models:
        g = torch.Generator().manual_seed(0)
        theirs = perturb(models.DiT_models[name](input_size=args.input_size, num_classes=args.num_classes), g)
        ours = reference.DiT_models[name](input_size=args.input_size, num_classes=args.num_classes).eval()
        ours.load_state_dict(theirs.state_dict(), strict=True)
        x = torch.randn(2, 4, args.input_size, args.input_size, generator=g)
        t, y = torch.tensor([1, 900]), torch.tensor([3, args.num_classes])
        with torch.no_grad():
            error = relative_error(ours(x, t, y), theirs(x, t, y))
            cfg_error = relative_error(ours.forward_with_cfg(x, t, y, 4.0), theirs.forward_with_cfg(x, t, y, 4.0))
        worst = max(worst, error, cfg_error)
        print(f"{name}: forward {error:.1e}, forward_with_cfg {cfg_error:.1e}", flush=True)
        del theirs, ours
    print(f"largest relative error over {len(reference.DiT_models)} configurations: {worst:.1e}")
    return 0 if worst <= TOLERANCE else 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="recompute the committed fixtures' release outputs").set_defaults(run=check)
    p = sub.add_parser("make", help="write new fixtures (fresh random draws)")
    p.add_argument("--out", required=True)
    p.set_defaults(run=make)
    p = sub.add_parser("configs", help="fastdit.reference vs the release on all DiT_models entries")
    p.add_argument("--input-size", type=int, default=32, help="latent size (32: the 256 px models)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.set_defaults(run=configs)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
