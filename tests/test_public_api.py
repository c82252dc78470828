"""Every public name the README uses imports from where the README says it lives."""
import importlib

import pytest

import fastdit

README_NAMES = ["ATTENTION_BACKENDS", "CheckpointError", "DiT", "DiT_models", "kernel_path", "kernels", "load",
                "NAMED_MODELS", "NonFiniteSampleError", "reference", "sample", "save_pretrained"]


@pytest.mark.parametrize("name", README_NAMES)
def test_top_level_name(name):
    assert getattr(fastdit, name) is not None


def test_the_names_are_the_implementations():
    from fastdit.diffusion.sampling import sample
    from fastdit.models.dit import DiT, load

    assert fastdit.DiT is DiT and fastdit.sample is sample and fastdit.load == load
    assert fastdit.reference.DiT is importlib.import_module("fastdit.reference").DiT
    assert issubclass(fastdit.DiT, fastdit.reference.DiT)  # drop-in: same arguments and state-dict keys
    assert set(fastdit.DiT_models) == set(fastdit.reference.DiT_models)


@pytest.mark.parametrize("module", ["fastdit.cli", "fastdit.ablation", "fastdit.roofline", "fastdit.kernels"])
def test_command_modules_import(module):
    importlib.import_module(module)


def test_every_subcommand_is_registered(capsys):
    from fastdit.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0
    usage = capsys.readouterr().out
    for command in ("demo", "sample", "train", "encode", "digits-accuracy", "bench", "export", "convert", "ablation"):
        assert command in usage, command
