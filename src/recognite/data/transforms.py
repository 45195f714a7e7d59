"""Image transforms for training and evaluation, built from a backbone's preprocessing."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageChops
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from recognite.model.backbones import Preprocessing

# A pixel belongs to the content when any channel differs from the border colour by more than this.
CONTENT_TOLERANCE = 32
_EIGHT_BIT_MODES = ("L", "LA", "RGB", "RGBA")


def _interpolation(preprocessing: Preprocessing) -> InterpolationMode:
    return InterpolationMode(preprocessing.interpolation)


def border_color(image: Image.Image) -> tuple[int, ...]:
    """Per-channel median of the outermost pixel ring: the background colour of a plain-background image.

    Args:
        image: PIL image of any mode.

    Returns:
        One integer per channel (pixel values of the image's mode, e.g. 0..255 for ``'RGB'``); for
        an even number of ring pixels, the upper of the two middle values.
    """
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    ring = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    return tuple(int(v) for v in np.sort(ring, axis=0)[len(ring) // 2])


class ContentCrop:
    """Crop an image to the square around its content, padding with the border colour.

    The content is every pixel that differs from the border colour (:func:`border_color`) by more
    than ``tolerance`` in some channel. The crop is the square centred on the content's bounding
    box, with side ``(1 + 2 * margin)`` times the box's longer side; parts outside the image are
    filled with the border colour. Images without content are returned unchanged. This removes
    the position and scale of a character, logo or product on a plain background. 8-bit images
    (``L``, ``LA``, ``RGB``, ``RGBA``) keep their mode; binary and 16/32-bit grey images become
    ``L``, other modes (palette, CMYK...) ``RGB``.

    Args:
        margin: Margin around the content box, as a fraction of its longer side (>= 0).
        tolerance: Per-channel difference from the border colour that counts as content.
    """

    def __init__(self, margin: float = 0.05, tolerance: int = CONTENT_TOLERANCE) -> None:
        if margin < 0:
            raise ValueError(f"margin must be >= 0 (a fraction of the content box), got {margin}.")
        self.margin = margin
        self.tolerance = tolerance

    def __call__(self, image: Image.Image) -> Image.Image:
        if image.mode not in _EIGHT_BIT_MODES:
            image = image.convert("L" if image.mode in ("1", "I", "I;16", "F") else "RGB")
        background = border_color(image)
        fill = background[0] if len(background) == 1 else background
        difference = ImageChops.difference(image, Image.new(image.mode, image.size, fill))
        bands = difference.split()
        largest = bands[0]
        for band in bands[1:]:
            largest = ImageChops.lighter(largest, band)
        box = largest.point([0] * (self.tolerance + 1) + [255] * (255 - self.tolerance)).getbbox()
        if box is None:
            return image
        left, top, right, bottom = box
        side = max(1, round(max(bottom - top, right - left) * (1 + 2 * self.margin)))
        x0 = round((left + right - side) / 2)
        y0 = round((top + bottom - side) / 2)
        square = Image.new(image.mode, (side, side), fill)
        square.paste(image.crop((max(x0, 0), max(y0, 0), min(x0 + side, image.width), min(y0 + side, image.height))),
                     (max(-x0, 0), max(-y0, 0)))
        return square

    def __repr__(self) -> str:
        return f"{type(self).__name__}(margin={self.margin}, tolerance={self.tolerance})"


class RandomAffineOnBorder:
    """Random rotation / translation / scale / shear that fills uncovered pixels with the border colour.

    Like ``torchvision.transforms.RandomAffine`` (same parameter meaning), but the fill is the
    image's own :func:`border_color`, so a character on white paper stays on white paper.

    Args:
        degrees: Rotation drawn from ``[-degrees, degrees]``.
        translate: Maximum shift as a fraction of width / height.
        scale: Scale factor range ``(min, max)``.
        shear: Shear angle drawn from ``[-shear, shear]`` degrees (x axis).
        interpolation: Resampling mode.
    """

    def __init__(self, degrees: float = 0.0, translate: float = 0.0, scale: tuple[float, float] = (1.0, 1.0),
                 shear: float = 0.0, interpolation: InterpolationMode = InterpolationMode.BILINEAR) -> None:
        self.degrees, self.translate, self.scale, self.shear = degrees, translate, tuple(scale), shear
        self.interpolation = interpolation

    def __call__(self, image: Image.Image) -> Image.Image:
        if image.mode == "1":
            image = image.convert("L")
        angle, shift, factor, shear = T.RandomAffine.get_params(
            [-self.degrees, self.degrees], [self.translate, self.translate] if self.translate else None,
            list(self.scale), [-self.shear, self.shear] if self.shear else None, [image.width, image.height])
        fill = [float(v) for v in border_color(image)]
        return TF.affine(image, angle, list(shift), factor, list(shear), self.interpolation, fill)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(degrees={self.degrees}, translate={self.translate}, "
                f"scale={self.scale}, shear={self.shear})")


def train_transform(
    preprocessing: Preprocessing,
    image_size: int,
    scale: tuple[float, float] = (0.25, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.0,
    affine: RandomAffineOnBorder | None = None,
) -> Callable:
    """[Content crop,] random-resized crop, [random affine,] [horizontal flip,] to tensor, normalize.

    Args:
        preprocessing: Mean / std / interpolation of the backbone's weights; with
            ``preprocessing.content_crop`` every image is first cut to the square around its
            content (:class:`ContentCrop`).
        image_size: Output side S; images come out ``(3, S, S)``.
        scale: Area range of the random crop, as a fraction of the image.
        ratio: Aspect-ratio range of the random crop.
        hflip: Probability of a horizontal flip.
        affine: Optional random affine applied after the crop.
    """
    steps: list[Callable] = []
    if preprocessing.content_crop:
        steps.append(ContentCrop(preprocessing.content_margin))
    steps.append(
        T.RandomResizedCrop(image_size, scale=scale, ratio=ratio, interpolation=_interpolation(preprocessing), antialias=True)
    )
    if affine is not None:
        steps.append(affine)
    if hflip > 0:
        steps.append(T.RandomHorizontalFlip(hflip))
    steps += [T.ToTensor(), T.Normalize(preprocessing.mean, preprocessing.std)]
    return T.Compose(steps)


def eval_transform(preprocessing: Preprocessing, image_size: int) -> Callable:
    """Resize the short side and centre-crop, keeping the weights' resize/crop proportion.

    For weights evaluated with resize 256 → crop 224 and ``image_size=112`` the image is resized
    to 128 and cropped to 112. With ``preprocessing.content_crop`` the image is instead cut to
    the square around its content (:class:`ContentCrop`) and resized to ``image_size``.
    Output ``(3, image_size, image_size)``.
    """
    interpolation = _interpolation(preprocessing)
    if preprocessing.content_crop:
        steps: list[Callable] = [ContentCrop(preprocessing.content_margin),
                                 T.Resize((image_size, image_size), interpolation=interpolation, antialias=True)]
    else:
        resize = round(image_size * preprocessing.resize_size / preprocessing.crop_size)
        steps = [T.Resize(resize, interpolation=interpolation, antialias=True), T.CenterCrop(image_size)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(preprocessing.mean, preprocessing.std)])


def three_crop_eval_transform(preprocessing: Preprocessing, image_size: int) -> Callable:
    """Resize the short side to ``image_size``, normalize, and cut three squares along the long side.

    Use with :func:`recognite.utils.collate_three_crops` and
    :func:`recognite.utils.embeddings_three_crops`. Output ``(3, 3, image_size, image_size)``:
    the crops at the start, centre and end of the long side. With ``preprocessing.content_crop``
    the image is first cut to the square around its content (so the three crops coincide).
    """
    from recognite.utils import ThreeCrop

    steps: list[Callable] = [ContentCrop(preprocessing.content_margin)] if preprocessing.content_crop else []
    return T.Compose(
        steps + [
            T.Resize(image_size, interpolation=_interpolation(preprocessing), antialias=True),
            T.ToTensor(),
            T.Normalize(preprocessing.mean, preprocessing.std),
            ThreeCrop(),
        ]
    )

