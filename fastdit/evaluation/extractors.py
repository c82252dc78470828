"""Feature extractors: a network that maps a batch of uint8 images (B, H, W, C) to named float32 features.

- ``pool``: the features of FID and precision/recall; ``spatial`` (optional): sFID's; ``logits`` (optional):
  the Inception Score's.
- ``identity`` names the network and its weights: feature shards and cached reference statistics record it,
  and are used again only by the same network.

The Inception network is torch-fidelity's ``FeatureExtractorInceptionV3``, its port of the TF graph FID uses
(the ``2015-12-05`` weights). fastdit never downloads it (``inception_path``). The digits network is a small
classifier trained on scikit-learn's digits at first use; it runs on the same code path, anywhere, in seconds.
"""
import functools
import hashlib
import importlib
import importlib.util
import os
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

from fastdit.evaluation.inputs import InputError
from fastdit.io import atomic_path

# torch-fidelity's file: torch.hub names a download <name>-<first 8 hex digits of its sha256>.<ext> and checks it.
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256_PREFIX = "6726825d"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
SPATIAL_CHANNELS = 7  # the suite's mixed_6/conv[..., :7]


def cache_dir() -> str:
    """fastdit's own cache: $FASTDIT_CACHE, else $XDG_CACHE_HOME/fastdit, else ~/.cache/fastdit."""
    return os.environ.get("FASTDIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastdit")


