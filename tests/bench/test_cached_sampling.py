"""`fastdit bench --cache`: the rows "cached vs exact sampling", checked against exact sampling from the same noise."""
import argparse
import json
import math

import pytest
import torch

from fastdit.bench import workloads
from fastdit.bench.workloads import Inputs, ModelSet, cached_sampling_run, latent_psnr
from fastdit.cli import bench
from fastdit.diffusion import caching
from fastdit.diffusion.sampling import sample
from fastdit.models.parity import relative_max_error

STEPS = 4  # enough for every static default to skip some steps: fora runs 2 of 4, taylorseer 1 of 4
TINY = ["--device", "cpu", "--models", "DiT-S/8", "--image-size", "64", "--batch-sizes", "2", "--repeats", "1",
        "--warmup", "0", "--no-progress", "--workloads", "forward", "--implementations", "fastdit-eager",
        "--cache-steps", str(STEPS), "--cache-repeats", "1"]


def run_bench(out, *arguments):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return bench.run(parser.parse_args(["--out", str(out), *arguments]))


@pytest.fixture(scope="module")
def tiny():
    models = ModelSet("DiT-S/8", 8, torch.float32, "cpu")
    return models, Inputs.draw(2, models.reference, torch.device("cpu"))


@pytest.mark.parametrize("method", [None, *caching.METHODS])
def test_a_cached_run_is_sample_with_that_cache_and_counts_its_blocks(tiny, method):
    models, inputs = tiny
    model = models.model("fastdit-eager")
    run = cached_sampling_run(models, "fastdit-eager", inputs, method, STEPS)
    counts = []
    hooks = [block.register_forward_hook(lambda *_: counts.append(1)) for block in model.blocks]
    try:
        output = run.run()
    finally:
        for hook in hooks:
            hook.remove()
    expected = sample(model, inputs.y, sampler="ddim", steps=STEPS, cfg_scale=workloads.CFG_SCALE, seed=0,
                      cache=method)
    assert torch.equal(output, expected)
    assert run.blocks_per_image() == len(counts)  # the plan's count, or fbcache's hooks, equal the blocks run
    assert run.images == 2


def test_a_cached_run_refuses_a_reference_implementation(tiny):
    with pytest.raises(ValueError, match="implementation: expected one of fastdit-eager, fastdit-compiled, "
                                         "fastdit-cudagraphs for a cached sampling run, got 'reference-eager-fp32'"):
        cached_sampling_run(tiny[0], "reference-eager-fp32", tiny[1], "fora", STEPS)


def test_latent_psnr_peaks_at_the_exact_latents_range():
    expected = torch.tensor([0.0, 1.0, 2.0, 4.0])
    actual = expected + torch.tensor([0.0, 0.2, 0.0, 0.0])
    assert latent_psnr(actual, expected) == pytest.approx(10 * math.log10(4.0**2 / (0.04 / 4)))
    assert latent_psnr(expected, expected) == math.inf


def test_bench_rows_against_exact_sampling_in_the_same_run(tmp_path, monkeypatch):
    created = []  # the bench's models: their weights start from torch's global generator

    def kept(*args, **kwargs):
        created.append(ModelSet(*args, **kwargs))
        return created[-1]

    monkeypatch.setattr(bench, "ModelSet", kept)
    out = tmp_path / "report"
    assert run_bench(out, *TINY, "--cache", "fora", "taylorseer", "fbcache") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["cache"] == {"methods": ["fora", "taylorseer", "fbcache"], "steps": STEPS,
                                           "repeats": 1, "min_psnr": 20.0, "sampler": "ddim",
                                           "implementations": ["fastdit-eager"]}
    rows = {row["cache"]: row for row in report["cache_results"]}
    assert list(rows) == ["exact", "fora", "taylorseer", "fbcache"]
    assert {row["status"] for row in rows.values()} == {"ok"}
    (models,) = created
    model, inputs = models.model("fastdit-eager"), Inputs.draw(2, models.reference, torch.device("cpu"))
    depth = len(model.blocks)
    exact = sample(model, inputs.y, sampler="ddim", steps=STEPS, cfg_scale=workloads.CFG_SCALE, seed=0)
    assert rows["exact"]["blocks_per_image"]["value"] == STEPS * depth and "time_ratio" not in rows["exact"]
    for method in ("fora", "taylorseer"):
        row = rows[method]
        assert row["blocks_per_image"]["value"] == caching.block_evaluations(caching.resolve(method), STEPS, depth)
        assert row["block_ratio"]["value"] < 1
        cached = sample(model, inputs.y, sampler="ddim", steps=STEPS, cfg_scale=workloads.CFG_SCALE, seed=0,
                        cache=method)
        assert row["max_error"]["value"] == pytest.approx(relative_max_error(cached, exact))
        assert 20 <= row["psnr"]["value"] == pytest.approx(latent_psnr(cached, exact))
        assert row["time_ratio"]["value"] == pytest.approx(row["time"]["value"] / rows["exact"]["time"]["value"])
    markdown = (out / "report.md").read_text()
    assert "## cached vs exact sampling" in markdown
    assert f"| DiT-S/8 | 2 | fastdit-eager | taylorseer | {rows['taylorseer']['blocks_per_image']['value']} |" in markdown


