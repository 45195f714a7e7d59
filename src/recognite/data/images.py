"""The one image loader of the library, for training and inference alike.

:func:`read_image` opens an image file and returns a PIL image that is safe to feed a transform:

- refused before decoding when it has more than :data:`MAX_IMAGE_PIXELS` pixels (a
  "decompression bomb": a small PNG that would decode to gigabytes);
- turned upright according to its EXIF orientation (phone photos store it there);
- 16-bit and 32-bit integer images scaled to 8 bits (``convert('RGB')`` would clip them to white),
  float images scaled from ``[0, 1]``;
- converted to ``mode`` (``'RGB'`` by default).

Every failure is a ``ValueError`` (or ``FileNotFoundError``) naming the file.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["MAX_IMAGE_PIXELS", "ImageTooLargeError", "check_images", "read_image"]

MAX_IMAGE_PIXELS = 89_478_485
"""Largest image accepted, in pixels (Pillow's own warning limit, about 9459 x 9459)."""



class ImageTooLargeError(ValueError):
    """An image with more pixels than the limit; refused before it was decoded.

    Attributes:
        size: ``(width, height)`` from the file's header, or None when Pillow refused to read it.
    """

    def __init__(self, message: str, size: tuple[int, int] | None = None) -> None:
        super().__init__(message)
        self.size = size


_EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV")


def _to_eight_bit(image: Image.Image) -> Image.Image:
    """High bit-depth single-channel images as ``L``, scaled (not clipped) to 0..255."""
    if image.mode in _EIGHT_BIT_MODES:
        return image
    values = np.asarray(image)
    if image.mode == "F":
        values = values.astype(np.float64)
        finite = values[np.isfinite(values)]
        top = 1.0 if finite.size == 0 or finite.max() <= 1.0 else 255.0
        scaled = np.nan_to_num(values, nan=0.0) * (255.0 / top)
    else:  # "I", "I;16", "I;16B", "I;16L", ...: integers of 16 bits (or 32 bits holding 16)
        values = values.astype(np.int64)
        top = 65535.0 if values.max(initial=0) > 255 or "16" in image.mode else 255.0
        scaled = values * (255.0 / top)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def read_image(
    path: str | os.PathLike | bytes,
    mode: str | None = "RGB",
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    formats: tuple[str, ...] | None = None,
) -> Image.Image:
    """Read an image file (or the bytes of one) as described in the module docstring.

    Args:
        path: The image file, or its content as ``bytes`` (an upload; named ``<upload>``).
        mode: PIL mode of the result; ``None`` keeps the file's (8-bit) mode.
        max_pixels: Largest accepted width x height; larger images are refused before decoding.
        formats: Pillow format names to try (e.g. ``("PNG",)``, from the file's own first bytes);
            None lets Pillow try every format it knows.

    Returns:
        The decoded image (loaded, the file closed).

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not an image, a corrupt or truncated one, or one over ``max_pixels``.
    """
    if isinstance(path, bytes):
        name, source = "<upload>", io.BytesIO(path)
    else:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Image file {os.fspath(path)!r} does not exist.")
        name, source = os.fspath(path), path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, with a clearer message
            with Image.open(source, formats=formats) as file_image:
                width, height = file_image.size
                if width * height > max_pixels:
                    raise ImageTooLargeError(f"The image {name} is {width} x {height} pixels, more than the "
                                             f"limit of {max_pixels:,} (a decompression bomb?); it was not decoded.",
                                             (width, height))
                file_image.load()
                image = ImageOps.exif_transpose(file_image)
                image = _to_eight_bit(image)
                if mode is not None and image.mode != mode:
                    image = image.convert(mode)
                elif image is file_image:
                    image = image.copy()
    except Image.DecompressionBombError as exc:  # Pillow's own limit, checked when the header is read
        raise ImageTooLargeError(f"The image {name} has more than {max_pixels:,} pixels (a decompression bomb?); "
                                 "it was not decoded.") from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"Could not read the image {name}: {exc}") from exc
    return image


def check_images(paths: list[str], what: str = "images", progress: bool = False) -> None:
    """Open the header of every image (cheap: nothing is decoded) and refuse the unreadable ones.

    Training checks its images up front this way, so that a corrupt file stops the run before the
    first step instead of in the middle of an epoch.

    Raises:
        ValueError: The files that are not images, or too large (count and first few).
    """
    from tqdm.auto import tqdm

    bad: list[str] = []
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # sizes are checked here
    for path in tqdm(paths, desc=f"check {what}", unit="img", disable=not progress, leave=False):
        try:
            with Image.open(path) as image:
                width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                bad.append(f"{path} ({width} x {height} pixels, over the limit of {MAX_IMAGE_PIXELS:,})")
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as exc:
            bad.append(f"{path} ({type(exc).__name__}: {exc})")
    if bad:
        raise ValueError(f"{len(bad)} of {len(paths)} {what} cannot be read, e.g. {'; '.join(bad[:3])}.")
