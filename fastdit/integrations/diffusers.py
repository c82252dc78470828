"""A fastdit DiT as a diffusers transformer, to run inside ``DiTPipeline`` on fastdit's fused kernels.

    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline
    import fastdit
    from fastdit.integrations.diffusers import FastDiTTransformer2DModel

    transformer = FastDiTTransformer2DModel.from_fastdit(fastdit.load("DiT-XL-2-256x256.pt"))
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(...))

The wrapper is a diffusers ``ModelMixin``/``ConfigMixin``: it has the config attributes the pipeline
reads (``sample_size``, ``in_channels``, ``out_channels``), ``device`` and ``dtype``, takes
``timestep=``/``class_labels=``/``return_dict``, returns ``.sample``, and survives
``pipe.save_pretrained`` and ``DiTPipeline.from_pretrained`` (diffusers loads a class from outside
its own libraries only once the caller has imported its module, so import this one first).

The model computes the release's function, not diffusers' ``DiTTransformer2DModel``'s (which
differs in its timestep embedding and one LayerNorm eps; docs/diffusers.md). DiTPipeline guides all
channels and hard-codes the null class as 1000.
"""
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from fastdit.models.config import model_config
from fastdit.models.dit import DiT


class FastDiTTransformer2DModel(ModelMixin, ConfigMixin):
    """fastdit's DiT (``self.model``) behind diffusers' transformer interface."""

    @register_to_config
    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        block: str = "adaln-zero",
        sample_size: int | None = None,
        out_channels: int | None = None,
    ):
        """fastdit.DiT's arguments. ``sample_size`` and ``out_channels`` are diffusers' names for what
        DiTPipeline reads; they follow from ``input_size`` and ``learn_sigma`` and are in the config for
        the pipeline, so ``from_pretrained`` passes them back: given, they must agree."""
        super().__init__()
        derived = dict(sample_size=input_size, out_channels=2 * in_channels if learn_sigma else in_channels)
        given = dict(sample_size=sample_size, out_channels=out_channels)
        for name, value in given.items():
            if value is not None and value != derived[name]:
                raise ValueError(f"{name}: must be {derived[name]} for input_size {input_size}, in_channels "
                                 f"{in_channels} and learn_sigma {learn_sigma}, got {value}")
        self.register_to_config(**derived)
        self.model = DiT(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
            num_classes=num_classes, learn_sigma=learn_sigma, block=block,
        )

    @classmethod
    def from_fastdit(cls, model: DiT) -> "FastDiTTransformer2DModel":
        """Wrap ``model`` (a ``fastdit.DiT``: its weights, device, dtype and attention backend; not copied)."""
        if not isinstance(getattr(model, "_orig_mod", model), DiT):
            raise TypeError(f"model: expected a fastdit.DiT, got {type(model).__name__}")
        with torch.device("meta"):  # the wrapper's own DiT is replaced at once: build no weights for it
            wrapper = cls(**model_config(model))
        wrapper.model = model
        return wrapper.train(model.training)

    def forward(self, hidden_states, timestep=None, class_labels=None, return_dict: bool = True):
        """DiTTransformer2DModel's call: latents (N, C, H, W), ``timestep`` a tensor of N (or one to
        broadcast, or a number), ``class_labels`` N class ids (``num_classes`` is the null class)."""
        if timestep is None or class_labels is None:
            raise ValueError("timestep and class_labels: a DiT needs both, got "
                             f"timestep={timestep!r}, class_labels={class_labels!r}")
        batch = hidden_states.shape[0]
        t = torch.as_tensor(timestep, device=hidden_states.device)
        if t.dim() == 0:
            t = t.expand(batch)
        y = torch.as_tensor(class_labels, device=hidden_states.device)
        output = self.model(hidden_states, t, y)
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)
