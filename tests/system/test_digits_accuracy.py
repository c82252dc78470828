"""The README's accuracy figures for the bundled digits model, each sampled as the README says (seed 0, 100 digits,
ten per class) and scored by ``fastdit digits-accuracy``'s classifier. Same seed, same CPU math: the count of
recognised digits is deterministic, so each figure is checked exactly."""
import os
import subprocess
import sys

import numpy as np
import pytest
from processes import torch_path_environment

from fastdit.digits import conditioned_class_accuracy


@pytest.mark.slow
@pytest.mark.parametrize("flags, recognised", [
    ([], 100),  # the default run: the bundled model's settings, DDIM 50 at scale 4
    (["--sampler", "dpm++", "--steps", "20", "--cfg-scale", "4"], 99),
    (["--sampler", "ddim", "--steps", "50", "--cfg-scale", "2"], 92),
    (["--sampler", "ddim", "--steps", "50", "--cfg-scale", "1"], 61),  # no guidance
    (["--dtype", "bf16"], 100),
    (["--quantize", "fp8"], 100),  # FP8 within 1 point of bf16 (the README)
], ids=["ddim50-scale4", "dpm++20-scale4", "ddim50-scale2", "ddim50-unguided", "bf16", "fp8"])
def test_bundled_model_accuracy_is_the_readmes(flags, recognised, tmp_path):
    # The torch path (the Triton interpreter would take minutes per run), outside the checkout so that
    # `-m fastdit` is the installed package.
    env = torch_path_environment()
    result = subprocess.run([sys.executable, "-m", "fastdit", "sample", "--no-progress", "--seed", "0", *flags],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "samples" / "samples.npz") as data:
        images, labels = data["arr_0"], data["labels"]
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


def real_digits():
    """scikit-learn's digits (the classifier's own training data) as `fastdit sample` writes images: uint8, 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.round(digits.images * 255 / 16).astype(np.uint8), digits.target


def test_digits_accuracy_scores_the_real_digits_and_not_shifted_labels(tmp_path, capsys):
    from fastdit.cli import main

    images, labels = real_digits()
    upscaled = images.repeat(2, axis=1).repeat(2, axis=2)[..., None]  # (N, 16, 16, 1), as the bundled model's
    np.savez(tmp_path / "samples.npz", arr_0=upscaled, labels=labels)
    assert main(["digits-accuracy", str(tmp_path / "samples.npz")]) == 0
    expected = f"100.0% of {len(labels)} samples classified as the digit they were conditioned on\n"
    assert capsys.readouterr().out == expected
    assert conditioned_class_accuracy(images, (labels + 1) % 10) == 0.0


@pytest.mark.parametrize("images, labels, message", [
    (np.zeros((2, 8, 8), np.float32), [3, 4], "images: expected grey uint8 images"),
    (np.zeros((2, 8, 8, 3), np.uint8), [3, 4], "images: expected grey uint8 images"),
    (np.zeros((0, 8, 8), np.uint8), [], "images: expected grey uint8 images"),
    (np.zeros((2, 8, 8), np.uint8), [3.0, 4.0], "labels: expected 2 integer labels, one per image, got float64"),
    (np.zeros((2, 8, 8), np.uint8), [-1, 4], r"labels: expected digits in \[0, 9\], got \[-1\]"),
])
def test_conditioned_class_accuracy_refuses_what_it_cannot_score(images, labels, message):
    with pytest.raises(ValueError, match=message):
        conditioned_class_accuracy(images, np.array(labels))
