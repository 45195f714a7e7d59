"""Image transforms for training and evaluation, built from a backbone's preprocessing."""

from __future__ import annotations

from collections.abc import Callable

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from recognite.model.backbones import Preprocessing


def _interpolation(preprocessing: Preprocessing) -> InterpolationMode:
    return InterpolationMode(preprocessing.interpolation)


def train_transform(
    preprocessing: Preprocessing,
    image_size: int,
    scale: tuple[float, float] = (0.25, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.0,
) -> Callable:
    """Random-resized crop (+ optional horizontal flip), to tensor, normalize.

    Args:
        preprocessing: Mean / std / interpolation of the backbone's weights.
        image_size: Output side S; images come out ``(3, S, S)``.
        scale: Area range of the random crop, as a fraction of the image.
        ratio: Aspect-ratio range of the random crop.
        hflip: Probability of a horizontal flip.
    """
    steps: list[Callable] = [
        T.RandomResizedCrop(image_size, scale=scale, ratio=ratio, interpolation=_interpolation(preprocessing), antialias=True)
    ]
    if hflip > 0:
        steps.append(T.RandomHorizontalFlip(hflip))
    steps += [T.ToTensor(), T.Normalize(preprocessing.mean, preprocessing.std)]
    return T.Compose(steps)


def eval_transform(preprocessing: Preprocessing, image_size: int) -> Callable:
    """Resize the short side and centre-crop, keeping the weights' resize/crop proportion.

    For weights evaluated with resize 256 → crop 224 and ``image_size=112`` the image is resized
    to 128 and cropped to 112. Output ``(3, image_size, image_size)``.
    """
    resize = round(image_size * preprocessing.resize_size / preprocessing.crop_size)
    return T.Compose(
        [
            T.Resize(resize, interpolation=_interpolation(preprocessing), antialias=True),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(preprocessing.mean, preprocessing.std),
        ]
    )


def three_crop_eval_transform(preprocessing: Preprocessing, image_size: int) -> Callable:
    """Resize the short side to ``image_size``, normalize, and cut three squares along the long side.

    Use with :func:`recognite.utils.collate_three_crops` and
    :func:`recognite.utils.embeddings_three_crops`. Output ``(3, 3, image_size, image_size)``:
    the crops at the start, centre and end of the long side.
    """
    from recognite.utils import ThreeCrop

    return T.Compose(
        [
            T.Resize(image_size, interpolation=_interpolation(preprocessing), antialias=True),
            T.ToTensor(),
            T.Normalize(preprocessing.mean, preprocessing.std),
            ThreeCrop(),
        ]
    )
