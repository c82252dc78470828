"""Training reads memory-mapped latent shards through a DataLoader over step numbers: the batches equal the
in-memory reference's (the trainer's code before issue 18, written out here), with or without workers, on any
number of ranks; the release's preprocessing for pixel folders; bad data named."""
import os
import re

import numpy as np
import pytest
import torch
from test_trainer import tiny_config, train_in_process

from fastdit import distributed
from fastdit.train import data as datasets
from fastdit.train import shards
from fastdit.train.shards import LatentShards
from fastdit.train.trainer import Trainer, TrainingDiverged

SHAPE = (4, 4, 4)


def write_set(directory, counts=(7, 5, 9), latent_dtype="fp16", num_classes=5, seed=0, bad=None):
    """A shard folder of random latents (``bad``: (shard, field, row) set to NaN); returns the float32 arrays
    concatenated, as the reader hands them out."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    records, whole = [], {field: [] for field in shards.FIELDS}
    for index, count in enumerate(counts):
        arrays = {"latents": rng.standard_normal((count, *SHAPE), np.float32),
                  "flipped": rng.standard_normal((count, *SHAPE), np.float32),
                  "labels": rng.integers(0, num_classes, count)}
        if bad is not None and bad[0] == index:
            arrays[bad[1]][bad[2], 0, 1, 2] = np.nan
        records.append(shards.write_shard(directory, index, arrays, latent_dtype, {"latent_dtype": latent_dtype}))
        for field, array in arrays.items():
            whole[field].append(array if field == "labels" else shards.to_float32(shards.to_storage(array, latent_dtype),
                                                                                     latent_dtype))
    shards.write_manifest(directory, records, num_classes, {"latent_dtype": latent_dtype})
    return {field: np.concatenate(parts) for field, parts in whole.items()}


def reference_generator(seed, use, index):
    """The training streams' seeds, written out: SeedSequence over (seed, 0 for a step's draws or 1 for an
    epoch's order, the step or epoch)."""
    entropy = [seed, {"step": 0, "epoch": 1}[use], index]
    return torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]))


