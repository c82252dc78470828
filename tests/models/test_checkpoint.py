"""Checkpoints: every format loads strictly into the fast DiT, the config is read off the tensors,
a save/load round trip is exact, and each bad file fails with one clear CheckpointError."""
import argparse
import json
import os

import pytest
import torch
from malicious import WritesAFile
from parity import MODEL_TOLERANCE, assert_parity, perturb_
from safetensors.torch import save_file

import fastdit
from fastdit import reference
from fastdit.models import checkpoint
from fastdit.models.checkpoint import CheckpointError

# A paper width (384 -> 6 heads) so that every field, num_heads included, is inferred.
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=384, depth=2, num_heads=6,
            mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10, learn_sigma=True, block="adaln-zero")
FORMATS = ("plain.pt", "training.pt", "model_only.pt", "bare.safetensors", "directory")


def tiny_reference(seed=0, **changes):
    return perturb_(reference.DiT(**{**TINY, **changes}).eval(), seed=seed)


def saved_pt(model, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def ema():
    return tiny_reference(seed=0)


@pytest.fixture(scope="module")
def checkpoints(ema, tmp_path_factory):
    """Path of each format holding ``ema``'s weights."""
    root = tmp_path_factory.mktemp("checkpoints")
    state_dict = ema.state_dict()
    other = tiny_reference(seed=1).state_dict()
    paths = {name: root / name for name in FORMATS}
    torch.save(state_dict, paths["plain.pt"])
    # As the release's train.py saves it: EMA and raw weights, optimizer state, argparse arguments.
    optimizer = torch.optim.AdamW(ema.parameters(), lr=1e-4).state_dict()
    args = argparse.Namespace(model="DiT-S/2", image_size=64, num_classes=10)
    torch.save({"model": other, "ema": state_dict, "opt": optimizer, "args": args}, paths["training.pt"])
    torch.save({"model": state_dict}, paths["model_only.pt"])
    save_file({key: value.contiguous() for key, value in state_dict.items()}, paths["bare.safetensors"])
    checkpoint.save_pretrained(ema, paths["directory"])
    return paths


def inputs(batch=3):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 4, 8, 8, generator=generator)
    return x, torch.tensor([0, 500, 999]), torch.tensor([1, 9, 10])


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_loads_exactly(name, checkpoints, ema):
    model = fastdit.load(checkpoints[name])
    assert type(model) is fastdit.DiT and not model.training
    assert checkpoint.model_config(model) == TINY
    loaded, expected = model.state_dict(), ema.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)
    assert not model.pos_embed.requires_grad


def test_loaded_model_gives_identical_outputs(checkpoints, ema):
    direct = fastdit.DiT(**TINY).eval()
    direct.load_state_dict(ema.state_dict(), strict=True)
    with torch.no_grad():
        output = fastdit.load(checkpoints["plain.pt"])(*inputs())
        assert torch.equal(output, direct(*inputs()))
        assert_parity(output, ema(*inputs()), MODEL_TOLERANCE[torch.float32], "loaded model")


def test_save_pretrained_round_trip(tmp_path, ema):
    model = fastdit.DiT(**TINY, attn_backend="math").eval()
    model.load_state_dict(ema.state_dict())
    model.save_pretrained(tmp_path / "new" / "nested")
    assert sorted(os.listdir(tmp_path / "new" / "nested")) == ["config.json", "model.safetensors"]
    stored = json.loads((tmp_path / "new" / "nested" / "config.json").read_text())
    assert stored["format"] == "fastdit" and stored["format_version"] == checkpoint.FORMAT_VERSION
    assert {key: stored[key] for key in TINY} == TINY
    again = fastdit.DiT.from_pretrained(tmp_path / "new" / "nested", attn_backend="math")
    assert again.attn_backend == "math"
    with torch.no_grad():
        assert torch.equal(again(*inputs()), model(*inputs()))


def test_stored_config_carries_num_heads(tmp_path):
    """A width the paper does not use: heads come from config.json, or from the safetensors header
    of a weights file moved out of its directory."""
    model = tiny_reference(hidden_size=64, num_heads=2, mlp_ratio=2.0, class_dropout_prob=0.0, learn_sigma=False)
    checkpoint.save_pretrained(model, tmp_path)
    os.rename(tmp_path / "model.safetensors", tmp_path / "moved.safetensors")
    expected = checkpoint.model_config(model)
    assert checkpoint.model_config(fastdit.load(tmp_path / "moved.safetensors")) == expected


