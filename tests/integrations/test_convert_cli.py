"""`fastdit convert`: every format to every other and back, bit-equal; outputs whole or absent; no overwrite."""
import argparse
import os

import pytest
import torch

from fastdit.cli import convert
from fastdit.models.checkpoint import CheckpointError, read

pytest.importorskip("diffusers")


def run_convert(*argv):
    parser = argparse.ArgumentParser()
    convert.add_arguments(parser)
    return convert.run(parser.parse_args([os.fspath(arg) for arg in argv]))


def assert_same_state(actual, expected):
    assert actual.keys() == expected.keys()
    assert all(actual[key].dtype == expected[key].dtype and torch.equal(actual[key], expected[key]) for key in expected)


def test_release_to_diffusers_to_fastdit_to_release_is_bit_equal(tiny_fastdit, tmp_path, capsys):
    model = tiny_fastdit()
    torch.save(model.state_dict(), tmp_path / "release.pt")
    # A .pt file stores no config: the error names the flag, in the command's words.
    with pytest.raises(CheckpointError, match=r"^--num-heads: .*release\.pt stores no config, and its width 16 is not "
                                              r"one of the paper's \(384, 768, 1024, 1152\), .*: pass --num-heads N$"):
        run_convert(tmp_path / "release.pt", tmp_path / "diffusers", "--to", "diffusers")
    assert run_convert(tmp_path / "release.pt", tmp_path / "diffusers", "--to", "diffusers", "--num-heads", "2") == 0
    assert "wrote" in capsys.readouterr().out
    assert run_convert(tmp_path / "diffusers", tmp_path / "fastdit", "--to", "fastdit") == 0
    assert run_convert(tmp_path / "fastdit", tmp_path / "back.pt", "--to", "release") == 0
    assert sorted(os.listdir(tmp_path / "diffusers")) == ["config.json", "diffusion_pytorch_model.safetensors"]
    state_dict, config = read(tmp_path / "fastdit")
    assert config["num_classes"] == model.num_classes and config["hidden_size"] == 16
    assert_same_state(state_dict, model.state_dict())
    assert_same_state(torch.load(tmp_path / "back.pt", weights_only=True), model.state_dict())
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_pipeline_root_source(tiny_diffusers, tmp_path):
    import diffusers

    model = tiny_diffusers()
    model.save_pretrained(tmp_path / "root" / "transformer", variant="fp16")
    (tmp_path / "root" / "model_index.json").write_text('{"_class_name": "DiTPipeline", "transformer": '
                                                        '["diffusers", "DiTTransformer2DModel"]}')
    run_convert(tmp_path / "root", tmp_path / "out", "--to", "diffusers")
    loaded = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "out")
    assert_same_state(loaded.state_dict(), model.state_dict())
    with pytest.raises(ValueError, match="--num-heads: .* stores num_heads 2, got 4"):
        run_convert(tmp_path / "root", tmp_path / "other", "--to", "fastdit", "--num-heads", "4")


def test_existing_destination_is_refused(tiny_fastdit, tmp_path):
    tiny_fastdit().save_pretrained(tmp_path / "model")
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="DST: .*taken exists; fastdit convert never overwrites"):
        run_convert(tmp_path / "model", tmp_path / "taken", "--to", "diffusers")
    assert os.listdir(tmp_path / "taken") == []


def test_failed_conversion_leaves_nothing(tiny_fastdit, tmp_path):
    tiny_fastdit(block="adaln").save_pretrained(tmp_path / "adaln")
    with pytest.raises(CheckpointError, match="cannot be written as a diffusers"):
        run_convert(tmp_path / "adaln", tmp_path / "out", "--to", "diffusers")
    assert sorted(os.listdir(tmp_path)) == ["adaln"]


def test_repo_id_source_from_the_local_cache(cached_repo, tmp_path):
    model = cached_repo
    run_convert("facebook/DiT-tiny", tmp_path / "fastdit", "--to", "fastdit")
    state_dict, _ = read(tmp_path / "fastdit")
    assert torch.equal(state_dict["y_embedder.embedding_table.weight"],
                       model.state_dict()["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"])
    with pytest.raises(CheckpointError, match="hf download facebook/DiT-other"):
        run_convert("facebook/DiT-other", tmp_path / "other", "--to", "fastdit")
