"""Sampled images as files: [-1, 1] tensors to uint8, PNG bytes, and a grid labelled by class."""
import io
import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

GRID_PADDING = 2  # px of black between tiles, as torchvision's make_grid that the release's sample.py uses
PREVIEW_MIN_TILE = 64  # px: smaller images are enlarged (nearest) so that a class id fits on them


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C) as the release's sample_ddp.py (for FID) maps them:
    127.5 x + 128 clamped to [0, 255] and truncated, i.e. 127.5 (x + 1) rounded half up. In fp32: half
    precision has no fractions near 255."""
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4:
        raise ValueError(f"pixels: expected a (N, C, H, W) tensor, got {getattr(pixels, 'shape', type(pixels))}")
    scaled = (127.5 * pixels.detach().float() + 128.0).clamp(0, 255)
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _pil_image(image: np.ndarray) -> Image.Image:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"image: expected uint8 (H, W, 1 or 3), got {image.dtype} {image.shape}")
    return Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)


def png_bytes(image: np.ndarray) -> bytes:
    """One uint8 (H, W, C) image, C = 1 (grey) or 3 (RGB), as PNG file contents."""
    buffer = io.BytesIO()
    _pil_image(image).save(buffer, format="PNG")
    return buffer.getvalue()


def grid(images: np.ndarray, labels=None, columns=None) -> np.ndarray:
    """Tile uint8 (N, H, W, C) images row by row, ``columns`` per row (default: a square), into one uint8
    (H', W', C) image; with ``labels`` each tile shows its class id; images under ``PREVIEW_MIN_TILE`` px are enlarged."""
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images: expected a non-empty uint8 (N, H, W, C) array, got {images.dtype} {images.shape}")
    # Small images (digits, 16 px) are enlarged, pixel for pixel, to a tile a person can read.
    scale = max(1, PREVIEW_MIN_TILE // min(images.shape[1:3]))
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    count, height, width, channels = images.shape
    columns = min(columns or math.ceil(math.sqrt(count)), count)
    rows = math.ceil(count / columns)
    step_y, step_x = height + GRID_PADDING, width + GRID_PADDING
    canvas = np.zeros((rows * step_y + GRID_PADDING, columns * step_x + GRID_PADDING, channels), np.uint8)
    corners = [(GRID_PADDING + (k % columns) * step_x, GRID_PADDING + (k // columns) * step_y) for k in range(count)]
    for image, (x, y) in zip(images, corners):
        canvas[y:y + height, x:x + width] = image
    if labels is None:
        return canvas
    picture = _pil_image(canvas)
    draw, font = ImageDraw.Draw(picture), ImageFont.load_default(size=max(10, min(height, width) // 12))
    black, white = (0, 255) if channels == 1 else ((0, 0, 0), (255, 255, 255))
    for label, (x, y) in zip(labels, corners):
        text = str(int(label))
        *_, right, bottom = draw.textbbox((x + 2, y + 1), text, font=font)
        draw.rectangle((x, y, right + 1, bottom + 1), fill=black)  # legible on any image
        draw.text((x + 2, y + 1), text, font=font, fill=white)
    labelled = np.asarray(picture)
    return labelled[:, :, None] if channels == 1 else labelled
