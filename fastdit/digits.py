"""How recognisable sampled digits are: the share of samples that a classifier trained on the
real digits assigns to the class they were conditioned on.

The classifier is an RBF SVC on scikit-learn's 8x8 digits (1,797 images, no download), the
standard baseline for that data set (about 99% held-out accuracy). Samples of any size are
area-averaged down to 8x8 and mapped to the data set's 0..16 grey levels first.
"""
import functools

import numpy as np
import torch
import torch.nn.functional as F


@functools.cache
def digits_classifier():
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    digits = load_digits()
    return SVC(gamma=0.001, C=10.0).fit(digits.data, digits.target)


def to_digit_features(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, 1) images -> (N, 64) features on the data set's 0..16 scale."""
    if images.ndim == 4:
        images = images[..., 0]
    pixels = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    pixels = F.adaptive_avg_pool2d(pixels, (8, 8)) if pixels.shape[-1] != 8 else pixels
    return (pixels.reshape(len(images), 64) * 16.0).numpy()


DIGIT_CLASSES = 10


def check_digit_samples(images, labels) -> None:
    """What ``conditioned_class_accuracy`` scores: grey uint8 images, one digit label each."""
    images, labels = np.asarray(images), np.asarray(labels)
    grey = images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 1)
    if not grey or images.dtype != np.uint8 or len(images) == 0 or 0 in images.shape:
        raise ValueError(f"images: expected grey uint8 images of shape (N, H, W) or (N, H, W, 1), N >= 1 (a "
                         f"1-channel pixel model's samples), got {images.dtype} of shape {images.shape}")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels: expected {len(images)} integer labels, one per image, got {labels.dtype} of "
                         f"shape {labels.shape}")
    outside = sorted(set(labels[(labels < 0) | (labels >= DIGIT_CLASSES)].tolist()))
    if outside:
        raise ValueError(f"labels: expected digits in [0, {DIGIT_CLASSES - 1}], got {outside}")


def conditioned_class_accuracy(images: np.ndarray, labels: np.ndarray) -> float:
    """Share of ``images`` the classifier assigns to their conditioning ``labels``."""
    check_digit_samples(images, labels)
    predicted = digits_classifier().predict(to_digit_features(images))
    return float((predicted == np.asarray(labels)).mean())
