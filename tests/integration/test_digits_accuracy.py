"""The README's accuracy figures for the bundled digits model, each sampled as the README says (seed 0, 100 digits,
ten per class) and scored by ``fastdit digits-accuracy``'s classifier. Same seed, same CPU math: the count of
recognised digits is deterministic, so each figure is checked exactly."""
import os
import subprocess
import sys

import numpy as np
import pytest

from fastdit.train.digits import conditioned_class_accuracy


@pytest.mark.slow
@pytest.mark.parametrize("flags, recognised", [
    ([], 100),  # the default run: the bundled model's settings, DDIM 50 at scale 4
    (["--sampler", "dpm++", "--steps", "20", "--cfg-scale", "4"], 99),
    (["--sampler", "ddim", "--steps", "50", "--cfg-scale", "2"], 92),
    (["--sampler", "ddim", "--steps", "50", "--cfg-scale", "1"], 61),  # no guidance
], ids=["ddim50-scale4", "dpm++20-scale4", "ddim50-scale2", "ddim50-unguided"])
def test_bundled_model_accuracy_is_the_readmes(flags, recognised, tmp_path):
    # The torch path (the Triton interpreter would take minutes per run), outside the checkout so that
    # `-m fastdit` is the installed package.
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "fastdit", "sample", "--no-progress", "--seed", "0", *flags],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "samples" / "samples.npz") as data:
        images, labels = data["images"], data["labels"]
    assert np.array_equal(labels, np.repeat(np.arange(10), 10))
    assert round(conditioned_class_accuracy(images, labels) * len(labels)) == recognised


def test_bundled_model_is_the_readmes():
    """The README's description of fastdit/assets/digits: 16x16 images in 4x4 patches, width 128, depth 4,
    learned sigma, 5 MB, trained by the digits preset; sampled with DDIM, 50 steps, guidance scale 4."""
    import json

    from fastdit.cli import options
    from fastdit.train.trainer import PRESETS

    with open(os.path.join(options.BUNDLED_MODEL, "config.json")) as file:
        config = json.load(file)
    described = dict(input_size=16, patch_size=4, in_channels=1, hidden_size=128, depth=4, num_classes=10,
                     learn_sigma=True)
    assert {key: config[key] for key in described} == described
    assert {key: config[key] for key in described} == {key: PRESETS["digits"]["model_config"][key] for key in described}
    assert options.bundled_settings() == dict(num_classes=10, num_per_class=10, sampler="ddim", steps=50, cfg_scale=4.0)
    size = os.path.getsize(os.path.join(options.BUNDLED_MODEL, "model.safetensors"))
    assert round(size / 2**20) == 5
