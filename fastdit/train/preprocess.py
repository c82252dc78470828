"""The release's image preprocessing: ADM's ``center_crop_arr``, which DiT's ``train.py`` applies to
every ImageNet image before encoding it.

The order matters for the pixels: the image is first halved with a BOX filter (an exact 2x2 average)
for as long as its short side stays at least twice the target, then resized with BICUBIC so that its
short side equals the target, and only then cropped to the central square. Cropping first, or one
bicubic resize from full size, gives different images (up to tens of grey levels on sharp content),
and DiT's FID numbers are computed against latents made this way.
"""
import numpy as np


def center_crop_arr(pil_image, image_size: int) -> np.ndarray:
    """``pil_image`` (any PIL mode; converted to RGB) as a uint8 ``(image_size, image_size, 3)`` array,
    preprocessed exactly as the release does."""
    from PIL import Image

    if not isinstance(pil_image, Image.Image):
        raise TypeError(f"pil_image: expected a PIL.Image.Image, got {type(pil_image).__name__}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size: expected a positive integer, got {image_size!r}")
    image = pil_image.convert("RGB")
    # BOX halving first: a bicubic filter shrinking by far more than 2x aliases; repeated exact
    # 2x2 averages do not.
    while min(image.size) >= 2 * image_size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = image_size / min(image.size)
    # Python's round (half to even), as the release: it decides the long side's length to the pixel.
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    pixels = np.array(image, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on PIL's read-only view
    top, left = (pixels.shape[0] - image_size) // 2, (pixels.shape[1] - image_size) // 2
    return np.ascontiguousarray(pixels[top:top + image_size, left:left + image_size])
