"""The metric functions against a float64 transcription, written here, of the ADM suite's formulas
(openai/guided-diffusion, evaluations/evaluator.py: FIDStatistics.frechet_distance,
Evaluator.compute_inception_score, ManifoldEstimator with nhood_sizes=(3,))."""
import warnings

import numpy as np
import pytest
from scipy import linalg

from fastdit.evaluation import metrics
from fastdit.evaluation.metrics import InceptionScore, MetricError, Moments

RELATIVE = 1e-6  # the bound for formulas computed the same way in float64


def suite_frechet(mu1, sigma1, mu2, sigma2, eps=1e-6):
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
        covmean = covmean.real
    diff = mu1 - mu2
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def suite_inception_score(logits, split_size):
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    preds = shifted / shifted.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def suite_precision_recall(reference, samples, k=3):
    def distances(u, v):
        return np.maximum((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None, :], 0.0)

    def radii(features):
        return np.partition(distances(features, features), np.arange(k + 1), axis=1)[:, k]

    reference_radii, sample_radii = radii(reference), radii(samples)
    between = distances(reference, samples)
    precision = np.mean(np.any(between <= reference_radii[:, None], axis=0))
    recall = np.mean(np.any(between <= sample_radii[None, :], axis=1))
    return precision, recall


def features(seed, count, dim, rank=None, shift=0.0):
    generator = np.random.default_rng(seed)
    basis = generator.standard_normal((rank or dim, dim))
    return generator.standard_normal((count, rank or dim)) @ basis + shift


def moments_of(array, pieces=(1, 5, 17)):
    """Statistics accumulated over uneven batches and merged from two "processes"."""
    first, second = Moments(), Moments()
    cut = len(array) // 3
    start = 0
    for size in pieces * 100:
        if start >= cut:
            break
        first.add(array[start:min(start + size, cut)])
        start += size
    second.add(array[cut:])
    first.merge(second)
    return first.statistics("test")


@pytest.mark.parametrize("count, dim, rank", [(300, 16, None), (40, 64, None), (200, 32, 5)],
                         ids=["full-rank", "fewer-images-than-dims", "rank-5"])
def test_frechet_distance_equals_the_suite(count, dim, rank):
    samples, reference = features(0, count, dim, rank), features(1, count + 7, dim, rank, shift=0.3)
    mu1, sigma1 = moments_of(samples)
    mu2, sigma2 = moments_of(reference)
    assert np.allclose(mu1, samples.mean(0), rtol=1e-12, atol=1e-12)
    assert np.allclose(sigma1, np.cov(samples, rowvar=False), rtol=1e-10, atol=1e-10)
    expected = suite_frechet(samples.mean(0), np.cov(samples, rowvar=False), reference.mean(0),
                             np.cov(reference, rowvar=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert metrics.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=RELATIVE)


def test_frechet_distance_adds_eps_when_the_square_root_is_not_finite(monkeypatch):
    samples, reference = features(2, 50, 8), features(3, 50, 8, shift=1.0)
    mu1, sigma1, mu2, sigma2 = samples.mean(0), np.cov(samples.T), reference.mean(0), np.cov(reference.T)
    sqrtm, calls = linalg.sqrtm, []

    def first_fails(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else sqrtm(matrix)

    monkeypatch.setattr(metrics.linalg, "sqrtm", first_fails)
    with pytest.warns(UserWarning, match="singular"):
        distance = metrics.frechet_distance(mu1, sigma1, mu2, sigma2)
    offset = np.eye(8) * 1e-6
    diff = mu1 - mu2
    expected = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(
        sqrtm((sigma1 + offset) @ (sigma2 + offset)).real)
    assert distance == pytest.approx(expected, rel=RELATIVE)
    assert np.array_equal(calls[1], (sigma1 + offset) @ (sigma2 + offset))


def test_frechet_distance_rejects_other_dimensions():
    with pytest.raises(MetricError, match="differ in dimension"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


@pytest.mark.parametrize("count, split_size", [(5, 5000), (23, 7), (21, 7)])
def test_inception_score_equals_the_suite(count, split_size):
    logits = features(4, count, 12) * 2
    score = InceptionScore(split_size)
    other_process = InceptionScore(split_size)
    for start, stop in ((0, 3), (3, 10)):
        score.add(logits[start:stop], start)
    other_process.add(logits[10:], 10)
    score.merge(other_process)
    assert score.score() == pytest.approx(suite_inception_score(logits, split_size), rel=RELATIVE)


def test_inception_score_of_nothing():
    with pytest.raises(MetricError, match="no samples"):
        InceptionScore().score()


@pytest.mark.parametrize("reference_count, sample_count, dim", [(60, 45, 8), (4, 4, 3), (130, 90, 20)])
def test_precision_recall_equal_the_suite(reference_count, sample_count, dim):
    reference, samples = features(5, reference_count, dim), features(6, sample_count, dim, shift=0.4)
    expected = suite_precision_recall(reference, samples)
    assert metrics.precision_recall(reference, samples) == pytest.approx(expected, rel=RELATIVE)


def test_precision_recall_blocks_equal_one_block(monkeypatch):
    reference, samples = features(7, 50, 6), features(8, 40, 6, shift=0.2)
    whole = metrics.precision_recall(reference, samples)
    row_blocks = metrics._row_blocks
    monkeypatch.setattr(metrics, "_row_blocks", lambda rows, columns: row_blocks(rows, columns, budget=3 * columns))
    assert metrics.precision_recall(reference, samples) == whole


def test_precision_recall_needs_k_plus_one_images():
    with pytest.raises(MetricError, match="at least 4 images in each set, got 3"):
        metrics.precision_recall(features(9, 10, 4), features(10, 3, 4))


def test_moments_need_two_images():
    moments = Moments()
    moments.add(np.ones((1, 3)))
    with pytest.raises(MetricError, match="at least 2 images, got 1"):
        moments.statistics("FID")