def test_dtype_device_and_compiled_models(tmp_path, ema):
    model = fastdit.load(saved_pt(ema, tmp_path), dtype=torch.bfloat16, device=torch.device("cpu"))
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    # torch.compile wraps lazily: saving the wrapper saves the model, without "_orig_mod." keys.
    checkpoint.save_pretrained(torch.compile(model), tmp_path / "compiled")
    assert checkpoint.model_config(fastdit.load(tmp_path / "compiled")) == TINY
    torch.save({f"_orig_mod.{key}": value for key, value in ema.state_dict().items()}, tmp_path / "prefixed.pt")
    assert checkpoint.model_config(fastdit.load(tmp_path / "prefixed.pt")) == TINY


# --- config inference --------------------------------------------------------------------------


def meta_state_dict(constructor, **kwargs):
    with torch.device("meta"):
        return constructor(**kwargs).state_dict()


@pytest.mark.parametrize("name, input_size", [(name, 32) for name in reference.DiT_models] + [("DiT-XL/2", 64)])
def test_infer_paper_configs(name, input_size):
    size, patch = name.removeprefix("DiT-").split("/")
    expected = dict(input_size=input_size, patch_size=int(patch), in_channels=4, **reference.DIT_CONFIGS[size],
                    mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, block="adaln-zero")
    state_dict = meta_state_dict(reference.DiT_models[name], input_size=input_size)
    assert checkpoint.infer_config(state_dict) == expected


@pytest.mark.parametrize(
    "changes, hints",
    [
        (dict(learn_sigma=False, in_channels=3, patch_size=4), {}),
        (dict(mlp_ratio=2.0, depth=5), {}),
        (dict(class_dropout_prob=0.0), dict(class_dropout_prob=0.0)),
        (dict(class_dropout_prob=0.0, num_classes=7), dict(num_classes=7)),
        (dict(hidden_size=96, num_heads=3), dict(num_heads=3)),
    ],
)
def test_infer_config_variants(changes, hints):
    arguments = {**TINY, **changes}
    assert checkpoint.infer_config(meta_state_dict(reference.DiT, **arguments), hints) == arguments


def test_infer_assumes_the_null_row():
    """Without hints, a label table of n rows is n - 1 classes + the null class, as in the release."""
    state_dict = meta_state_dict(reference.DiT, **{**TINY, "class_dropout_prob": 0.0})
    assert checkpoint.infer_config(state_dict)["num_classes"] == TINY["num_classes"] - 1


# --- errors ------------------------------------------------------------------------------------


def check_error(error, words, call, *args, **kwargs):
    with pytest.raises(error) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, (word, message)


def test_missing_file_says_where_checkpoints_come_from(tmp_path):
    words = ["DiT-XL-2-256x256.pt", "facebookresearch/DiT", "https://dl.fbaipublicfiles.com/DiT/models/",
             "never downloads"]
    check_error(CheckpointError, [str(tmp_path / "DiT-XL-2-256x256.pt"), *words],
                fastdit.load, tmp_path / "DiT-XL-2-256x256.pt")


class NotATensor:
    pass


