"""fastdit.evaluation end to end on a tiny extractor: the metrics of the whole feature set, inputs read in place,
resume from shards, the reference cache, and every bad input in one line before any network runs."""
import os

import numpy as np
import pytest
import torch
from evaluation_data import TinyFeatures, random_images, write_samples

from fastdit.evaluation import pipeline as evaluation
from fastdit.evaluation import features as shards
from fastdit.evaluation.inputs import InputError
from fastdit.evaluation.metrics import InceptionScore, frechet_distance, precision_recall


def direct_report(samples, reference, extractor):
    """The report from every image's features at once, numpy's mean and covariance."""
    with torch.no_grad():
        ours, theirs = extractor(torch.from_numpy(samples)), extractor(torch.from_numpy(reference))
    fid = {name: frechet_distance(ours[name].double().mean(0).numpy(), np.cov(ours[name].double().numpy().T),
                                  theirs[name].double().mean(0).numpy(), np.cov(theirs[name].double().numpy().T))
           for name in ("pool", "spatial")}
    score = InceptionScore()
    score.add(ours["logits"].numpy(), 0)
    precision, recall = precision_recall(theirs["pool"].numpy(), ours["pool"].numpy())
    return {"fid": fid["pool"], "sfid": fid["spatial"], "inception_score": score.score(), "precision": precision,
            "recall": recall}


@pytest.fixture
def pair(tmp_path):
    samples, reference = random_images(0, 37), random_images(1, 29)
    return samples, reference, write_samples(tmp_path / "samples.npz", samples), write_samples(tmp_path / "ref.npz",
                                                                                                 reference)


def test_the_report_equals_the_metrics_of_all_features(pair, process):
    samples, reference, samples_path, ref_path = pair
    report = evaluation.evaluate(samples_path, ref_path, TinyFeatures(), process, batch_size=5, workers=0,
                                 chunk_size=8)
    expected = direct_report(samples, reference, TinyFeatures())
    assert report["count"] == 37
    for name, value in expected.items():
        assert report[name] == pytest.approx(value, rel=1e-6), name
    assert not os.path.exists(evaluation.work_folder(samples_path, TinyFeatures()))  # shards removed when done


def test_workers_batches_and_folders_change_nothing(pair, process, tmp_path):
    samples, _, samples_path, ref_path = pair
    first = evaluation.evaluate(samples_path, ref_path, TinyFeatures(), process, batch_size=64, workers=0)
    folder = tmp_path / "run" / "batches"
    folder.mkdir(parents=True)
    for start in range(0, 37, 10):
        np.save(folder / f"{start:07d}.npy", samples[start:start + 10])
    second = evaluation.evaluate(str(folder.parent), ref_path, TinyFeatures(), process, batch_size=3, workers=2,
                                 chunk_size=7)
    # float32 features of different batch sizes differ in rounding (a convolution's blocking depends on the batch)
    assert {key: second[key] for key in ("fid", "sfid", "inception_score", "precision", "recall")} == pytest.approx(
        {key: first[key] for key in ("fid", "sfid", "inception_score", "precision", "recall")}, rel=1e-6)


class Killed(Exception):
    pass


def test_a_killed_extraction_resumes_from_its_finished_shards(pair, process, monkeypatch):
    _, _, samples_path, ref_path = pair
    whole = evaluation.evaluate(samples_path, ref_path, TinyFeatures(), process, batch_size=4, workers=0,
                                chunk_size=8)
    extractor = TinyFeatures()
    forward = extractor.forward

    def dies_on_the_fourth_batch(images):
        if extractor.calls == 3:
            raise Killed
        return forward(images)

    monkeypatch.setattr(extractor, "forward", dies_on_the_fourth_batch)
    with pytest.raises(Killed):
        evaluation.evaluate(samples_path, ref_path, extractor, process, batch_size=4, workers=0, chunk_size=8)
    folder = evaluation.work_folder(samples_path, extractor)
    assert sorted(name for name in os.listdir(folder) if name.endswith(".npz")) == ["0000000.npz"]
    monkeypatch.undo()
    resumed = TinyFeatures()
    report = evaluation.evaluate(samples_path, ref_path, resumed, process, batch_size=4, workers=0, chunk_size=8)
    assert resumed.calls == 8  # 37 images in chunks of 8 by batches of 4: 10 batches, 2 of them done before the kill
    assert report == whole


