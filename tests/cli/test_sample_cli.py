"""`fastdit sample` end to end on tiny checkpoints: outputs, reproducibility, and bad input (exit 2, one
stderr line, nothing written). Runs in-process through ``fastdit.cli.main``, except where the real exit
code and stderr of the console script are the point."""
import io
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from parity import save_tiny_checkpoint
from PIL import Image
from processes import torch_path_environment

import fastdit
import fastdit.io
from fastdit import images
from fastdit.cli import options
from fastdit.cli import sample as sample_cli
from fastdit.diffusion import caching
from fastdit.diffusion.sampling import sample
from fastdit.digits import conditioned_class_accuracy

NUM_CLASSES = 10
FAST = ["--sampler", "ddim", "--steps", "2", "--no-progress"]


@pytest.fixture(scope="module")
def latent_ckpt(tmp_path_factory):
    """Latent model: 4x4 latents of 32x32 images."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "latent.pt", in_channels=4, input_size=4,
                                patch_size=2)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    autoencoder = diffusers.AutoencoderKL(  # four blocks: latents at 1/8 of the image size, as DiT's VAE
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    path = tmp_path_factory.mktemp("vae")
    autoencoder.save_pretrained(path)
    return str(path)


def npz(directory):
    with np.load(os.path.join(directory, "samples.npz")) as data:
        return dict(data)


def assert_no_temporary_files(directory):
    for root, _, names in os.walk(directory):
        leftovers = [name for name in names if name.startswith(".") or name.endswith(".tmp")]
        assert not leftovers, (root, leftovers)


def test_pixel_model_end_to_end(pixel_ckpt, tmp_path, run_cli):
    out = tmp_path / "out"
    code, err = run_cli(["sample", "--ckpt", pixel_ckpt, "--classes", "1", "2", "3", "--num-per-class", "2",
                         "--batch-size", "4", "--save-images", "--out", str(out), *FAST])
    assert (code, err) == (0, [])
    assert sorted(os.listdir(out)) == ["grid.png", "images", "run.json", "samples.npz"]
    assert_no_temporary_files(out)

    data = npz(out)
    assert sorted(data) == ["arr_0", "labels"]  # the images once, under the ADM evaluator's name
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (6, 8, 8, 3)
    assert data["labels"].dtype == np.int64 and data["labels"].tolist() == [1, 1, 2, 2, 3, 3]
    assert data["arr_0"].std() > 10  # perturbed weights: real samples, not a constant

    # The images are the library's samples, mapped to uint8.
    model = fastdit.load(pixel_ckpt)
    latents = sample(model, torch.tensor(data["labels"]), sampler="ddim", steps=2, cfg_scale=4.0,
                     guidance_channels=None, seed=0)
    np.testing.assert_array_equal(data["arr_0"], images.to_uint8(latents))

    names = sorted(os.listdir(out / "images"))
    assert names == [f"{k:06d}_class{label}.png" for k, label in enumerate(data["labels"])]
    for name, image in zip(names, data["arr_0"]):
        np.testing.assert_array_equal(np.asarray(Image.open(out / "images" / name)), image)
    grid = np.asarray(Image.open(out / "grid.png"))
    pad, tile = images.GRID_PADDING, images.PREVIEW_MIN_TILE  # 8 px images enlarged 8x
    assert grid.shape == (3 * (tile + pad) + pad, 2 * (tile + pad) + pad, 3)  # a row per class
    enlarged = data["arr_0"][1].repeat(8, axis=0).repeat(8, axis=1)
    np.testing.assert_array_equal(grid[pad:pad + tile, 2 * pad + tile:2 * pad + 2 * tile][20:], enlarged[20:])

    record = json.loads((out / "run.json").read_text())
    assert {"command", "arguments", "model", "vae", "sampling", "outputs", "versions", "timings"} <= set(record)
    assert record["model"]["weights"] == "checkpoint"
    assert record["model"]["config"]["in_channels"] == 3 and record["model"]["samples"] == "pixels"
    assert record["sampling"] | {"steps": 2, "sampler": "ddim", "seed": 0, "world_size": 1, "num_samples": 6} \
        == record["sampling"]
    assert record["outputs"]["samples.npz"] == ["arr_0", "labels"] and record["outputs"]["images"] == 6
    assert {"torch", "numpy", "pillow", "fastdit"} <= set(record["versions"])
    timings = record["timings"]
    assert timings["total_seconds"] >= timings["sampling_seconds"] > 0 and timings["images_per_second"] > 0


def test_same_seed_same_images_whatever_the_batch_size(pixel_ckpt, tmp_path, run_cli):
    def images_of(name, *extra):
        code, _ = run_cli(["sample", "--ckpt", pixel_ckpt, "--out", str(tmp_path / name), *FAST, *extra])
        assert code == 0
        return npz(tmp_path / name)

    whole, in_ones = images_of("a", "--num-samples", "3"), images_of("b", "--num-samples", "3", "--batch-size", "1")
    other_seed = images_of("c", "--num-samples", "3", "--seed", "1")
    np.testing.assert_array_equal(whole["arr_0"], in_ones["arr_0"])
    np.testing.assert_array_equal(whole["labels"], in_ones["labels"])
    assert whole["labels"].min() >= 0 and whole["labels"].max() < NUM_CLASSES  # random classes from the seed
    assert not np.array_equal(whole["arr_0"], other_seed["arr_0"])


@pytest.mark.parametrize("flags, options", [
    (["--sampler", "ddim", "--ddim-spacing", "trailing", "--guidance-channels", "2"],
     dict(sampler="ddim", spacing="trailing", guidance_channels=2)),
    (["--sampler", "dpm++", "--dpm-final", "zero"], dict(sampler="dpm++", final="zero")),
    (["--sampler", "ddim", "--cache", "taylorseer", "--cache-interval", "2", "--cache-order", "2"],
     dict(sampler="ddim", cache=caching.TaylorSeer(interval=2, order=2))),
])
def test_sampler_conventions_and_cache_flags_are_the_librarys(pixel_ckpt, tmp_path, run_cli, flags, options):
    out = tmp_path / "out"
    code, err = run_cli(["sample", "--ckpt", pixel_ckpt, "--classes", "1", "2", "--steps", "4", "--no-progress",
                         "--out", str(out), *flags])
    assert (code, err) == (0, [])
    latents = sample(fastdit.load(pixel_ckpt), torch.tensor([1, 2]), steps=4, cfg_scale=4.0, seed=0, **options)
    np.testing.assert_array_equal(npz(out)["arr_0"], images.to_uint8(latents))
    recorded = json.loads((out / "run.json").read_text())["sampling"]
    for name, value in options.items():
        expected = value if name != "cache" else {"method": "taylorseer", "interval": 2, "order": 2, "warmup": 0}
        assert recorded[name] == expected, name


def test_latent_model_with_vae_writes_decoded_images(latent_ckpt, vae_dir, tmp_path, run_cli):
    out = tmp_path / "out"
    code, err = run_cli(["sample", "--ckpt", latent_ckpt, "--vae", vae_dir, "--classes", "4", "7", "--out", str(out),
                         *FAST])
    assert code == 0, err
    data = npz(out)
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (2, 32, 32, 3)
    assert json.loads((out / "run.json").read_text())["vae"]["scale"] == pytest.approx(0.18215)
    grid = np.asarray(Image.open(out / "grid.png"))
    unlabelled = images.grid(data["arr_0"])
    assert grid.shape == unlabelled.shape and not np.array_equal(grid, unlabelled)  # 32 px tiles carry class ids


def test_latent_model_without_vae_writes_latents(tmp_path, run_cli):
    """--model: random weights, which run.json and a warning say; no VAE: latents only, with a note."""
    out = tmp_path / "out"
    code, err = run_cli(["sample", "--model", "DiT-S/8", "--image-size", "64", "--num-samples", "2",
                         "--out", str(out), *FAST, "--steps", "1"])
    assert code == 0
    assert len(err) == 2 and all(line.startswith("fastdit sample: warning:") for line in err)
    assert "random weights" in err[0] and "no --vae" in err[1]
    assert sorted(os.listdir(out)) == ["run.json", "samples.npz"]
    data = npz(out)
    assert sorted(data) == ["labels", "latents"]
    assert data["latents"].dtype == np.float32 and data["latents"].shape == (2, 4, 8, 8)
    record = json.loads((out / "run.json").read_text())
    assert record["model"]["weights"] == "random init" and record["model"]["name"] == "DiT-S/8"


BAD_INPUT = [  # (case, argv from the fixture's paths, what the one stderr line says)
    ("class id too large", lambda p: [*p.ckpt, "--classes", "3", str(NUM_CLASSES)], "class ids must be in [0, 9]"),
    ("negative class id", lambda p: [*p.ckpt, "--classes", "-1"], "class ids must be in [0, 9]"),
    ("unknown sampler", lambda p: [*p.ckpt, "--sampler", "euler"], "invalid choice: 'euler'"),
    ("unknown model", lambda p: ["--model", "DiT-XXL/2"], "--model: unknown model 'DiT-XXL/2'; expected one of"),
    ("zero steps", lambda p: [*p.ckpt, "--steps", "0"], "--steps: expected an integer in [1, 1000], got 0"),
    ("negative cfg scale", lambda p: [*p.ckpt, "--cfg-scale", "-1"], "--cfg-scale: expected a finite number >= 0"),
    ("zero batch size", lambda p: [*p.ckpt, "--batch-size", "0"], "--batch-size: expected an integer in [1, 65536], got 0"),
    ("missing checkpoint", lambda p: ["--ckpt", p.missing], "checkpoint not found"),
    ("corrupt checkpoint", lambda p: ["--ckpt", p.corrupt], "cannot read checkpoint"),
    ("image size vs checkpoint", lambda p: [*p.ckpt, "--image-size", "16"], "this model makes 8 px images"),
    ("image size vs model", lambda p: ["--model", "DiT-S/8", "--image-size", "100"], "a multiple of 64 px"),
    ("unwritable out", lambda p: [*p.ckpt, "--out", p.under_a_file], "is a file"),
    ("model and ckpt", lambda p: [*p.ckpt, "--model", "DiT-S/2"], "not allowed with argument"),
    ("vae for a pixel model", lambda p: [*p.ckpt, "--vae", p.missing], "--vae: this model samples pixels"),
    ("per class without classes", lambda p: [*p.ckpt, "--num-per-class", "2"], "--num-per-class: needs --classes"),
    ("bad integer", lambda p: [*p.ckpt, "--steps", "ten"], "invalid int value: 'ten'"),
    ("spacing for ddpm", lambda p: [*p.ckpt, "--sampler", "ddpm", "--ddim-spacing", "leading"],
     "--ddim-spacing leading: applies to --sampler ddim, got --sampler ddpm"),
    ("dpm final for ddim", lambda p: [*p.ckpt, "--dpm-final", "zero"], "--dpm-final zero: applies to --sampler dpm++"),
    ("too many guided channels", lambda p: [*p.ckpt, "--guidance-channels", "4"],
     "--guidance-channels: this model has 3 channels, got 4"),
    ("cache setting without cache", lambda p: [*p.ckpt, "--cache-interval", "2"], "--cache-interval needs --cache"),
    ("cache interval 0", lambda p: [*p.ckpt, "--cache", "fora", "--cache-interval", "0"], "interval must be an int >= 1"),
    ("unknown quantization", lambda p: [*p.ckpt, "--quantize", "int8"], "invalid choice: 'int8'"),
    ("fp8 in fp32", lambda p: [*p.ckpt, "--quantize", "fp8", "--dtype", "fp32"],
     "--dtype: --quantize fp8 runs the model in bf16, got --dtype fp32"),
]


def test_quantize_fp8_samples_with_the_fp8_model(pixel_ckpt, tmp_path, run_cli):
    out = tmp_path / "out"
    code, err = run_cli(["sample", "--ckpt", pixel_ckpt, "--classes", "1", "2", "--quantize", "fp8", "--out", str(out),
                         *FAST])
    assert (code, err) == (0, [])
    with open(out / "run.json") as file:
        sampling = json.load(file)["sampling"]
    assert sampling["quantize"] == "fp8" and sampling["dtype"] == "bfloat16"
    model = fastdit.load(pixel_ckpt, quantize="fp8")
    latents = sample(model, torch.tensor([1, 2]), sampler="ddim", steps=2, cfg_scale=4.0, guidance_channels=None, seed=0)
    np.testing.assert_array_equal(npz(out)["arr_0"], images.to_uint8(latents))


@pytest.fixture
def paths(tmp_path, pixel_ckpt):
    corrupt, blocker = tmp_path / "corrupt.pt", tmp_path / "a_file"
    corrupt.write_bytes(b"not a checkpoint")
    blocker.write_text("in the way")
    return SimpleNamespace(ckpt=["--ckpt", pixel_ckpt], corrupt=str(corrupt), missing=str(tmp_path / "missing.pt"),
                           under_a_file=str(blocker / "out"), out=tmp_path / "out")


@pytest.mark.parametrize("argv, words", [pytest.param(argv, words, id=case) for case, argv, words in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2_before_sampling(argv, words, paths, run_cli, monkeypatch):
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampling began before the input was checked")

    monkeypatch.setattr(sample_cli, "sample", no_sampling)
    argv = argv(paths)
    code, err = run_cli(["sample", *FAST, *argv] + ([] if "--out" in argv else ["--out", str(paths.out)]))
    assert code == 2
    assert len(err) == 1 and err[0].startswith("fastdit sample: error: ") and words in err[0], err
    assert not paths.out.exists()


def test_failed_write_leaves_the_previous_output_whole_and_the_same_command_resumes(pixel_ckpt, tmp_path, run_cli,
                                                                                     monkeypatch):
    out = tmp_path / "out"
    code, _ = run_cli(["sample", "--ckpt", pixel_ckpt, "--num-samples", "3", "--out", str(out), *FAST])
    assert code == 0
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    write_member = fastdit.io._write_npy_member

    def disk_full(archive, name, *array):
        if name == "arr_0":
            raise OSError(28, "No space left on device")
        write_member(archive, name, *array)

    monkeypatch.setattr(fastdit.io, "_write_npy_member", disk_full)
    argv = ["sample", "--ckpt", pixel_ckpt, "--num-samples", "5", "--batch-size", "2", "--out", str(out), *FAST]
    code, err = run_cli(argv)
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0]
    staging = [name for name in os.listdir(tmp_path) if name.startswith(".out.staging-")]
    assert len(staging) == 1 and f"{tmp_path / staging[0] / 'output' / 'samples.npz'}" in err[0]  # names the file
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before  # not one file of the new run
    assert_no_temporary_files(out)
    # The sampled batches are kept: the same command, with room on the disk, samples nothing again.
    monkeypatch.setattr(fastdit.io, "_write_npy_member", write_member)
    monkeypatch.setattr(sample_cli, "sample", lambda *args, **kwargs: pytest.fail("a finished batch was sampled"))
    assert run_cli(argv) == (0, [])
    record = json.loads((out / "run.json").read_text())
    assert record["timings"]["resumed_images"] == 5 and npz(out)["arr_0"].shape[0] == 5
    assert sorted(os.listdir(tmp_path)) == [".out.lock", "out"]  # the staging folder is gone


@pytest.mark.parametrize("argv, words", [
    pytest.param(["--model", "DiT-S/8", "--classes", "1000"], "class ids must be in [0, 999]", id="class id"),
    pytest.param(["--classes", "10"], "class ids must be in [0, 9]", id="bundled model class id"),
])
def test_console_script_exit_code_and_stderr(argv, words, tmp_path):
    out = tmp_path / "out"
    # From tmp_path: from the checkout's root, -m would find the source tree's fastdit/, not the installed one.
    result = subprocess.run([sys.executable, "-m", "fastdit", "sample", *argv, "--out", str(out)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()] and words in result.stderr, result.stderr
    assert result.stdout == "" and not out.exists()


@pytest.mark.slow  # 100 images of 50 steps in a subprocess: minutes on 2 cores
def test_no_arguments_samples_recognisable_digits_from_the_bundled_model(tmp_path):
    """The main job, as a user runs it (the torch path: the Triton interpreter would take
    minutes over 100 images and 50 steps)."""
    env = torch_path_environment()
    result = subprocess.run([sys.executable, "-m", "fastdit", "sample", "--no-progress"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "samples"
    data = npz(out)
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape[0] == 100
    assert np.array_equal(data["labels"], np.repeat(np.arange(10), 10))
    assert (out / "grid.png").exists()
    record = json.loads((out / "run.json").read_text())
    assert record["model"]["checkpoint"] == os.path.abspath(options.BUNDLED_MODEL)
    # The README's claim: an SVC trained on the real digits recognises the samples' classes.
    assert conditioned_class_accuracy(data["arr_0"], data["labels"]) >= 0.95


def test_to_uint8_maps_as_the_release():
    pixels = torch.tensor([-2.0, -1.0, -0.999, 0.0, 0.999, 1.0, 3.0]).view(1, 1, 1, 7)
    assert images.to_uint8(pixels).ravel().tolist() == [0, 0, 0, 128, 255, 255, 255]
    assert images.to_uint8(torch.zeros(2, 3, 4, 5)).shape == (2, 4, 5, 3)


@pytest.mark.parametrize("channels", [1, 3])
def test_png_round_trip_and_grid(channels):
    tiles = np.random.default_rng(0).integers(0, 256, (5, 32, 32, channels), dtype=np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(images.png_bytes(tiles[0]))))
    np.testing.assert_array_equal(decoded.reshape(tiles[0].shape), tiles[0])
    big = np.random.default_rng(1).integers(0, 256, (5, 64, 64, channels), dtype=np.uint8)
    grid = images.grid(big, columns=2)
    pad = images.GRID_PADDING
    assert grid.shape == (3 * (64 + pad) + pad, 2 * (64 + pad) + pad, channels)
    np.testing.assert_array_equal(grid[2 * (64 + pad) + pad:][:64, pad:pad + 64], big[4])
    labelled = images.grid(big, labels=[0, 1, 2, 3, 999], columns=2)
    assert labelled.shape == grid.shape and not np.array_equal(labelled, grid)
    enlarged = images.grid(tiles, columns=2)  # 32 px tiles are shown twice as large
    np.testing.assert_array_equal(enlarged[pad:pad + 64, pad:pad + 64], tiles[0].repeat(2, 0).repeat(2, 1))
