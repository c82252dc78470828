"""diffusers folders: every layout diffusers writes reads to the same weights; what fastdit writes,
diffusers loads with no missing or unexpected keys and computes the same function with its timestep
difference patched."""
import json
import os

import pytest
import torch
from malicious import WritesAFile

import fastdit
from fastdit.integrations.diffusers_convert import diffusers_to_release
from fastdit.integrations.diffusers_folders import (
    is_diffusers_folder,
    read_diffusers,
    transformer_folder,
    vae_folder,
    write_diffusers,
)
from fastdit.models.checkpoint import CheckpointError, model_config
from fastdit.models.parity import relative_max_error

diffusers = pytest.importorskip("diffusers")

PARITY = 1e-5  # fp32, as tests/integrations/test_diffusers_convert.py


def assert_same_state(actual, expected):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype and torch.equal(actual[key], value), key


def test_written_folder_loads_in_diffusers_and_computes_the_same(tiny_fastdit, tiny_inputs, tmp_path):
    model = tiny_fastdit()
    write_diffusers(model, tmp_path / "transformer")
    loaded, info = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "transformer", output_loading_info=True)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    assert loaded.config.norm_eps == 1e-6  # the release's: diffusers' MLP LayerNorm then matches it
    for block in loaded.transformer_blocks:  # the one difference left: the timestep frequencies
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    x, t, y = tiny_inputs
    with torch.no_grad():
        assert relative_max_error(model(x, t, y), loaded.eval()(x, timestep=t, class_labels=y).sample) <= PARITY


def test_written_folder_reads_back_bit_equal(tiny_fastdit, tmp_path):
    model = tiny_fastdit()
    write_diffusers(model, tmp_path)
    assert is_diffusers_folder(tmp_path)
    state_dict, config = read_diffusers(tmp_path)
    assert config == model_config(model)
    assert_same_state(state_dict, model.state_dict())


def saved(model, folder, **options):
    model.save_pretrained(folder, **options)
    return folder


@pytest.mark.parametrize("layout, options", [
    ("single safetensors", {}),
    ("sharded safetensors", dict(max_shard_size="20KB")),
    ("pickled .bin", dict(safe_serialization=False)),
])
def test_every_layout_reads_the_same_weights(tiny_diffusers, tmp_path, layout, options):
    model = tiny_diffusers()
    folder = saved(model, tmp_path / "transformer", **options)
    names = os.listdir(folder)
    if layout.startswith("sharded"):
        assert "diffusion_pytorch_model.safetensors.index.json" in names
        assert sum(name.endswith(".safetensors") for name in names) > 1
    expected = diffusers_to_release(model.state_dict(), dict(model.config))
    state_dict, config = read_diffusers(folder)
    assert config == expected[1]
    assert_same_state(state_dict, expected[0])


@pytest.mark.parametrize("sharded", [False, True])
def test_fp16_variant(tiny_diffusers, tmp_path, sharded):
    model = tiny_diffusers().half()
    folder = saved(model, tmp_path, variant="fp16", **(dict(max_shard_size="10KB") if sharded else {}))
    assert not os.path.exists(folder / "diffusion_pytorch_model.safetensors")
    expected, _ = diffusers_to_release(model.state_dict(), dict(model.config))
    for variant in (None, "fp16"):  # None falls back to the variant when no full-precision files exist
        state_dict, _ = read_diffusers(folder, variant=variant)
        assert_same_state(state_dict, expected)
        assert state_dict["pos_embed"].dtype == torch.float16
    with pytest.raises(CheckpointError, match="holds no diffusers weights"):
        read_diffusers(folder, variant="bf16")


def test_full_precision_wins_over_the_variant(tiny_diffusers, tmp_path):
    model = tiny_diffusers()
    model.save_pretrained(tmp_path)
    model.half().save_pretrained(tmp_path, variant="fp16")
    state_dict, _ = read_diffusers(tmp_path)
    assert state_dict["x_embedder.proj.weight"].dtype == torch.float32


def test_legacy_class_name(tiny_diffusers, tmp_path):
    """facebook/DiT-XL-2-256 and -512 were published as Transformer2DModel; the keys are the same."""
    model = tiny_diffusers()
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "_class_name": "Transformer2DModel"}))
    assert is_diffusers_folder(tmp_path)
    assert_same_state(read_diffusers(tmp_path)[0], diffusers_to_release(model.state_dict(), dict(model.config))[0])


def tiny_vae():
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                                   down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                                   layers_per_block=1, norm_num_groups=8, sample_size=8)


def test_pipeline_root(tiny_diffusers, tmp_path):
    model = tiny_diffusers()
    pipe = diffusers.DiTPipeline(transformer=model, vae=tiny_vae(), scheduler=diffusers.DDIMScheduler())
    pipe.save_pretrained(tmp_path)
    assert is_diffusers_folder(tmp_path)
    assert transformer_folder(tmp_path) == os.path.join(tmp_path, "transformer")
    assert vae_folder(tmp_path) == os.path.join(tmp_path, "vae")
    assert vae_folder(tmp_path / "transformer") is None
    assert_same_state(read_diffusers(tmp_path)[0], diffusers_to_release(model.state_dict(), dict(model.config))[0])


def test_not_diffusers_folders(tiny_fastdit, tmp_path):
    assert not is_diffusers_folder(tmp_path / "absent")
    assert not is_diffusers_folder(tmp_path)
    tiny_fastdit().save_pretrained(tmp_path / "fastdit")
    assert not is_diffusers_folder(tmp_path / "fastdit")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    assert not is_diffusers_folder(tmp_path / "other")
    with pytest.raises(CheckpointError, match="_class_name is 'UNet2DModel'"):
        read_diffusers(tmp_path / "other")
    # fastdit.load named the model.safetensors such a folder lacks, not the class it holds (issue 27)
    with pytest.raises(CheckpointError, match=r"^\S+/config.json: a diffusers 'UNet2DModel', not a DiT; fastdit reads"):
        fastdit.load(tmp_path / "other")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    assert not is_diffusers_folder(tmp_path / "broken")


def test_a_pickle_bin_that_runs_code_is_refused_in_one_line_without_torchs_advice(tiny_diffusers, tmp_path):
    """torch's message (relayed before, 3-6 lines) advises weights_only=False: fastdit must never advise that."""
    folder = saved(tiny_diffusers(), tmp_path / "bin", safe_serialization=False)
    marker = tmp_path / "executed"
    torch.save({"x": WritesAFile(marker)}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError) as error:
        read_diffusers(folder)
    message = str(error.value)
    assert message.startswith(f"cannot read {folder / 'diffusion_pytorch_model.bin'}: it holds objects other than "
                              "tensors (a pickle that could run code)")
    assert "\n" not in message and "weights_only=False" not in message and not marker.exists()


def test_incomplete_folders_are_refused(tiny_diffusers, tmp_path):
    folder = saved(tiny_diffusers(), tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
    os.remove(folder / shards[-1])
    with pytest.raises(CheckpointError, match=f"lists {shards[-1]}, which is not in"):
        read_diffusers(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"_class_name": "DiTTransformer2DModel"}))
    with pytest.raises(CheckpointError, match="holds no diffusers weights"):
        read_diffusers(empty)
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "unet": []}))
    with pytest.raises(CheckpointError, match="names no transformer"):
        read_diffusers(tmp_path / "root")
