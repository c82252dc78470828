"""One set of sampling defaults (``fastdit.diffusion.settings``): a model carries its recommended settings, and
``fastdit.sample`` and ``fastdit sample`` both use them where the caller gives none; the bundled model loads by
name."""
import json

import pytest
import torch
from test_gaussian import tiny_dit

import fastdit
from fastdit.cli import main
from fastdit.cli.options import BUNDLED_MODEL
from fastdit.diffusion import settings
from fastdit.diffusion.sampling import sample


@pytest.fixture(scope="module")
def digits():
    return fastdit.load("digits")


def test_the_bundled_model_loads_by_name_with_its_settings(digits):
    assert "digits" in fastdit.NAMED_MODELS
    by_path = fastdit.load(BUNDLED_MODEL)
    assert digits.state_dict().keys() == by_path.state_dict().keys()
    assert all(torch.equal(digits.state_dict()[key], value) for key, value in by_path.state_dict().items())
    assert settings.recommended(digits) == {"sampler": "ddim", "steps": 50, "cfg_scale": 4.0}
    with pytest.raises(fastdit.CheckpointError, match="load by name: digits$"):
        fastdit.load("digitz")


def test_models_without_settings_sample_as_the_releases_sample_py():
    assert settings.recommended(tiny_dit()) == {"sampler": "ddpm", "steps": 250, "cfg_scale": 4.0}
    # Without a null class there is no guidance to default to.
    assert settings.recommended(tiny_dit(class_dropout_prob=0.0))["cfg_scale"] == 1.0


def test_a_sampler_other_than_the_models_own_takes_its_default_steps(digits):
    assert settings.resolve(digits) == ("ddim", 50, 4.0)
    assert settings.resolve(digits, "ddpm") == ("ddpm", 250, 4.0)
    assert settings.resolve(digits, "dpm++", cfg_scale=1.0) == ("dpm++", 20, 1.0)
    assert settings.resolve(tiny_dit(), "ddim") == ("ddim", 25, 4.0)
    assert settings.resolve(tiny_dit(), steps=7) == ("ddpm", 7, 4.0)


def test_sample_uses_the_models_settings_when_given_none(torch_path):
    model = fastdit.load("digits")
    model.sampling_defaults = {"sampler": "ddim", "steps": 3, "cfg_scale": 2.0}  # short, for the test's sake
    expected = sample(model, [1, 2], sampler="ddim", steps=3, cfg_scale=2.0, seed=0)
    assert torch.equal(sample(model, [1, 2], seed=0), expected)
    assert not torch.equal(sample(model, [1, 2], cfg_scale=1.0, seed=0), expected)


def test_the_command_uses_the_same_settings_as_the_library(digits, tmp_path, torch_path):
    out = tmp_path / "out"
    assert main(["sample", "--ckpt", "digits", "--classes", "3", "--steps", "2", "--no-progress",
                 "--out", str(out)]) == 0
    recorded = json.loads((out / "run.json").read_text())["sampling"]
    assert (recorded["sampler"], recorded["steps"], recorded["cfg_scale"]) == settings.resolve(digits, steps=2)


def test_save_pretrained_keeps_the_settings(digits, tmp_path):
    digits.save_pretrained(tmp_path / "copy")
    assert settings.recommended(fastdit.load(tmp_path / "copy")) == settings.recommended(digits)
    model = tiny_dit()
    fastdit.save_pretrained(model, tmp_path / "plain")
    assert not (tmp_path / "plain" / "sampling.json").exists()


@pytest.mark.parametrize("carried, words", [
    ({"sampler": "ddim", "steps": 50}, "expected a dict with sampler, steps, cfg_scale"),
    ({"sampler": "euler", "steps": 50, "cfg_scale": 4.0}, "sampler must be one of"),
    ({"sampler": "ddim", "steps": 0, "cfg_scale": 4.0}, r"steps must be an integer in \[1, 1000\], got 0"),
    ({"sampler": "ddim", "steps": 50, "cfg_scale": -1}, "cfg_scale must be a number >= 0, got -1"),
])
def test_bad_carried_settings_are_named(carried, words):
    model = tiny_dit()
    model.sampling_defaults = carried
    with pytest.raises(ValueError, match=f"^sampling_defaults: {words}"):
        sample(model, [1], seed=0)
