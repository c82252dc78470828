"""The ADM evaluation suite's metrics (openai/guided-diffusion, ``evaluations/evaluator.py``) on features.

- Fréchet distance between two Gaussians (mean, covariance), with the suite's handling of the matrix square
  root: scipy's ``sqrtm`` of the product; if that is not finite, 1e-6 is added to both diagonals and it is
  taken again; an imaginary part is dropped when the diagonal's is within 1e-3 of zero, else an error.
- Inception Score over consecutive splits of 5,000 samples (the last may be shorter), the mean of the splits'
  exp(mean KL(p(y|x) || p(y))).
- Precision and recall by the k-NN manifold estimator (Kynkäänniemi et al. 2019) with k = 3: a point's radius
  is its squared Euclidean distance to its k-th nearest neighbour in its own set (itself counted as the 0th);
  precision is the share of samples inside some reference ball, recall the share of references inside some
  sample ball. The suite takes the distances in float16 (float32 where float16 overflows); here they are
  float64, so a point within float16's rounding (about 1e-3 relative) of a radius may fall the other way.

Everything is reduced in float64; ``Moments`` accumulates mean and covariance batch by batch and merges
across processes, so that statistics of 50,000 images never hold the images' features at once.
"""
import dataclasses
import warnings

import numpy as np
import torch
from scipy import linalg

NEIGHBOURHOOD = 3  # the suite's nhood_sizes=(3,)
IS_SPLIT_SIZE = 5000  # the suite's split_size


class MetricError(ValueError):
    """Features that a metric cannot be computed from, in one line."""


@dataclasses.dataclass
class Moments:
    """Count, mean and centred sum of outer products of feature vectors, in float64. ``add`` takes a batch and
    ``merge`` another accumulator (Chan et al.'s pairwise update), so that the order of batches and processes
    changes nothing but rounding; the covariance is numpy.cov's (normalised by count - 1)."""

    count: int = 0
    mean: np.ndarray | None = None
    scatter: np.ndarray | None = None

    def add(self, features) -> None:
        features = np.asarray(features, dtype=np.float64)
        if len(features):
            mean = features.mean(axis=0)
            centred = features - mean
            self.merge(Moments(len(features), mean, centred.T @ centred))

    def merge(self, other: "Moments") -> None:
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.scatter = other.count, other.mean.copy(), other.scatter.copy()
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self.scatter = self.scatter + other.scatter + np.outer(delta, delta) * (self.count * other.count / total)
        self.mean = self.mean + delta * (other.count / total)
        self.count = total

    def statistics(self, what: str) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            raise MetricError(f"{what}: a covariance needs at least 2 images, got {self.count}")
        return self.mean, self.scatter / (self.count - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6) -> float:
    """||mu1 - mu2||² + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^½), as the suite takes it."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise MetricError(f"Fréchet distance: the two Gaussians differ in dimension: means {mu1.shape} and "
                          f"{mu2.shape}, covariances {sigma1.shape} and {sigma2.shape}")
    with warnings.catch_warnings():
        # scipy warns of a singular product (dead features, fewer images than dimensions); the suite goes on and
        # checks the result's finiteness and imaginary part, as below.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"Fréchet distance: the covariances' product is singular; adding {eps} to their diagonals",
                      stacklevel=2)
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise MetricError(f"Fréchet distance: the square root of the covariances' product has an imaginary "
                              f"part up to {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


class InceptionScore:
    """The suite's Inception Score from logits that arrive in order, batch by batch: each split of
    ``split_size`` consecutive samples keeps the float64 sum of its softmax rows and of Σ p log p, so the
    score needs O(splits × classes) memory. ``merge`` adds another process's sums (its samples' global
    positions decide their splits, as ``add``'s ``start`` says)."""

    def __init__(self, split_size=IS_SPLIT_SIZE):
        self.split_size = split_size
        self.splits: dict[int, list] = {}  # split index -> [count, sum of p, sum of p log p]

    def add(self, logits, start: int) -> None:
        probabilities = torch.softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64), dim=1)
        plogp = torch.special.xlogy(probabilities, probabilities).sum(dim=1)
        first = 0
        while first < len(probabilities):
            index = (start + first) // self.split_size
            end = min(len(probabilities), (index + 1) * self.split_size - start)
            self._accumulate(index, end - first, probabilities[first:end].sum(0).numpy(),
                             float(plogp[first:end].sum()))
            first = end

    def _accumulate(self, index, count, probability_sum, plogp_sum):
        split = self.splits.setdefault(index, [0, 0.0, 0.0])
        split[0] += count
        split[1] = split[1] + probability_sum
        split[2] += plogp_sum

    def merge(self, other: "InceptionScore") -> None:
        for index, (count, probability_sum, plogp_sum) in other.splits.items():
            self._accumulate(index, count, probability_sum, plogp_sum)

    def score(self) -> float:
        if not self.splits:
            raise MetricError("Inception Score: no samples")
        scores = []
        for count, probability_sum, plogp_sum in (self.splits[index] for index in sorted(self.splits)):
            marginal = probability_sum / count
            # mean over the split of Σ p (log p - log p̄) = mean Σ p log p - Σ p̄ log p̄
            kl = plogp_sum / count - float(np.sum(marginal * np.log(np.where(marginal > 0, marginal, 1.0))))
            scores.append(np.exp(kl))
        return float(np.mean(scores))


