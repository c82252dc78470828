"""What the subcommands share (``fastdit.cli.options``), the helpers they share with the library, and the
layout rule that CLI modules import the library and the shared module, not each other."""
import ast
import pathlib
import re
from types import SimpleNamespace

import pytest
import torch

import fastdit
from fastdit import reference
from fastdit.cli import main, options
from fastdit.diffusion.sampling import default_guidance_channels, has_null_class
from fastdit.models.validation import check_class_ids
from fastdit.train.data import class_folder_files

CLI = pathlib.Path(fastdit.__file__).parent / "cli"
SHARED = {"fastdit.cli.options"}
PARTS = {"sample.py": {"fastdit.cli.sample_output", "fastdit.cli.cache_flags", "fastdit.cli.parallel_flags",
                      "fastdit.cli.sample_files"}}  # a subcommand's own modules


def cli_imports(path):
    """The fastdit.cli modules that ``path`` imports, by module name."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "fastdit.cli":  # the package: its submodules
            names.update(f"fastdit.cli.{alias.name}" for alias in node.names if alias.name != "main")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastdit.cli"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("fastdit.cli"))
    return names


@pytest.mark.parametrize("path", sorted(CLI.glob("*.py")), ids=lambda path: path.name)
def test_a_subcommand_imports_only_the_shared_module_and_the_library(path):
    if path.name in ("commands.py", "__init__.py"):  # the dispatcher imports every subcommand
        return
    allowed = SHARED | {"fastdit.cli.commands"} | PARTS.get(path.name, set())  # commands: python -m fastdit.ablation
    assert cli_imports(path) <= allowed, f"{path.name} imports {cli_imports(path) - allowed}"


def test_the_import_check_sees_a_subcommand_import(tmp_path):
    """The check above fails on what it forbids."""
    module = tmp_path / "bad.py"
    module.write_text("from fastdit.cli.sample import guidance_channels\nfrom fastdit.cli import export\n")
    assert cli_imports(module) == {"fastdit.cli.sample", "fastdit.cli.export"}


def test_default_device_follows_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert options.resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert options.resolve_device(None) == torch.device("cuda")
    assert options.resolve_device("cuda:1") == torch.device("cuda", 1)


def test_bad_devices_name_the_flag(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^--device: expected a torch device .*, got 'gpu0'$"):
        options.resolve_device("gpu0")
    with pytest.raises(ValueError, match=r"^--device cuda: this machine has no CUDA device"):
        options.resolve_device("cuda")


@pytest.mark.parametrize("name, device, expected", [(None, "cpu", torch.float32), (None, "cuda", torch.bfloat16),
                                                    ("fp16", "cpu", torch.float16), ("fp32", "cuda", torch.float32)])
def test_dtype_defaults_to_bf16_on_gpu_and_fp32_on_cpu(name, device, expected):
    assert options.resolve_dtype(name, torch.device(device)) == expected


@pytest.mark.parametrize("flags, words", [
    (dict(model="DiT-Q/2"), "--model: unknown model 'DiT-Q/2'"),
    (dict(model="DiT-S/8", image_size=32), "--image-size: DiT-S/8 makes images of a multiple of 64 px"),
    (dict(image_size=0), "--image-size: expected an integer in [1, 4096], got 0"),
    (dict(model="DiT-S-8", image_size=32), "--image-size: DiT-S-8 makes images of a multiple of 64 px"),
    (dict(model="DiT-XL-2", image_size=264), "--image-size: DiT-XL-2 makes images of a multiple of 16 px"),
])
def test_model_flags_are_checked_before_loading(flags, words):
    args = SimpleNamespace(**{"model": None, "ckpt": None, "weights": None, "image_size": None, **flags})
    with pytest.raises(ValueError, match="^" + re.escape(words)):
        options.check_model_flags(args)


def test_random_weights_depend_only_on_the_seed():
    args = SimpleNamespace(ckpt=None, model="DiT-S/8", image_size=64, seed=3)
    first, second = (options.load_model(args, torch.device("cpu"), torch.float32) for _ in range(2))
    assert torch.equal(first.pos_embed, second.pos_embed)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    assert options.image_size_of(first, None) == (64, False)
    with pytest.raises(ValueError, match=r"^--image-size: this model makes 64 px images, got 128 \(it samples 8x8 latents\)$"):
        options.image_size_of(first, 128)


def test_class_ids_out_of_range_are_all_named():
    check_class_ids(torch.tensor([0, 9]), 10, "--classes")
    with pytest.raises(ValueError, match=r"^--classes: class ids must be in \[0, 9\] \(the model has 10 classes\), "
                                         r"got \[-1, 10\]$"):
        check_class_ids(torch.tensor([10, 3, -1, 10]), 10, "--classes")


@pytest.mark.parametrize("dropout, expected", [(0.1, True), (0.0, False)])
def test_null_class_on_fast_and_reference_models(dropout, expected):
    config = dict(input_size=4, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10,
                  class_dropout_prob=dropout, learn_sigma=False)
    with torch.device("meta"):
        assert has_null_class(fastdit.DiT(**config)) is expected
        assert has_null_class(reference.DiT(**config)) is expected


def test_guidance_channels_default():
    assert default_guidance_channels(4) == 3  # the release: 3 of the 4 latent channels
    assert default_guidance_channels(1) is None and default_guidance_channels(3) is None


def test_class_folders_sorted_names_are_class_ids(tmp_path):
    for name, files in {"b_dog": ["2.png", "1.png"], "a_cat": ["x.png"], "c_empty": []}.items():
        (tmp_path / name).mkdir()
        for file in files:
            (tmp_path / name / file).write_bytes(b"")
    (tmp_path / "stray.png").write_bytes(b"")  # not in a class folder
    # An empty class folder became a class without images, silently (issue 27).
    with pytest.raises(ValueError, match=r"^--data: class folder c_empty under \S+ holds no files: every class needs"):
        class_folder_files(str(tmp_path), "--data")
    (tmp_path / "c_empty" / "y.png").write_bytes(b"")
    files, num_classes = class_folder_files(str(tmp_path), "--data")
    assert num_classes == 3
    assert [(pathlib.Path(path).relative_to(tmp_path).as_posix(), label) for path, label in files] == [
        ("a_cat/x.png", 0), ("b_dog/1.png", 1), ("b_dog/2.png", 1), ("c_empty/y.png", 2)]
    with pytest.raises(ValueError, match=r"^--data: found no files in class folders"):
        class_folder_files(str(tmp_path / "a_cat"), "--data")


def test_encode_checks_the_folder_before_loading_a_vae(tmp_path, run_cli):
    code, err = run_cli(["encode", "--data", str(tmp_path / "missing"), "--vae", str(tmp_path / "no-vae"),
                         "--out", str(tmp_path / "out")])
    assert code == 2 and len(err) == 1
    assert err[0].startswith("fastdit encode: error: --data: ") and "not a directory of class folders" in err[0]


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--jobs", "-1"]])
def test_ablation_bad_input_is_one_line_and_exit_2(argv, tmp_path, capsys):
    """`fastdit ablation` and `python -m fastdit.ablation` alike, before any training."""
    words = "--steps and --jobs: expected positive integers"
    for entry in (lambda args: main(["ablation", *args]), module_entry):
        code = entry(["--out", str(tmp_path / "out"), *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and words in err[0], err
    assert not (tmp_path / "out").exists()


def module_entry(argv):
    """``python -m fastdit.ablation``'s entry, in-process."""
    from fastdit.ablation import main as ablation_main

    return ablation_main(argv)
