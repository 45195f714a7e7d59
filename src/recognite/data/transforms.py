"""Image transforms for training and evaluation, built from a backbone's preprocessing."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageChops
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from recognite.preprocessing import Preprocessing
from recognite.utils.validate import check_int

# A pixel belongs to the content when any channel differs from the border colour by more than this.
CONTENT_TOLERANCE = 32
_EIGHT_BIT_MODES = ("L", "LA", "RGB", "RGBA")


def _interpolation(preprocessing: Preprocessing) -> InterpolationMode:
    return InterpolationMode(preprocessing.interpolation)


def _eight_bit(image: Image.Image) -> Image.Image:
    """The image itself in an 8-bit mode; binary and 16/32-bit grey images as ``L``, others as ``RGB``."""
    if image.mode in _EIGHT_BIT_MODES:
        return image
    return image.convert("L" if image.mode in ("1", "I", "I;16", "F") else "RGB")


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
        image = _eight_bit(image)
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


class RandomElasticOnBorder:
    """Random smooth (elastic) distortion that fills uncovered pixels with the border colour.

    Every pixel moves by a random displacement field: independent uniform displacements in
    ``[-magnitude, magnitude]`` (a fraction of the image side) at the nodes of a ``grid`` x ``grid``
    lattice spanning the image, interpolated bicubically in between. This imitates the variation
    between two drawings of one handwritten character (Simard et al. 2003 smooth a per-pixel field
    with a Gaussian instead, which costs far more on a CPU). Pixels pulled in from outside the
    image get the image's own :func:`border_color`.

    Args:
        magnitude: Largest displacement at a lattice node, as a fraction of the side, in [0, 1].
        grid: Lattice nodes per side, >= 2 (2: an almost affine warp; more: more local wobble).
        interpolation: Resampling mode.

    Raises:
        ValueError: ``magnitude`` outside [0, 1] or ``grid < 2``.
    """

    def __init__(self, magnitude: float, grid: int = 4, interpolation: InterpolationMode = InterpolationMode.BILINEAR) -> None:
        if not 0.0 <= magnitude <= 1.0:
            raise ValueError(f"magnitude is a fraction of the image side in [0, 1], got {magnitude}.")
        check_int(grid, "grid", minimum=2, message=f"grid must be an integer >= 2 (lattice nodes per side), got {grid!r}.")
        self.magnitude, self.grid, self.interpolation = magnitude, grid, interpolation

    def displacement(self, height: int, width: int) -> torch.Tensor:
        """A random field ``(1, height, width, 2)`` of (x, y) displacements in grid_sample's [-1, 1] units."""
        nodes = (torch.rand(1, 2, self.grid, self.grid) * 2 - 1) * (2 * self.magnitude)  # side = 2 units
        field = F.interpolate(nodes, size=(height, width), mode="bicubic", align_corners=True)
        return field.permute(0, 2, 3, 1)

    def __call__(self, image: Image.Image) -> Image.Image:
        image = _eight_bit(image)
        # Warp the difference from the border colour with zero padding, so that whatever comes from
        # outside the image, fully or blended at the edge, is exactly the border colour.
        # (torchvision's elastic_transform blends its fill in twice and darkens the edges.)
        fill = torch.tensor(border_color(image), dtype=torch.float32).view(-1, 1, 1)
        pixels = TF.pil_to_tensor(image).float() - fill  # (C, H, W)
        height, width = pixels.shape[1:]
        ys = (2 * torch.arange(height, dtype=torch.float32) + 1) / height - 1  # pixel centres in [-1, 1]
        xs = (2 * torch.arange(width, dtype=torch.float32) + 1) / width - 1
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]  # (1, H, W, 2) as (x, y)
        mode = "nearest" if self.interpolation == InterpolationMode.NEAREST else "bilinear"
        warped = F.grid_sample(pixels[None], grid + self.displacement(height, width), mode=mode,
                               padding_mode="zeros", align_corners=False)[0] + fill
        return TF.to_pil_image(warped.round().clamp(0, 255).to(torch.uint8), mode=image.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(magnitude={self.magnitude}, grid={self.grid})"


def train_transform(
    preprocessing: Preprocessing,
    image_size: int,
    scale: tuple[float, float] = (0.25, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.0,
    affine: RandomAffineOnBorder | None = None,
    elastic: RandomElasticOnBorder | None = None,
) -> Callable:
    """[Content crop,] random-resized crop, [random affine,] [elastic,] [horizontal flip,] to tensor, normalize.

    Args:
        preprocessing: Mean / std / interpolation of the backbone's weights; with
            ``preprocessing.content_crop`` every image is first cut to the square around its
            content (:class:`ContentCrop`).
        image_size: Output side S; images come out ``(3, S, S)``.
        scale: Area range of the random crop, as a fraction of the image.
        ratio: Aspect-ratio range of the random crop.
        hflip: Probability of a horizontal flip.
        affine: Optional random affine applied after the crop.
        elastic: Optional random elastic distortion applied after the affine, at ``image_size``.
    """
    steps: list[Callable] = []
    if preprocessing.content_crop:
        steps.append(ContentCrop(preprocessing.content_margin))
    steps.append(
        T.RandomResizedCrop(image_size, scale=scale, ratio=ratio, interpolation=_interpolation(preprocessing), antialias=True)
    )
    if affine is not None:
        steps.append(affine)
    if elastic is not None:
        steps.append(elastic)
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

