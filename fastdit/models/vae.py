"""DiT's image autoencoder: diffusers' ``AutoencoderKL`` (the release uses Stability AI's
sd-vae-ft-ema / sd-vae-ft-mse) loaded from a local directory, with the latent scale its config gives.

Images are uint8 ``(N, H, W, C)`` (or float ``(N, C, H, W)`` in [-1, 1]); latents are the VAE's
latents, less ``shift``, times ``scale``: the space DiT is trained and sampled in. diffusers is an optional
dependency (``pip install "fastdit[vae]"``): importing fastdit does not need it.
"""
import importlib.util
import os

import torch

from fastdit.models.config import CheckpointError

VAE_HINT = (
    "DiT decodes with Stability AI's sd-vae-ft-ema or sd-vae-ft-mse (diffusers format, "
    "huggingface.co/stabilityai/sd-vae-ft-ema); download it once and pass its local directory "
    "(fastdit never downloads at run time)"
)


class VAE:
    """An ``AutoencoderKL`` in eval mode that maps images to DiT latents and back, under no_grad,
    in its own dtype on its own device (inputs are moved there, outputs stay there)."""

    # Stable Diffusion's latent scale, which DiT uses: scaled latents have about unit variance. A diffusers
    # config states its own (``scaling_factor``, and ``shift_factor`` for VAEs whose latents are not centred).
    SD_SCALE = 0.18215

    def __init__(self, autoencoder):
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        config = autoencoder.config
        scale, shift = getattr(config, "scaling_factor", None), getattr(config, "shift_factor", None)
        self.scale = float(self.SD_SCALE if scale is None else scale)
        self.shift = float(shift or 0.0)
        if not (self.scale > 0 and self.scale < float("inf")):
            raise CheckpointError(f"VAE config: scaling_factor must be a finite number > 0, got {scale!r}")
        self.image_channels = config.in_channels
        self.latent_channels = config.latent_channels
        # Every encoder block but the last halves the resolution (8 for the four-block SD VAE).
        self.downsampling = 2 ** (len(config.block_out_channels) - 1)

    @classmethod
    def load(cls, path, device=None, dtype=None) -> "VAE":
        """The diffusers ``AutoencoderKL`` saved in the local directory ``path`` (``save_pretrained``
        format), on ``device`` (default CPU) in ``dtype`` (default: as stored)."""
        try:
            from diffusers import AutoencoderKL
        except ImportError as error:
            raise ImportError('fastdit.models.vae needs diffusers: pip install "fastdit[vae]"') from error
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path: expected a directory path, got {type(path).__name__}")
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise CheckpointError(f"VAE directory not found: {path}; {VAE_HINT}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype: expected a floating-point torch.dtype or None, got {dtype!r}")
        from diffusers.utils import logging as diffusers_logging

        verbosity = diffusers_logging.get_verbosity()
        # Its warning about tensors it left at random would be a second, multi-line report of the error below.
        diffusers_logging.set_verbosity_error()
        try:
            # Without accelerate, diffusers would warn on every load and then load this way anyway.
            autoencoder, loading = AutoencoderKL.from_pretrained(
                path, local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=_has_accelerate(),
                output_loading_info=True,
            )
        except (OSError, ValueError) as error:
            raise CheckpointError(f"cannot load a diffusers AutoencoderKL from {path}: {error}") from error
        finally:
            diffusers_logging.set_verbosity(verbosity)
        _check_loaded_whole(path, loading)
        return cls(autoencoder.to("cpu" if device is None else device))

    @property
    def device(self) -> torch.device:
        return next(self.autoencoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.autoencoder.parameters()).dtype

    @torch.no_grad()
    def encode(self, images, *, sample=False, generator=None) -> torch.Tensor:
        """Scaled latents ``(N, latent_channels, H / f, W / f)`` of uint8 ``(N, H, W, C)`` images or
        float ``(N, C, H, W)`` images in [-1, 1]. Deterministic by default: the posterior's mean.
        ``sample=True`` draws from the posterior instead (as the release does for training), with
        ``generator`` if given."""
        pixels = self._pixels(images)
        posterior = self.autoencoder.encode(pixels).latent_dist
        latents = posterior.sample(generator=generator) if sample else posterior.mean
        return (latents - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latents) -> torch.Tensor:
        """uint8 images ``(N, H, W, C)`` from scaled latents ``(N, latent_channels, h, w)``, with
        ``H = f h``, ``f`` the VAE's downsampling factor."""
        if not isinstance(latents, torch.Tensor) or not latents.dtype.is_floating_point:
            raise TypeError(f"latents: expected a floating-point tensor, got {_describe(latents)}")
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents: expected shape (N, {self.latent_channels}, h, w), got {tuple(latents.shape)}")
        latents = latents.to(device=self.device, dtype=self.dtype)
        images = self.autoencoder.decode(latents / self.scale + self.shift).sample.float()
        # The release's mapping: x clamped to [-1, 1], mapped to [0, 255] and rounded half up, as
        # clamp(127.5 x + 128, 0, 255) truncated to uint8. In fp32: half precision has no fraction at 255.
        images = (127.5 * images + 128.0).clamp(0, 255).to(torch.uint8)
        return images.permute(0, 2, 3, 1).contiguous()

    def _pixels(self, images) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1], on the VAE's device in its dtype."""
        if not isinstance(images, torch.Tensor):
            expected = "a uint8 (N, H, W, C) or float (N, C, H, W) tensor"
            raise TypeError(f"images: expected {expected}, got {_describe(images)}")
        channels = self.image_channels
        if images.dtype == torch.uint8:
            if images.dim() != 4 or images.shape[-1] != channels:
                raise ValueError(f"images: expected uint8 shape (N, H, W, {channels}), got {tuple(images.shape)}")
            # ToTensor + Normalize(0.5, 0.5), as the release prepares its training images.
            images = images.to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        elif images.dtype.is_floating_point:
            if images.dim() != 4 or images.shape[1] != channels:
                raise ValueError(f"images: expected float shape (N, {channels}, H, W), got {tuple(images.shape)}")
        else:
            raise TypeError(f"images: expected uint8 or floating-point values, got dtype {images.dtype}")
        height, width = images.shape[-2:]
        if height % self.downsampling or width % self.downsampling:
            raise ValueError(
                f"images: height and width must be multiples of the VAE's downsampling factor "
                f"{self.downsampling}, got {height}x{width}"
            )
        return images.to(device=self.device, dtype=self.dtype)


def _check_loaded_whole(path, loading: dict) -> None:
    """Strict loading: diffusers initialises a tensor missing from the weights file at random (two runs then
    give different latents) and ignores an unexpected one; either is an error naming the tensors."""
    problems = []
    for key, what in (("missing_keys", "missing from the weights file"),
                      ("unexpected_keys", "in the weights file but not in the model"),
                      ("mismatched_keys", "of another shape than the model's")):
        names = [name if isinstance(name, str) else name[0] for name in loading.get(key) or []]
        if names:
            problems.append(f"{len(names)} tensor{'s' if len(names) > 1 else ''} {what} ({', '.join(names[:3])}"
                            f"{', ...' if len(names) > 3 else ''})")
    if problems:
        raise CheckpointError(f"VAE {path}: its weights do not match the AutoencoderKL of its config.json: "
                              f"{'; '.join(problems)}; fastdit loads a VAE whole or not at all ({VAE_HINT})")


def _has_accelerate() -> bool:
    return importlib.util.find_spec("accelerate") is not None


def _describe(value) -> str:
    return f"dtype {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
