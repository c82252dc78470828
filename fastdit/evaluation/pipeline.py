"""One evaluation: SAMPLES against REF in one extractor's feature space, as the ADM suite reports it.

- SAMPLES' features go through resumable shards in a work folder beside them (``features.extract``).
- REF's precomputed statistics (mu, sigma; mu_s, sigma_s) are used as they are. Its images' features and the
  statistics fastdit computes from them are cached beside REF in ``.<name>.<extractor>-<REF sha256>-<extractor
  sha256>.npz`` (in ``cache_dir()``/reference-statistics when REF's folder is read-only), so a second evaluation
  against the same REF does not run the network on it again.
- Everything that can be checked before the network runs is checked first (images, resolutions, counts), and the
  report is written atomically at the end: a failure leaves no report and no half-written file.
"""
import hashlib
import os

import numpy as np

from fastdit.evaluation import features as feature_shards
from fastdit.evaluation.extractors import cache_dir, digit_images, sha256_of
from fastdit.evaluation.inputs import ImageSource, InputError, open_images, open_reference
from fastdit.evaluation.metrics import NEIGHBOURHOOD, frechet_distance, precision_recall
from fastdit.io import write_npz_streamed
from fastdit.distributed import broadcast_from_main

DIGITS_REFERENCE = "digits-reference.npz"


def work_folder(path, extractor) -> str:
    parent, name = os.path.split(os.path.abspath(path).rstrip(os.sep))
    return os.path.join(parent, f".{name}.features-{extractor.name}")


def digits_reference() -> str:
    """scikit-learn's digits as a reference batch in ``cache_dir()`` (arr_0: uint8 8x8 images, labels), written at
    first use, so that --digits runs on the same code path as any REF."""
    path = os.path.join(cache_dir(), DIGITS_REFERENCE)
    if not os.path.isfile(path):
        images, labels = digit_images()
        os.makedirs(cache_dir(), exist_ok=True)
        write_npz_streamed(path, {"arr_0": images, "labels": labels})
    return path


def _check_inputs(samples: ImageSource, reference: ImageSource | None, extractor, ref_path) -> None:
    for what, source in (("SAMPLES", samples), ("REF", reference)):
        if source is not None and source.channels != extractor.channels:
            raise InputError(f"{what} {source.description}: {source.channels}-channel images; the {extractor.name} "
                             f"features take {extractor.channels}-channel ones")
    if reference is not None and extractor.same_resolution and samples.resolution != reference.resolution:
        raise InputError(f"SAMPLES and REF differ in resolution: {samples.resolution[0]}x{samples.resolution[1]} "
                         f"({samples.description}) and {reference.resolution[0]}x{reference.resolution[1]} "
                         f"({ref_path}); compare images of one resolution")
    least = NEIGHBOURHOOD + 1  # the most any metric needs: precision/recall's k-NN; covariances need 2
    for what, source in (("SAMPLES", samples), ("REF", reference)):
        if source is not None and len(source) < least:
            raise InputError(f"{what} {source.description}: {len(source)} images; precision/recall (k-NN with k = "
                             f"{NEIGHBOURHOOD}) needs at least {least}")


def _cache_paths(ref_path, extractor) -> list[str]:
    ref_digest = sha256_of(ref_path)[:16]
    extractor_digest = hashlib.sha256(extractor.identity.encode()).hexdigest()[:16]
    parent, name = os.path.split(os.path.abspath(ref_path))
    file = f".{name}.{extractor.name}-{ref_digest}-{extractor_digest}.npz"
    return [os.path.join(parent, file), os.path.join(cache_dir(), "reference-statistics", file)]


def _read_cache(paths) -> dict | None:
    for path in paths:
        try:
            with np.load(path, allow_pickle=False) as cached:
                if "pool_features" in cached.files:
                    return {name: cached[name] for name in cached.files}
        except (OSError, ValueError, EOFError):
            continue
    return None


def _write_cache(paths, arrays) -> None:
    for path in paths:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_npz_streamed(path, arrays)
            return
        except OSError:
            continue


def reference_statistics(ref_path, images, statistics, extractor, process, **extraction) -> dict | None:
    """REF's pool features and statistics (rank 0; None elsewhere): cached, else extracted and cached."""
    if images is None:
        return dict(statistics)
    paths = _cache_paths(ref_path, extractor) if process.is_main else []
    cached = _read_cache(paths) if process.is_main else None
    if not broadcast_from_main(cached is not None, process):
        summary = feature_shards.extract(images, extractor, work_folder(ref_path, extractor), process, **extraction)
        if process.is_main:
            cached = {"pool_features": summary.pool}
            for name, suffix in (("pool", ""), ("spatial", "_s")):
                if name in summary.moments:
                    cached["mu" + suffix], cached["sigma" + suffix] = summary.moments[name].statistics(f"REF ({name})")
            _write_cache(paths, cached)
    return {**cached, **statistics} if process.is_main else None


def _frechet(summary, reference, name, suffix):
    if name not in summary.moments or "mu" + suffix not in reference:
        return None
    mu, sigma = summary.moments[name].statistics(f"SAMPLES ({name})")
    return frechet_distance(mu, sigma, reference["mu" + suffix], reference["sigma" + suffix])


def evaluate(samples_path, ref_path, extractor, process, batch_size=64, workers=2, restart=False,
             chunk_size=feature_shards.CHUNK) -> dict | None:
    """The report (rank 0; None on other ranks): count, Inception Score, FID, sFID, precision, recall (None where
    the extractor or REF lacks what a metric needs)."""
    samples = open_images(samples_path, "SAMPLES")
    reference, statistics = open_reference(ref_path)
    _check_inputs(samples, reference, extractor, ref_path)
    extraction = {"batch_size": batch_size, "workers": workers, "restart": restart, "chunk_size": chunk_size}
    ref = reference_statistics(ref_path, reference, statistics, extractor, process, **extraction)
    summary = feature_shards.extract(samples, extractor, work_folder(samples_path, extractor), process, **extraction)
    if not process.is_main:
        return None
    precision = recall = None
    if "pool_features" in ref:
        precision, recall = precision_recall(ref["pool_features"], summary.pool, device=process.device)
    return {
        "samples": os.path.abspath(samples_path), "reference": os.path.abspath(ref_path),
        "features": extractor.identity, "count": summary.count,
        "inception_score": summary.inception_score.score() if summary.inception_score else None,
        "fid": _frechet(summary, ref, "pool", ""), "sfid": _frechet(summary, ref, "spatial", "_s"),
        "precision": precision, "recall": recall,
    }