def test_a_cache_far_from_exact_fails_its_row_untimed(tmp_path, monkeypatch, capsys):
    """A deliberately broken cache (its samples shifted by their range) fails the PSNR check and is never timed."""
    correct, timed = workloads.cached_sampling_run, []

    def broken(models, implementation, inputs, cache, steps):
        run = correct(models, implementation, inputs, cache, steps)
        if cache == "fora":
            real_run = run.run
            calls = []

            def shifted():
                calls.append(1)
                if len(calls) > 1:
                    timed.append(1)
                latents = real_run()
                return latents + (latents.max() - latents.min())

            run.run = shifted
        return run

    monkeypatch.setattr(bench, "cached_sampling_run", broken)
    out = tmp_path / "report"
    assert run_bench(out, *TINY, "--cache", "fora", "taylorseer") == 1
    rows = json.loads((out / "report.json").read_text())["cache_results"]
    assert [(row["cache"], row["status"]) for row in rows] == [
        ("exact", "ok"), ("fora", "parity-failed"), ("taylorseer", "ok")]
    assert "below --cache-min-psnr 20" in rows[1]["reason"] and "time" not in rows[1]
    assert not timed
    assert "cached sampling (fora) fastdit-eager: fora sampling is" in capsys.readouterr().err


def test_fbcache_under_cuda_graphs_is_skipped_with_its_reason(tiny, monkeypatch):
    settings = {"device": torch.device("cpu"), "cache": {"methods": ["fbcache", "fora"], "steps": STEPS,
                                                         "repeats": 1, "min_psnr": 20.0, "sampler": "ddim"}}
    rows = bench._measure_cached(*tiny, "fastdit-cudagraphs", settings)
    assert {(row["status"], row["reason"]) for row in rows} == {("skipped", "CUDA graphs need a CUDA device")}
    # As on a GPU: fbcache is skipped for its host decision; here the others fail (sample refuses CUDA graphs
    # on the CPU), and fora, without its baseline, is not run.
    monkeypatch.setattr(bench, "unavailable_reason", lambda *args, **kwargs: None)
    rows = bench._measure_cached(*tiny, "fastdit-cudagraphs", settings)
    assert [(row["cache"], row["status"]) for row in rows] == [
        ("exact", "error"), ("fbcache", "skipped"), ("fora", "error")]
    assert rows[1]["reason"].startswith("fbcache decides each step on the host, so it runs without CUDA graphs")
    assert rows[2]["reason"] == "exact sampling, the check's baseline, did not run"


@pytest.mark.parametrize("arguments, message", [
    (["--cache-steps", "0"], "--cache-steps and --cache-repeats: expected >= 1"),
    (["--cache-repeats", "0"], "--cache-steps and --cache-repeats: expected >= 1"),
    (["--cache-min-psnr", "nan"], "--cache-min-psnr finite, got 50, 3 and nan"),
])
def test_bad_cache_arguments_name_the_option(tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        run_bench(tmp_path, "--device", "cpu", "--cache", "fora", *arguments)
