"""The release's image preprocessing: ADM's ``center_crop_arr``, which DiT's ``train.py`` applies to
every ImageNet image before encoding it.

The order matters for the pixels: the image is first halved with a BOX filter (an exact 2x2 average)
for as long as its short side stays at least twice the target, then resized with BICUBIC so that its
short side equals the target, and only then cropped to the central square. Cropping first, or one
bicubic resize from full size, gives different images (up to tens of grey levels on sharp content),
and DiT's FID numbers are computed against latents made this way.
"""
import numpy as np

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")  # 16-bit grey (PNG, TIFF): 0..65535
# 32-bit integer and floating-point pixels (TIFF, PFM): no fixed range to map onto 0..255.
UNRANGED_MODES = {"I": "32-bit integer", "F": "32-bit float"}


def to_rgb(pil_image):
    """``pil_image`` as 8-bit RGB with its full range: 16-bit grey scaled by 255/65535 (PIL's own conversion
    clips it at 255, turning almost every pixel white), every other mode PIL can convert as PIL does; a mode
    without a known range, or one PIL cannot convert, is a ValueError naming it."""
    from PIL import Image

    mode = pil_image.mode
    if mode in SIXTEEN_BIT_MODES:
        pixels = np.asarray(pil_image).astype(np.uint32)
        return Image.fromarray(((pixels * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if mode in UNRANGED_MODES:
        raise ValueError(f"image mode {mode} ({UNRANGED_MODES[mode]} pixels) has no fixed range to map to 8 bits; "
                         "save the image with 8 or 16 bits per channel")
    try:
        return pil_image.convert("RGB")
    except ValueError:
        raise ValueError(f"image mode {mode} cannot be converted to RGB; save the image as RGB or greyscale") from None


def center_crop_arr(pil_image, image_size: int) -> np.ndarray:
    """``pil_image`` (converted to RGB by ``to_rgb``) as a uint8 ``(image_size, image_size, 3)`` array,
    preprocessed exactly as the release does."""
    from PIL import Image

    if not isinstance(pil_image, Image.Image):
        raise TypeError(f"pil_image: expected a PIL.Image.Image, got {type(pil_image).__name__}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size: expected a positive integer, got {image_size!r}")
    image = to_rgb(pil_image)
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