def inception_path() -> str:
    """Where torch-fidelity itself keeps the weights once downloaded (torch.hub's checkpoints folder)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)


def sha256_of(path, chunk=1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def inception_class():
    """torch-fidelity's ``FeatureExtractorInceptionV3``. torch-fidelity's package __init__ imports torchvision
    (for its data sets and other extractors), which fails where torchvision does not match torch (a CPU torch
    beside PyPI's torchvision: "operator torchvision::nms does not exist"). The Inception module itself needs
    only torch, so then it is imported without running the package's __init__."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        return FeatureExtractorInceptionV3
    except ModuleNotFoundError as error:
        if error.name == "torch_fidelity":
            raise ImportError("the Inception features need torch-fidelity: pip install 'fastdit[eval]' (or "
                              "torch-fidelity)") from None
        first_error = error
    except (ImportError, RuntimeError) as error:
        first_error = error
    spec = importlib.util.find_spec("torch_fidelity")
    package = importlib.util.module_from_spec(spec)
    sys.modules["torch_fidelity"] = package
    try:
        return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3").FeatureExtractorInceptionV3
    except (ImportError, RuntimeError) as error:
        raise ImportError(f"cannot import torch-fidelity's Inception ({first_error}; then {error})") from None
    finally:
        if sys.modules.get("torch_fidelity") is package:
            del sys.modules["torch_fidelity"]


def inception_architecture():
    """torch-fidelity's Inception network randomly initialised, for FLOP counts and for tests where its weights
    cannot be fetched: its constructor loads a weights file strictly, so a subclass takes the empty one it is
    given without loading it."""
    network_class = inception_class()

    class Unloaded(network_class):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    with tempfile.TemporaryDirectory() as folder:
        torch.save({}, os.path.join(folder, "empty.pth"))
        network = Unloaded("random", ["2048", "logits_unbiased"],
                           feature_extractor_weights_path=os.path.join(folder, "empty.pth"))
    network.__class__ = network_class
    return network


class FeatureExtractor(torch.nn.Module):
    """What every extractor has: ``name``, ``identity``, the ``channels`` it takes, and whether SAMPLES and REF
    must share a resolution (``same_resolution``; the digits network pools any size to 8x8)."""

    name: str
    identity: str
    channels: int
    same_resolution: bool


class InceptionFeatures(FeatureExtractor):
    """pool_3 (2048), the first 7 channels of mixed_6/conv flattened in TF's (H, W, C) order (17 x 17 x 7 =
    2023, the order of the mu_s/sigma_s stored in ADM's reference batches), and the bias-free logits the suite's
    Inception Score takes (pool_3 @ W of softmax/logits, 1008 classes)."""

    channels = 3
    same_resolution = True

    def __init__(self, network, identity: str):
        super().__init__()
        self.name, self.identity, self.network = "inception", identity, network
        self._spatial = None
        # TF's mixed_6 is the third 17x17 block: torch-fidelity's Mixed_6d; its conv (1x1 branch, after the ReLU).
        network.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        self._spatial = output[:, :SPATIAL_CHANNELS]

    def forward(self, images: torch.Tensor) -> dict:
        pool, logits = self.network(images.permute(0, 3, 1, 2))
        spatial, self._spatial = self._spatial, None
        return {"pool": pool, "spatial": spatial.permute(0, 2, 3, 1).reshape(len(images), -1).float(),
                "logits": logits}


def load_inception(path=None, sha256_prefix=INCEPTION_SHA256_PREFIX) -> InceptionFeatures:
    """The Inception features from torch-fidelity's weights file at ``path`` (default ``inception_path()``),
    checked by its sha256 (``sha256_prefix``: the digits torch.hub checks; tests pass their own file's)."""
    path = os.path.abspath(path or inception_path())
    if not os.path.isfile(path):
        raise InputError(f"--inception {path}: no such file; download torch-fidelity's Inception weights once "
                         f"(curl -L {INCEPTION_URL} -o {path}) or pass --inception PATH")
    digest = sha256_of(path)
    if not digest.startswith(sha256_prefix):
        raise InputError(f"--inception {path}: sha256 {digest[:16]}..., expected {sha256_prefix}... "
                         f"({INCEPTION_FILE}): another or a damaged file")
    network = inception_class()("inception-v3-compat", ["2048", "logits_unbiased"],
                                feature_extractor_weights_path=path)
    return InceptionFeatures(network, f"inception-2015-12-05:{digest}").eval()


DIGITS_SEED, DIGITS_STEPS, DIGITS_WIDTH = 0, 400, 64
DIGITS_FILE = f"digits-features-s{DIGITS_SEED}-n{DIGITS_STEPS}-w{DIGITS_WIDTH}.pt"


class DigitsFeatures(FeatureExtractor):
    """A two-layer classifier of scikit-learn's 8x8 digits: ``pool`` is its hidden layer (64 features), ``logits``
    its 10 class scores. Images of any size are area-averaged to 8x8 (``fastdit.digits``'s judge does the
    same)."""

    channels = 1
    same_resolution = False

    def __init__(self):
        super().__init__()
        self.name = "digits"
        self.hidden = torch.nn.Sequential(torch.nn.Linear(64, DIGITS_WIDTH * 2), torch.nn.ReLU(),
                                          torch.nn.Linear(DIGITS_WIDTH * 2, DIGITS_WIDTH), torch.nn.ReLU())
        self.classes = torch.nn.Linear(DIGITS_WIDTH, 10)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.permute(0, 3, 1, 2).to(self.classes.weight.dtype) / 255.0
        if pixels.shape[-2:] != (8, 8):
            pixels = F.adaptive_avg_pool2d(pixels, (8, 8))
        return pixels.reshape(len(images), 64)

    def forward(self, images: torch.Tensor) -> dict:
        hidden = self.hidden(self.pixels(images))
        return {"pool": hidden, "logits": self.classes(hidden)}


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits as uint8 8x8 images (their 0..16 grey levels scaled to 0..255) and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.round(digits.images * (255 / 16)).astype(np.uint8), digits.target


def _train_digits() -> DigitsFeatures:
    """Full-batch Adam on all the digits, fixed seed and one thread: the same weights on every run."""
    images, labels = digit_images()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(DIGITS_SEED)
        network = DigitsFeatures()
        torch.random.set_rng_state(generator_state)
        optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
        inputs, targets = torch.from_numpy(images[..., None]), torch.from_numpy(labels)
        for _ in range(DIGITS_STEPS):
            loss = F.cross_entropy(network(inputs)["logits"], targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return network


@functools.cache
def digits_features() -> DigitsFeatures:
    """The digits network: trained once (about a second on a CPU) and kept in ``cache_dir()``."""
    path = os.path.join(cache_dir(), DIGITS_FILE)
    network = DigitsFeatures()
    try:
        network.load_state_dict(torch.load(path, weights_only=True))
    except (OSError, RuntimeError, ValueError, EOFError):
        network = _train_digits()
        os.makedirs(cache_dir(), exist_ok=True)
        with atomic_path(path) as temporary:
            torch.save(network.state_dict(), temporary)
    digest = hashlib.sha256()
    for name, tensor in network.state_dict().items():
        digest.update(name.encode() + tensor.numpy().tobytes())
    network.identity = f"digits:{digest.hexdigest()}"
    return network.requires_grad_(False).eval()