@pytest.mark.parametrize(
    "name, write, words",
    [
        ("garbage.pt", lambda path, sd: path.write_bytes(b"not a checkpoint" * 8), ["cannot read", "garbage.pt"]),
        ("truncated.pt", lambda path, sd: truncated_copy(path, sd), ["cannot read", "truncated"]),
        ("pickled.pt", lambda path, sd: torch.save({"ema": NotATensor()}, path), ["weights_only=True"]),
        ("values.pt", lambda path, sd: torch.save({"step": 3, **sd}, path), ["not a DiT state dict", "step"]),
        ("list.pt", lambda path, sd: torch.save([1, 2], path), ["not a DiT state dict", "list"]),
        ("empty.pt", lambda path, sd: torch.save({"ema": {}}, path), ["not a DiT state dict", "no tensors"]),
        ("linear.pt", lambda path, sd: torch.save(torch.nn.Linear(2, 2).state_dict(), path),
         ["not a DiT state dict", "x_embedder.proj.weight"]),
        ("missing.pt", lambda path, sd: torch.save({k: v for k, v in sd.items() if k != "blocks.1.attn.qkv.bias"},
                                                   path),
         ["missing keys blocks.1.attn.qkv.bias"]),
        ("extra.pt", lambda path, sd: torch.save({**sd, "extra.weight": torch.ones(1)}, path),
         ["unexpected keys extra.weight"]),
        ("shape.pt", lambda path, sd: torch.save({**sd, "blocks.1.mlp.fc2.bias": torch.ones(5)}, path),
         ["blocks.1.mlp.fc2.bias is (5,), the model's is (384,)"]),
        ("garbage.safetensors", lambda path, sd: path.write_bytes(b"\x08" + b"\x00" * 7 + b"nonsense"),
         ["cannot read safetensors", "garbage.safetensors"]),
    ],
)
def test_bad_files(tmp_path, ema, name, write, words):
    write(tmp_path / name, ema.state_dict())
    check_error(CheckpointError, words, fastdit.load, tmp_path / name)


def truncated_copy(path, state_dict):
    torch.save(state_dict, path)
    path.write_bytes(path.read_bytes()[:1000])


def test_bad_directories(tmp_path, ema):
    check_error(CheckpointError, ["not a fastdit checkpoint directory", "config.json"], fastdit.load, tmp_path)
    checkpoint.save_pretrained(ema, tmp_path)
    (tmp_path / "config.json").write_text("{ not json")
    check_error(CheckpointError, ["cannot read", "config.json"], fastdit.load, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(["fastdit"]))
    check_error(CheckpointError, ["config.json: expected a JSON object, got list"], fastdit.load, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "fastdit", "format_version": 99}))
    check_error(CheckpointError, ["format_version 99"], fastdit.load, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "fastdit", "format_version": 1, "width": 3}))
    check_error(ValueError, ["unknown keys width"], fastdit.load, tmp_path)


def test_config_that_contradicts_the_tensors(tmp_path, ema):
    path = saved_pt(ema, tmp_path)
    check_error(CheckpointError, ["pos_embed is (1, 16, 384), the model's is (1, 64, 384)", "input_size=16"],
                fastdit.load, path, config={"input_size": 16})
    wide = tiny_reference(hidden_size=64, num_heads=2)
    check_error(CheckpointError, ["num_heads", "hidden_size 64"], fastdit.load, saved_pt(wide, tmp_path))
    assert checkpoint.model_config(fastdit.load(tmp_path / "model.pt", config={"num_heads": 2}))["num_heads"] == 2


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(config={"heads": 6}), ValueError, ["config:", "unknown keys heads", "num_heads"]),
        (dict(config=[6]), TypeError, ["config:", "list"]),
        (dict(dtype=torch.int8), TypeError, ["dtype:", "int8"]),
        (dict(dtype="bf16"), TypeError, ["dtype:", "bf16"]),
        (dict(device="gpu7"), ValueError, ["device:", "gpu7"]),
    ],
)
def test_bad_arguments(tmp_path, ema, kwargs, error, words):
    check_error(error, words, fastdit.load, saved_pt(ema, tmp_path), **kwargs)


def test_bad_paths_and_models():
    check_error(TypeError, ["path:", "int"], fastdit.load, 3)
    check_error(TypeError, ["model:", "Linear"], checkpoint.model_config, torch.nn.Linear(2, 2))


# --- fastdit's training checkpoints, non-finite and non-float weights, devices -----------------


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory):
    """A checkpoint as fastdit's trainer saves it (Trainer.save), at a width whose heads the shapes cannot
    tell (hidden 32, 2 heads), with the raw weights moved away from the EMA's."""
    from fastdit import distributed
    from fastdit.train.trainer import TrainConfig, Trainer

    out = tmp_path_factory.mktemp("run")
    model_config = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2,
                        num_classes=10, class_dropout_prob=0.1, learn_sigma=True)
    config = TrainConfig(out=str(out), model=None, model_config=model_config, data="digits", image_size=8,
                         global_batch_size=8, precision="fp32")
    trainer = Trainer(config, distributed.Process(0, 1, 0, torch.device("cpu"), None))
    perturb_(trainer.model, seed=4)
    perturb_(trainer.ema, seed=5)
    trainer.save()
    return os.path.join(trainer.checkpoint_dir, "00000000.pt"), trainer


