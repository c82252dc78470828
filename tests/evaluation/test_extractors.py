"""The feature extractors: torch-fidelity's Inception (randomly initialised: its weights cannot be fetched here)
through the whole evaluation, its weights file checked; the digits network deterministic, cached and accurate."""
import hashlib
import os

import numpy as np
import pytest
import torch
from evaluation_data import random_images, write_samples

from fastdit.evaluation import extractors, pipeline
from fastdit.evaluation.inputs import InputError


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """torch-fidelity's FeatureExtractorInceptionV3, randomly initialised, saved as a weights file."""
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            network = extractors.inception_architecture()
    except ImportError as error:
        pytest.skip(f"torch-fidelity cannot be imported here ({error})")
    folder = tmp_path_factory.mktemp("inception")
    path = folder / "random-inception.pth"
    torch.save(network.state_dict(), path)
    return str(path)


def test_inception_features_have_the_suites_shapes(random_inception):
    inception = extractors.load_inception(random_inception, extractors.sha256_of(random_inception)[:8])
    captured = []
    inception.network.Mixed_6d.branch1x1.register_forward_hook(lambda module, inputs, output: captured.append(output))
    with torch.no_grad():
        features = inception(torch.from_numpy(random_images(0, 2, size=32)))
    assert {name: tuple(value.shape) for name, value in features.items()} == {
        "pool": (2, 2048), "spatial": (2, 17 * 17 * 7), "logits": (2, 1008)}
    # mixed_6/conv[..., :7] in TF's NHWC order, flattened per image
    assert torch.equal(features["spatial"], captured[0][:, :7].permute(0, 2, 3, 1).reshape(2, -1))


@pytest.mark.slow  # minutes on 2 CPU cores: the suite's sqrtm of 2048 x 2048 and 2023 x 2023 products
def test_the_evaluation_on_a_random_inception_is_deterministic(random_inception, tmp_path, process):
    samples = write_samples(tmp_path / "samples.npz", random_images(1, 6, size=16))
    reference = write_samples(tmp_path / "ref.npz", random_images(2, 5, size=16))
    prefix = extractors.sha256_of(random_inception)[:8]
    reports = [pipeline.evaluate(samples, reference, extractors.load_inception(random_inception, prefix), process,
                                 batch_size=4, workers=0) for _ in range(2)]
    assert reports[0] == reports[1]
    assert reports[0]["features"] == f"inception-2015-12-05:{extractors.sha256_of(random_inception)}"
    assert all(np.isfinite(reports[0][name]) for name in ("fid", "sfid", "inception_score", "precision", "recall"))


def test_an_inception_file_is_checked_before_it_is_read(tmp_path):
    missing = tmp_path / "weights-inception.pth"
    with pytest.raises(InputError, match=f"--inception {missing}: no such file; download .* once .*curl -L "
                                         f"{extractors.INCEPTION_URL} -o {missing}"):
        extractors.load_inception(str(missing))
    missing.write_bytes(b"not the weights")
    digest = hashlib.sha256(b"not the weights").hexdigest()
    with pytest.raises(InputError, match=f"sha256 {digest[:16]}..., expected 6726825d... "
                                         r"\(weights-inception-2015-12-05-6726825d.pth\): another or a damaged file"):
        extractors.load_inception(str(missing))


def test_the_digits_network_is_deterministic_cached_and_accurate(monkeypatch):
    extractors.digits_features.cache_clear()
    network = extractors.digits_features()
    again = extractors._train_digits()
    assert all(torch.equal(a, b) for a, b in zip(network.state_dict().values(), again.state_dict().values()))
    assert os.path.isfile(os.path.join(extractors.cache_dir(), extractors.DIGITS_FILE))
    monkeypatch.setattr(extractors, "_train_digits", lambda: pytest.fail("trained again instead of read from cache"))
    extractors.digits_features.cache_clear()
    assert extractors.digits_features().identity == network.identity
    images, labels = extractors.digit_images()
    with torch.no_grad():
        predicted = network(torch.from_numpy(images[..., None]))["logits"].argmax(1).numpy()
    assert (predicted == labels).mean() > 0.99  # the data it was trained on: the features separate the classes
    extractors.digits_features.cache_clear()
