"""The latent shard format and its memory-mapped reader, on shards written here (no VAE needed)."""
import os

import numpy as np
import pytest
import torch

from fastdit.train import shards
from fastdit.train.shards import LatentShards

SETTINGS = {"latent_dtype": "fp32"}


def make_set(directory, counts=(5, 3, 4), shape=(4, 2, 2), latent_dtype="fp32", num_classes=7, seed=0):
    """Shards of random latents; returns the float32 arrays concatenated, as the reader should give them."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    records, whole = [], {field: [] for field in shards.FIELDS}
    for index, count in enumerate(counts):
        arrays = {"latents": rng.standard_normal((count, *shape), np.float32) * 3,
                  "flipped": rng.standard_normal((count, *shape), np.float32),
                  "labels": rng.integers(0, num_classes, count)}
        records.append(shards.write_shard(directory, index, arrays, latent_dtype, {"latent_dtype": latent_dtype}))
        for field, array in arrays.items():
            stored = shards.to_storage(array, latent_dtype) if field != "labels" else array
            whole[field].append(shards.to_float32(stored, latent_dtype) if field != "labels" else array)
    shards.write_manifest(directory, records, num_classes, {"latent_dtype": latent_dtype})
    return {field: np.concatenate(parts) for field, parts in whole.items()}


@pytest.mark.parametrize("latent_dtype", ["fp32", "fp16", "bf16"])
def test_gather_across_shards_in_any_order(tmp_path, latent_dtype):
    expected = make_set(tmp_path, latent_dtype=latent_dtype)
    data = LatentShards(tmp_path)
    assert (len(data), data.num_classes, data.latent_shape, data.latent_dtype) == (12, 7, (4, 2, 2), latent_dtype)
    indices = [11, 0, 5, 4, 4, 7, 8, 2]
    batch = data.gather(indices)
    for field in shards.FIELDS:
        np.testing.assert_array_equal(batch[field], expected[field][indices])
    assert batch["latents"].dtype == np.float32 and batch["labels"].dtype == np.int64
    latents, flipped, label = data[-1]
    np.testing.assert_array_equal(latents, expected["latents"][11])
    np.testing.assert_array_equal(flipped, expected["flipped"][11])
    assert label == expected["labels"][11]


def test_files_are_plain_npy_that_memory_map(tmp_path):
    make_set(tmp_path, latent_dtype="fp16")
    mapped = np.load(shards.field_path(tmp_path, 1, "latents"), mmap_mode="r")
    assert isinstance(mapped, np.memmap) and mapped.dtype == np.float16 and mapped.shape == (3, 4, 2, 2)
    data = LatentShards(tmp_path)
    assert all(arrays is None for arrays in data._arrays)  # opening maps nothing
    data.gather([6])
    assert [arrays is not None for arrays in data._arrays] == [False, True, False]  # nor does a gather, beyond need
    assert isinstance(data.shard(1)["flipped"], np.memmap)


def test_bf16_rounds_as_torch_does():
    values = np.concatenate([np.random.default_rng(0).standard_normal(10_000, np.float32) * 100,
                             np.float32([1 + 2 ** -8, 1 + 3 * 2 ** -8, -0.0, np.inf, -np.inf, 3.4e38])])
    expected = torch.from_numpy(values).bfloat16().view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(shards.to_storage(values, "bf16"), expected)
    np.testing.assert_array_equal(shards.to_float32(expected, "bf16"),
                                  torch.from_numpy(values).bfloat16().float().numpy())
    assert np.isnan(shards.to_float32(shards.to_storage(np.float32([np.nan]), "bf16"), "bf16")).all()


def test_manifest_records_sizes_and_checksums(tmp_path):
    make_set(tmp_path)
    manifest = shards.read_manifest(tmp_path)
    assert manifest["count"] == 12 and [shard["count"] for shard in manifest["shards"]] == [5, 3, 4]
    facts = manifest["shards"][2]["fields"]["labels"]
    path = shards.field_path(tmp_path, 2, "labels")
    assert facts["bytes"] == os.path.getsize(path) and facts["sha256"] == shards.file_sha256(path)
    assert facts["dtype"] == "<i8" and facts["shape"] == [4]
    LatentShards(tmp_path, checksums=True).verify_checksums()


def test_a_truncated_file_is_named_on_opening(tmp_path):
    make_set(tmp_path)
    path = shards.field_path(tmp_path, 1, "flipped")
    with open(path, "r+b") as file:
        file.truncate(os.path.getsize(path) - 8)
    with pytest.raises(ValueError, match=f"data: {path} holds .* bytes, its record .*re-create them with"):
        LatentShards(tmp_path)


def test_a_changed_byte_is_found_by_the_checksums(tmp_path):
    make_set(tmp_path)
    path = shards.field_path(tmp_path, 0, "latents")
    with open(path, "r+b") as file:
        file.seek(-3, os.SEEK_END)
        byte = file.read(1)
        file.seek(-3, os.SEEK_END)
        file.write(bytes([byte[0] ^ 1]))
    data = LatentShards(tmp_path)  # sizes agree: opening is cheap and does not read the files
    with pytest.raises(ValueError, match=f"data: {path}: sha256 .* differs from its record's"):
        data.verify_checksums()
    with pytest.raises(ValueError, match=f"data: {path}: sha256"):
        LatentShards(tmp_path, checksums=True)


def test_shards_of_different_encodes_are_refused(tmp_path):
    make_set(tmp_path, counts=(2,))
    make_set(tmp_path / "other", counts=(2,), shape=(4, 3, 3))
    record = shards.read_manifest(tmp_path / "other")["shards"][0]
    for field in shards.FIELDS:
        os.replace(shards.field_path(tmp_path / "other", 0, field), shards.field_path(tmp_path, 1, field))
    manifest = shards.read_manifest(tmp_path)
    records = [{**manifest["shards"][0]}, {**record, "index": 1}]
    shards.write_manifest(tmp_path, records, 7, SETTINGS)
    with pytest.raises(ValueError, match="data: shard 1 in .* holds .* shard 0 .*: shards from different encodes"):
        LatentShards(tmp_path)


def test_nonfinite_samples_are_named_by_shard_and_index(tmp_path):
    make_set(tmp_path, latent_dtype="fp16")
    data = LatentShards(tmp_path)
    data.check_finite()
    path = shards.field_path(tmp_path, 2, "flipped")
    array = np.load(path)
    array[1, 0, 1, 0] = np.nan
    array[3, 2, 0, 0] = np.inf
    np.save(path, array)  # same size: the manifest's size check passes, as after a bad encode
    data = LatentShards(tmp_path)
    assert list(data.find_nonfinite(chunk=2)) == [(path, "flipped", 1, 9), (path, "flipped", 3, 11)]
    with pytest.raises(ValueError, match=rf"data: {path}: flipped\[1\] \(sample 9\) holds a non-finite value"):
        data.check_finite()


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_old_npz_shards_are_read(tmp_path, save):
    rng = np.random.default_rng(3)
    parts = [{"latents": rng.standard_normal((n, 4, 2, 2), np.float32),
              "flipped": rng.standard_normal((n, 4, 2, 2), np.float32), "labels": rng.integers(0, 5, n)}
             for n in (3, 4)]
    for index, arrays in enumerate(parts):
        save(tmp_path / f"shard-{index:05d}.npz", **arrays)
    data = LatentShards(tmp_path)
    assert (len(data), data.latent_shape, data.num_classes) == (7, (4, 2, 2), 1 + max(int(p["labels"].max()) for p in parts))
    assert isinstance(data.shard(0)["latents"], np.memmap) == (save is np.savez)
    batch = data.gather([6, 0, 3])
    for field in shards.FIELDS:
        whole = np.concatenate([arrays[field] for arrays in parts])
        np.testing.assert_array_equal(batch[field], whole[[6, 0, 3]])
    with pytest.raises(ValueError, match="old shard-\\*.npz format, which records no checksums"):
        data.verify_checksums()


def test_empty_and_unfinished_folders(tmp_path):
    with pytest.raises(ValueError, match="data: no latent shards .manifest.json or shard-\\*.npz. in"):
        LatentShards(tmp_path)
    with pytest.raises(ValueError, match="is not a directory of latent shards"):
        LatentShards(tmp_path / "missing")
    make_set(tmp_path)
    os.remove(tmp_path / shards.MANIFEST)
    with pytest.raises(ValueError, match="holds an unfinished encode .* rerun the same `fastdit encode` command"):
        LatentShards(tmp_path)


def test_bad_indices(tmp_path):
    make_set(tmp_path)
    data = LatentShards(tmp_path)
    with pytest.raises(IndexError, match=r"must lie in \[0, 12\), got 3..12"):
        data.gather([3, 12])
    with pytest.raises(IndexError):
        data[-13]
    with pytest.raises(TypeError, match="expected an integer sample index, got float"):
        data[1.0]


def test_a_file_of_another_encode_with_this_ones_size_is_named(tmp_path):
    # fp16 (n, 4, 4, 4) and fp32 (n, 4, 4, 2) latents take the same bytes: the size check passes, the header tells.
    make_set(tmp_path / "this", counts=(3, 3), shape=(4, 4, 4), latent_dtype="fp16")
    make_set(tmp_path / "other", counts=(3,), shape=(4, 4, 2), latent_dtype="fp32")
    path = shards.field_path(tmp_path / "this", 1, "latents")
    other = shards.field_path(tmp_path / "other", 0, "latents")
    assert os.path.getsize(path) == os.path.getsize(other)
    os.replace(other, path)
    data = LatentShards(tmp_path / "this")
    data.gather([0, 1, 2])  # shard 0 is sound
    with pytest.raises(ValueError, match=rf"^data: {path} holds <f4 \(3, 4, 4, 2\), the manifest <f2 \(3, 4, 4, 4\): "
                                         "a file from a different encode; re-create them"):
        data.gather([3])
    with pytest.raises(ValueError, match=f"^data: {path}: sha256 .* differs from its record's"):
        data.verify_checksums(shards=[1])
    data.verify_checksums(shards=[0])
