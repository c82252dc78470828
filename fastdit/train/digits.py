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


def conditioned_class_accuracy(images: np.ndarray, labels: np.ndarray) -> float:
    """Share of ``images`` the classifier assigns to their conditioning ``labels``."""
    predicted = digits_classifier().predict(to_digit_features(images))
    return float((predicted == np.asarray(labels)).mean())