def _squared_distances(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """The suite's max(|u|² - 2 u·v + |v|², 0)."""
    return (rows.square().sum(1, keepdim=True) - 2 * rows @ columns.T + columns.square().sum(1)).clamp_min_(0)


def _row_blocks(rows: int, columns: int, budget=1 << 25):
    """Row ranges whose distance block to ``columns`` columns holds about ``budget`` float64 values."""
    step = max(1, budget // max(columns, 1))
    return (range(start, min(start + step, rows)) for start in range(0, rows, step))


def manifold_radii(features: torch.Tensor, k=NEIGHBOURHOOD) -> torch.Tensor:
    """Each row's squared distance to its k-th nearest row (the row itself is the 0th)."""
    if len(features) < k + 1:
        raise MetricError(f"precision/recall: the k-NN manifold with k = {k} needs at least {k + 1} images in each "
                          f"set, got {len(features)}")
    radii = torch.empty(len(features), dtype=torch.float64, device=features.device)
    for block in _row_blocks(len(features), len(features)):
        distances = _squared_distances(features[block.start:block.stop], features)
        radii[block.start:block.stop] = distances.kthvalue(k + 1, dim=1).values
    return radii


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Whether each point lies in some centre's ball (distance <= the centre's radius)."""
    inside = torch.empty(len(points), dtype=torch.bool, device=points.device)
    for block in _row_blocks(len(points), len(centres)):
        inside[block.start:block.stop] = (_squared_distances(points[block.start:block.stop], centres)
                                          <= radii).any(dim=1)
    return inside


def precision_recall(reference, samples, k=NEIGHBOURHOOD, device=None) -> tuple[float, float]:
    """The suite's (precision, recall) of ``samples`` against ``reference`` (N × D features each)."""
    reference = torch.as_tensor(np.asarray(reference), dtype=torch.float64, device=device)
    samples = torch.as_tensor(np.asarray(samples), dtype=torch.float64, device=device)
    if reference.ndim != 2 or samples.ndim != 2 or reference.shape[1] != samples.shape[1]:
        raise MetricError(f"precision/recall: expected two N x D feature arrays of the same D, got "
                          f"{tuple(reference.shape)} and {tuple(samples.shape)}")
    reference_radii, sample_radii = manifold_radii(reference, k), manifold_radii(samples, k)
    precision = _inside(samples, reference, reference_radii).double().mean()
    recall = _inside(reference, samples, sample_radii).double().mean()
    return float(precision), float(recall)