def test_shards_of_other_inputs_are_refused(pair, process, monkeypatch, tmp_path):
    samples, _, samples_path, ref_path = pair
    folder = evaluation.work_folder(samples_path, TinyFeatures())
    os.makedirs(folder)
    extractor = TinyFeatures()
    shards._extract_mine(evaluation.open_images(samples_path, "SAMPLES"), extractor, folder, process, 4, 0, 8)
    write_samples(samples_path, random_images(5, 37))  # the same path, other images
    with pytest.raises(InputError, match=r"0000000.npz came from other inputs \(its images differ .*--restart"):
        evaluation.evaluate(samples_path, ref_path, TinyFeatures(), process, workers=0, chunk_size=8)
    assert evaluation.evaluate(samples_path, ref_path, TinyFeatures(), process, workers=0, chunk_size=8,
                               restart=True)["count"] == 37


def test_reference_statistics_are_cached_beside_ref(pair, process):
    _, _, samples_path, ref_path = pair
    first = evaluation.evaluate(samples_path, ref_path, TinyFeatures(), process, workers=0)
    cached = [name for name in os.listdir(os.path.dirname(ref_path)) if name.startswith(".ref.npz.tiny-")]
    assert len(cached) == 1
    extractor = TinyFeatures()
    assert evaluation.evaluate(samples_path, ref_path, extractor, process, workers=0) == first
    assert extractor.calls == 1  # the samples' one batch: REF came from the cache
    other = TinyFeatures(seed=1)  # another network: its own cache entry
    evaluation.evaluate(samples_path, ref_path, other, process, workers=0)
    assert other.calls == 2


def test_precomputed_reference_statistics_are_used_as_they_are(pair, process, tmp_path):
    samples, _, samples_path, _ = pair
    generator = np.random.default_rng(3)
    mu, factor = generator.standard_normal(6), generator.standard_normal((6, 6))
    ref_path = write_samples(tmp_path / "stats.npz", random_images(4, 5), mu=mu, sigma=factor @ factor.T)
    report = evaluation.evaluate(samples_path, ref_path, TinyFeatures(), process, workers=0)
    with torch.no_grad():
        pool = TinyFeatures()(torch.from_numpy(samples))["pool"].double().numpy()
    assert report["fid"] == pytest.approx(frechet_distance(pool.mean(0), np.cov(pool.T), mu, factor @ factor.T),
                                          rel=1e-9)
    stats_only = tmp_path / "stats-only.npz"
    np.savez(stats_only, mu=mu, sigma=factor @ factor.T)
    report = evaluation.evaluate(samples_path, str(stats_only), TinyFeatures(), process, workers=0)
    assert report["precision"] is None and report["sfid"] is None and report["fid"] is not None


def bad_inputs(tmp_path, samples_path):
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(open(samples_path, "rb").read()[:5000])
    np.savez(tmp_path / "empty.npz", labels=np.arange(3))
    write_samples(tmp_path / "small.npz", random_images(6, 9, size=16))
    write_samples(tmp_path / "three.npz", random_images(7, 3))
    write_samples(tmp_path / "grey.npz", random_images(8, 9, channels=1))
    (tmp_path / "text.npz").write_text("not an archive")
    return [
        (samples_path, tmp_path / "small.npz", r"SAMPLES and REF differ in resolution: 8x8 .* and 16x16"),
        (samples_path, tmp_path / "empty.npz", r"holds neither images \(arr_0 or images\) nor statistics"),
        (samples_path, truncated, r"truncated.npz: (cannot read it|not a NumPy|images is truncated|arr_0 is trunc)"),
        (truncated, samples_path, r"truncated.npz: (cannot read it|not a NumPy|.* is truncated)"),
        (samples_path, tmp_path / "text.npz", r"text.npz: not a NumPy .npz archive"),
        (tmp_path / "three.npz", samples_path, r"3 images; precision/recall \(k-NN with k = 3\) needs at least 4"),
        (tmp_path / "grey.npz", samples_path, r"1-channel images; the tiny features take 3-channel ones"),
        (tmp_path / "missing.npz", samples_path, r"missing.npz: no such file"),
    ]


def test_bad_inputs_are_one_line_before_any_work(pair, process, tmp_path):
    _, _, samples_path, _ = pair
    for samples, reference, message in bad_inputs(tmp_path, samples_path):
        extractor = TinyFeatures()
        with pytest.raises(InputError, match=message) as raised:
            evaluation.evaluate(str(samples), str(reference), extractor, process, workers=0)
        assert "\n" not in str(raised.value) and extractor.calls == 0
        assert not [name for name in os.listdir(tmp_path) if ".features-" in name or ".tiny-" in name]