@pytest.mark.parametrize("weights", [None, "ema", "model"])
def test_fastdits_training_checkpoint_loads_either_weights(training_checkpoint, weights):
    path, trainer = training_checkpoint
    model = fastdit.load(path, weights=weights)
    expected = (trainer.model if weights == "model" else trainer.ema).state_dict()
    assert checkpoint.model_config(model) == checkpoint.model_config(trainer.model)  # num_heads=2 from the file
    assert all(torch.equal(model.state_dict()[key], expected[key]) for key in expected)


def test_weights_must_be_in_the_file(checkpoints, tmp_path):
    check_error(CheckpointError, ["weights='ema'", "only the 'model' weights"], fastdit.load,
                checkpoints["model_only.pt"], weights="ema")
    for name in ("plain.pt", "bare.safetensors", "directory"):
        check_error(CheckpointError, ["weights='model'", "one set of weights"], fastdit.load, checkpoints[name],
                    weights="model")
    check_error(ValueError, ["weights:", "'last'"], fastdit.load, checkpoints["training.pt"], weights="last")
    assert torch.equal(fastdit.load(checkpoints["training.pt"], weights="model").pos_embed,
                       tiny_reference(seed=1).pos_embed)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_weights_are_refused_unless_allowed(tmp_path, ema, value):
    state_dict = ema.state_dict()
    state_dict["blocks.1.attn.proj.weight"] = state_dict["blocks.1.attn.proj.weight"].clone()
    state_dict["blocks.1.attn.proj.weight"][3, :2] = value
    torch.save(state_dict, tmp_path / "diverged.pt")
    check_error(CheckpointError, ["diverged.pt", "not finite", "blocks.1.attn.proj.weight holds 2 NaN or inf",
                                  "allow_nonfinite=True"], fastdit.load, tmp_path / "diverged.pt")
    loaded = fastdit.load(tmp_path / "diverged.pt", allow_nonfinite=True)
    assert int((~torch.isfinite(loaded.blocks[1].attn.proj.weight)).sum()) == 2


def test_weights_that_overflow_the_requested_dtype_are_refused(tmp_path, ema):
    state_dict = ema.state_dict()
    state_dict["final_layer.linear.bias"] = torch.full_like(state_dict["final_layer.linear.bias"], 1e6)
    torch.save(state_dict, tmp_path / "large.pt")
    fastdit.load(tmp_path / "large.pt")  # finite in float32
    check_error(CheckpointError, ["final_layer.linear.bias holds"], fastdit.load, tmp_path / "large.pt",
                dtype=torch.float16)


def test_integer_tensors_are_named(tmp_path, ema):
    tensors = {key: value.contiguous() for key, value in ema.state_dict().items()}
    tensors["blocks.0.attn.qkv.weight"] = tensors["blocks.0.attn.qkv.weight"].to(torch.int32)
    save_file(tensors, tmp_path / "ints.safetensors")
    check_error(CheckpointError, ["ints.safetensors", "blocks.0.attn.qkv.weight (torch.int32)", "not floating point"],
                fastdit.load, tmp_path / "ints.safetensors")


def test_a_cuda_device_this_machine_lacks_is_one_clear_error(checkpoints, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_error(ValueError, ["device 'cuda'", "no CUDA device"], fastdit.load, checkpoints["plain.pt"], device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_error(ValueError, ["device 'cuda:3'", "has 1 CUDA device"], fastdit.load, checkpoints["plain.pt"],
                device="cuda:3")


@pytest.mark.parametrize("loader", [fastdit.load, lambda path: fastdit.load(path, weights="ema")])
def test_a_malicious_pickle_is_never_executed(tmp_path, loader):
    marker = tmp_path / "executed"
    torch.save({"ema": {"x": WritesAFile(marker)}, "model": {}}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        loader(tmp_path / "evil.pt")
    assert not marker.exists()
