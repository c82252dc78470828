"""A fastdit DiT inside DiTPipeline: the transformer interface the pipeline calls, end to end with
DDIM and DPM-Solver++ and a tiny VAE against diffusers' own DiT (same weights, its timestep
difference patched), and through pipe.save_pretrained / from_pretrained."""
import pytest
import torch
from parity import launches_kernels

from fastdit.integrations.diffusers_folders import read_diffusers, write_diffusers
from fastdit.models.checkpoint import model_config
from fastdit.models.parity import relative_max_error

diffusers = pytest.importorskip("diffusers")
from fastdit.integrations.diffusers import FastDiTTransformer2DModel  # after the skip: needs diffusers

PARITY = 1e-5  # fp32, as tests/integrations/test_diffusers_convert.py
PIPELINE_NULL_CLASS = 1000  # DiTPipeline hard-codes the null class: the model needs 1000 classes


@launches_kernels
def test_forward_takes_what_the_pipeline_passes(tiny_fastdit, tiny_inputs):
    model = tiny_fastdit()
    transformer = FastDiTTransformer2DModel.from_fastdit(model)
    x, t, y = tiny_inputs
    with torch.no_grad():
        expected = model(x, t, y)
        assert torch.equal(transformer(x, timestep=t, class_labels=y).sample, expected)
        assert torch.equal(transformer(x, timestep=t.double(), class_labels=y, return_dict=False)[0], expected)
        same_t = model(x, torch.full_like(t, 500), y)
        assert torch.equal(transformer(x, timestep=torch.tensor(500), class_labels=y).sample, same_t)
        assert torch.equal(transformer(x, timestep=500, class_labels=y.tolist()).sample, same_t)
    assert transformer.device == x.device and transformer.dtype == torch.float32
    config = transformer.config
    assert (config.sample_size, config.in_channels, config.out_channels) == (8, 4, 8)
    with pytest.raises(ValueError, match="timestep and class_labels"):
        transformer(x, timestep=t)


def test_wrapper_arguments_are_checked(tiny_fastdit):
    with pytest.raises(TypeError, match="model: expected a fastdit.DiT"):
        FastDiTTransformer2DModel.from_fastdit(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="sample_size: must be 8"):
        FastDiTTransformer2DModel(input_size=8, hidden_size=16, depth=1, num_heads=2, num_classes=3, sample_size=16)


def tiny_vae():
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                                   down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                                   layers_per_block=1, norm_num_groups=8, sample_size=8).eval()


def schedulers():
    # DiT's shipped scheduler config (facebook/DiT-XL-2-256's scheduler/), and DPM-Solver++ from it
    ddim = diffusers.DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False)
    return {"ddim": ddim, "dpm++": diffusers.DPMSolverMultistepScheduler.from_config(ddim.config)}


def generate(pipe):
    return pipe(class_labels=[1, 7, 999], guidance_scale=4.0, num_inference_steps=6,
                generator=torch.Generator().manual_seed(0), output_type="pt").images


@pytest.fixture
def fastdit_pipeline_and_reference(tiny_fastdit, tmp_path):
    """(DiTPipeline around the fastdit model, the same around diffusers' DiT with the same weights)."""
    model = tiny_fastdit(num_classes=PIPELINE_NULL_CLASS)
    write_diffusers(model, tmp_path / "diffusers-transformer")
    reference = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "diffusers-transformer").eval()
    for block in reference.transformer_blocks:  # its norm_eps is written as the release's 1e-6
        block.norm1.emb.time_proj.downscale_freq_shift = 0

    def make(scheduler_name):
        vae = tiny_vae()
        return (diffusers.DiTPipeline(FastDiTTransformer2DModel.from_fastdit(model), vae, schedulers()[scheduler_name]),
                diffusers.DiTPipeline(reference, vae, schedulers()[scheduler_name]))

    return make


@pytest.mark.parametrize("scheduler_name", ["ddim", "dpm++"])
def test_pipeline_matches_diffusers_dit(fastdit_pipeline_and_reference, scheduler_name):
    pipe, reference_pipe = fastdit_pipeline_and_reference(scheduler_name)
    images, expected = generate(pipe), generate(reference_pipe)
    assert images.shape == (3, 3, 8, 8)
    assert relative_max_error(images, expected) <= PARITY


def test_pipeline_survives_save_and_load(fastdit_pipeline_and_reference, tmp_path):
    pipe, _ = fastdit_pipeline_and_reference("dpm++")
    images = generate(pipe)
    pipe.save_pretrained(tmp_path / "pipeline")
    loaded = diffusers.DiTPipeline.from_pretrained(tmp_path / "pipeline")
    assert type(loaded.transformer) is FastDiTTransformer2DModel
    assert type(loaded.scheduler) is diffusers.DPMSolverMultistepScheduler
    assert torch.equal(generate(loaded), images)
    # fastdit reads the saved pipeline too: its transformer folder holds the wrapped DiT
    state_dict, config = read_diffusers(tmp_path / "pipeline")
    assert config == model_config(pipe.transformer.model)
    original = pipe.transformer.model.state_dict()
    assert state_dict.keys() == original.keys() and all(torch.equal(state_dict[key], original[key]) for key in original)