def reference_indices(seed, step, batch_size, size):
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    orders = {}
    for epoch in (positions // size).unique().tolist():
        orders[epoch] = torch.randperm(size, generator=reference_generator(seed, "epoch", epoch))
    return torch.stack([orders[int(position // size)][int(position % size)] for position in positions])


def reference_batch(whole, num_classes, seed, step, batch_size, dropout_prob, flip, rank=0, world_size=1):
    """The in-memory trainer's global_batch before issue 18: every sample in float32 tensors."""
    images, flipped = torch.from_numpy(whole["latents"]), torch.from_numpy(whole["flipped"])
    labels = torch.from_numpy(whole["labels"])
    generator = reference_generator(seed, "step", step)
    indices = reference_indices(seed, step, batch_size, len(images))
    x, y = images[indices], labels[indices].clone()
    flips = torch.rand(len(x), generator=generator) < 0.5
    drops = torch.rand(len(x), generator=generator) < dropout_prob
    t = torch.randint(0, 1000, (len(x),), generator=generator)
    noise = torch.randn(x.shape, generator=generator)
    if flip:
        x = torch.where(flips[:, None, None, None], flipped[indices], x)
    y[drops] = num_classes
    rows = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
    return [tensor[rows] for tensor in (x, y, t, noise)]


def test_no_two_draws_share_a_seed():
    """Every (use, index) of a run, and the same draws of the next seeds, get generators of their own (epoch e's
    order reused step e - 1's generator when both were seed * 1_000_003 plus an offset)."""
    draws = [(seed, use, index) for seed in range(4) for use in datasets.STREAMS for index in range(200)]
    first_values = {tuple(torch.randint(0, 2**62, (2,), generator=datasets.stream_generator(*draw)).tolist())
                    for draw in draws}
    assert len(first_values) == len(draws)


@pytest.mark.parametrize("batch_size, step", [(8, 0), (8, 5), (21, 3), (50, 2)])  # 21: one epoch; 50: three
def test_global_batch_indices_match_the_reference(batch_size, step):
    assert torch.equal(datasets.global_batch_indices(4, step, batch_size, 21), reference_indices(4, step, batch_size, 21))


# Workers: one case (a fork server's workers each import torch, seconds on a busy machine); rank 1 of 2 so that a
# wrong slice shows.
@pytest.mark.parametrize("latent_dtype, workers, ranks", [("fp16", 0, ((0, 1), (0, 2), (1, 2))),
                                                          ("fp32", 0, ((0, 1), (1, 2))), ("fp16", 2, ((1, 2),))])
def test_loader_batches_equal_the_in_memory_reference(tmp_path, latent_dtype, workers, ranks):
    whole = write_set(tmp_path, latent_dtype=latent_dtype)
    data = LatentShards(tmp_path)
    for rank, world_size in ranks:
        batches = datasets.StepBatches(data, 7, 8, rank, world_size, 1000, 0.3, flip=True)
        loader = datasets.batch_loader(batches, 2, 9, workers, pin_memory=False, prefetch=2)
        for step, batch in zip(range(2, 9), loader, strict=True):
            expected = reference_batch(whole, 5, 7, step, 8, 0.3, True, rank, world_size)
            for name, got, want in zip(("x", "y", "t", "noise"), batch, expected):
                assert torch.equal(got, want), f"{name} of step {step}, rank {rank} of {world_size}"


def test_old_npz_folders_are_read(tmp_path):
    rng = np.random.default_rng(1)
    whole = {"latents": rng.standard_normal((10, *SHAPE), np.float32),
             "flipped": rng.standard_normal((10, *SHAPE), np.float32), "labels": np.arange(10) % 3}
    for index, rows in enumerate((slice(0, 4), slice(4, 10))):
        np.savez(tmp_path / f"shard-{index:05d}.npz", **{name: array[rows] for name, array in whole.items()})
    batches = datasets.StepBatches(LatentShards(tmp_path), 0, 6, 0, 1, 1000, 0.1, flip=True)
    for step in range(4):
        for got, want in zip(batches[step], reference_batch(whole, 3, 0, step, 6, 0.1, True)):
            assert torch.equal(got, want)


def test_in_memory_data_without_flipped_latents_mirrors_the_images():
    images = torch.randn(6, *SHAPE)
    data = datasets.TensorData(images, torch.arange(6) % 2, 2, "test")
    x, *_ = datasets.StepBatches(data, 0, 6, 0, 1, 1000, 0.0, flip=True)[0]
    whole = {"latents": images.numpy(), "flipped": images.flip(-1).numpy(), "labels": np.arange(6) % 2}
    assert torch.equal(x, reference_batch(whole, 2, 0, 0, 6, 0.0, True)[0])


def shard_config(out, data, **overrides):
    model = {"input_size": 4, "patch_size": 2, "in_channels": 4, "hidden_size": 32, "depth": 1, "num_heads": 2,
             "num_classes": 5, "class_dropout_prob": 0.1, "learn_sigma": True}
    return tiny_config(out, data=str(data), model_config=model, **{"flip": True, **overrides})


def test_training_from_shards_with_workers_equals_without(tmp_path):
    write_set(tmp_path / "set")
    straight = train_in_process(shard_config(tmp_path / "zero", tmp_path / "set", steps=4, workers=0))
    forked = train_in_process(shard_config(tmp_path / "two", tmp_path / "set", steps=4, workers=2))
    for key, value in straight.model.state_dict().items():
        assert torch.equal(forked.model.state_dict()[key], value), key
    assert forked._batches is None  # the run stopped its workers


def test_a_bad_sample_found_by_the_scan_at_start(tmp_path):
    write_set(tmp_path / "set", bad=(1, "flipped", 3))
    path = tmp_path / "set" / "shard-00001.flipped.npy"
    with pytest.raises(ValueError, match=rf"data: {path}: flipped\[3\] \(sample 10\) holds a non-finite value"):
        Trainer(shard_config(tmp_path / "run", tmp_path / "set"), distributed.Process(0, 1, 0, torch.device("cpu"), None))


def test_the_ranks_share_the_scan(tmp_path):
    write_set(tmp_path, bad=(1, "latents", 0))
    data = LatentShards(tmp_path)
    datasets.check_finite(data, rank=0, world_size=2)  # shards 0 and 2
    with pytest.raises(ValueError, match=r"shard-00001.latents.npy: latents\[0\] \(sample 7\)"):
        datasets.check_finite(data, rank=1, world_size=2)


def test_without_the_scan_a_non_finite_loss_names_the_bad_samples(tmp_path):
    write_set(tmp_path / "set", counts=(3, 5), bad=(1, "latents", 2))  # 8 samples, batch 8: in every batch
    config = shard_config(tmp_path / "run", tmp_path / "set", check_data=False, flip=False, steps=3, workers=0)
    path = tmp_path / "set" / "shard-00001.latents.npy"
    with pytest.raises(TrainingDiverged, match=rf"the loss is not finite at step 1 \(its batch holds non-finite "
                                               rf"data: {path}: latents\[2\];"):
        train_in_process(config)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_image_folders_get_the_releases_preprocessing(tmp_path):
    from PIL import Image

    from fastdit.train.preprocess import center_crop_arr

    rng = np.random.default_rng(0)
    expected = []
    for label, size in enumerate([(70, 33), (20, 45)]):  # wider than tall and larger; taller and smaller
        os.makedirs(tmp_path / f"class{label}")
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        image.save(tmp_path / f"class{label}" / "a.png")
        expected.append(center_crop_arr(image, 16))
    (tmp_path / "class1" / "notes.txt").write_text("not an image")
    # Skipped silently, it made the run train on 5 of 6 files (issue 27): it is named instead.
    with pytest.raises(ValueError, match=r"^data: \S+/class1/notes.txt: cannot read it as an image"):
        datasets.load_image_folder(str(tmp_path), 16)
    os.remove(tmp_path / "class1" / "notes.txt")
    data = datasets.load_image_folder(str(tmp_path), 16)
    pixels = torch.from_numpy(np.stack(expected)).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(data.images, pixels)
    assert data.labels.tolist() == [0, 1] and data.num_classes == 2
    assert not hasattr(datasets, "center_crop_resize")


def test_the_cli_flags_reach_the_config():
    import argparse

    from fastdit.cli import train as cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    config = cli.config_from_args(parser.parse_args(["--out", "r", "--preset", "digits", "--workers", "3",
                                                     "--skip-data-check"]))
    assert (config.workers, config.check_data) == (3, False)
    config = cli.config_from_args(parser.parse_args(["--out", "r", "--preset", "digits"]))
    assert (config.workers, config.check_data) == (None, True)
    with pytest.raises(ValueError, match=re.escape("--workers: expected an integer in [0, 256], got -1")):
        cli.config_from_args(parser.parse_args(["--out", "r", "--preset", "digits", "--workers", "-1"]))
