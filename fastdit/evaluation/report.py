"""What `fastdit evaluate` and `fastdit sample --evaluate` run and print: an evaluation against REF on the
Inception features, or against scikit-learn's digits on the digits features (with the digits judge's accuracy)."""
import json
import os

import numpy as np

from fastdit.evaluation.pipeline import digits_reference, evaluate
from fastdit.evaluation.extractors import digits_features, load_inception
from fastdit.evaluation.inputs import open_reference
from fastdit.io import write_text_atomic
from fastdit.digits import conditioned_class_accuracy

DIGITS = "digits"  # REF's name for the digits reference (`--evaluate digits`, `fastdit evaluate --digits`)
_NAMES = {"inception_score": "Inception Score", "fid": "FID", "sfid": "sFID", "precision": "Precision",
          "recall": "Recall", "accuracy": "Accuracy (digits SVC)"}


def _accuracy(samples_path) -> float | None:
    """The digits judge's accuracy, when SAMPLES is an .npz with one label per image."""
    path = os.path.join(samples_path, "samples.npz") if os.path.isdir(samples_path) else samples_path
    if not os.path.isfile(path):
        return None
    with np.load(path, allow_pickle=False) as samples:
        if "labels" not in samples.files:
            return None
        images = samples["arr_0" if "arr_0" in samples.files else "images"]
        return conditioned_class_accuracy(images, samples["labels"])


def check_evaluation(ref, inception=None) -> None:
    """What can fail before samples exist (`fastdit sample --evaluate`): REF readable, the Inception file there."""
    if ref != DIGITS:
        open_reference(ref)
        load_inception(inception)


def run_evaluation(samples_path, ref, process, inception=None, out=None, **options) -> dict | None:
    """Evaluate, print the report and write it to ``out`` as JSON (rank 0; other ranks return None)."""
    if ref == DIGITS:
        extractor, ref_path = digits_features(), digits_reference()
    else:
        extractor, ref_path = load_inception(inception), ref
    report = evaluate(samples_path, ref_path, extractor.to(process.device), process, **options)
    if report is None:
        return None
    if ref == DIGITS:
        report["accuracy"] = _accuracy(samples_path)
    features = "" if extractor.name == "inception" else f" ({extractor.name} features)"
    for key, name in _NAMES.items():
        if report.get(key) is not None:
            value = f"{report[key]:.1%}" if key == "accuracy" else f"{report[key]:.4f}"
            print(f"{name}{'' if key == 'accuracy' else features}: {value}")
    print(f"({report['count']} samples against {ref_path})")
    if out:
        write_text_atomic(out, json.dumps(report, indent=2) + "\n")
    return report
