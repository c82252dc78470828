"""Sample quality as the ADM evaluation suite measures it: FID, sFID, Inception Score, precision and recall
(``evaluate``), on the Inception features (torch-fidelity's port of FID's TF Inception) or on a small digits
classifier's (``digits_features``), streamed from disk, split over torchrun ranks and resumable.

It stands above the models and the shared io: it reads sample files, never the sampler.
"""
from fastdit.evaluation.pipeline import digits_reference, evaluate
from fastdit.evaluation.extractors import digits_features, load_inception
from fastdit.evaluation.inputs import InputError
from fastdit.evaluation.metrics import MetricError, frechet_distance, precision_recall

__all__ = ["InputError", "MetricError", "digits_features", "digits_reference", "evaluate", "frechet_distance",
           "load_inception", "precision_recall"]
