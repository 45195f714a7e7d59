"""Three-crop test-time augmentation: three square crops along the long side of an image."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from recognite.utils.views import collate_views, embeddings_of_views

__all__ = [
    "ThreeCrop",
    "collate_three_crops",
    "collate_with_three_crops",
    "embeddings_three_crops",
    "get_embeddings_three_crops",
    "three_crop",
]


def three_crop(img: torch.Tensor) -> torch.Tensor:
    """Three ``S x S`` crops of an image, ``S`` = its short side.

    The crops sit at the start, the centre and the end of the long side (left/centre/right for a
    landscape image, top/centre/bottom for a portrait one). The centre offset is
    ``round((L - S) / 2)`` as in ``torchvision.transforms.functional.center_crop``. A square image
    gives three identical crops.

    Args:
        img: ``(C, H, W)`` image tensor.

    Returns:
        ``(3, C, S, S)`` tensor.

    Example:
        >>> img = torch.arange(8.0).reshape(1, 2, 4)
        >>> three_crop(img)[:, 0].tolist()
        [[[0.0, 1.0], [4.0, 5.0]], [[1.0, 2.0], [5.0, 6.0]], [[2.0, 3.0], [6.0, 7.0]]]
    """
    if not isinstance(img, torch.Tensor):
        raise TypeError(
            f"three_crop expects a (C, H, W) image tensor, got {type(img).__name__}; "
            f"apply transforms.ToTensor() / PILToTensor() first"
        )
    if img.dim() != 3:
        raise ValueError(f"three_crop expects a (C, H, W) image tensor, got shape {tuple(img.shape)}")
    _, height, width = img.shape
    side = min(height, width)
    long_side = max(height, width)
    offsets = (0, int(round((long_side - side) / 2.0)), long_side - side)
    if width >= height:
        crops = [img[:, :, start : start + side] for start in offsets]
    else:
        crops = [img[:, start : start + side, :] for start in offsets]
    return torch.stack(crops)


class ThreeCrop:
    """Transform wrapping :func:`three_crop`: ``(C, H, W)`` -> ``(3, C, S, S)``.

    Use it last in a ``transforms.Compose`` of a validation/query dataset, together with
    :func:`collate_three_crops` and :func:`embeddings_three_crops`.
    """

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return three_crop(img)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}()"


def collate_three_crops(batch: Sequence[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate ``(crops (3, C, S, S), label)`` samples into ``(B, 3, C, S, S)`` and ``(B,)`` labels
    (:func:`recognite.utils.views.collate_views` with three views).

    Example:
        >>> batch = [(torch.zeros(3, 1, 2, 2), 4), (torch.ones(3, 1, 2, 2), 7)]
        >>> images, labels = collate_three_crops(batch)
        >>> tuple(images.shape), labels.tolist()
        ((2, 3, 1, 2, 2), [4, 7])
    """
    return collate_views(batch, num_views=3, name="collate_three_crops", hint="use ThreeCrop")


def embeddings_three_crops(
    model: nn.Module, batch: torch.Tensor, normalize: bool = False
) -> torch.Tensor:
    """Mean embedding of the three crops of every image
    (:func:`recognite.utils.views.embeddings_of_views` with three views).

    The model runs once on all ``B * 3`` crops; its ``(B * 3, D)`` output is reshaped to
    ``(B, 3, D)`` and averaged over the crops. Usable as ``get_embeddings_fn`` of
    :func:`recognite.eval.score_matrix`.

    Args:
        model: maps ``(N, C, S, S)`` images to ``(N, D)`` embeddings (any ``(N, ...)`` output works:
            the mean is taken over the crops of each image, whatever the trailing shape).
        batch: ``(B, 3, C, S, S)`` crops from :func:`collate_three_crops`.
        normalize: re-normalize the mean to unit L2 norm (default ``False``: the plain mean of the
            crop embeddings, which are unit-norm for a ``Recognizer``; the mean of unit vectors has
            norm ``<= 1``).

    Returns:
        ``(B, D)`` embeddings (``(B, ...)`` for other output shapes).
    """
    return embeddings_of_views(model, batch, normalize=normalize, num_views=3)


collate_with_three_crops = collate_three_crops
"""Alias of :func:`collate_three_crops` (name used in the earlier release's guide)."""
get_embeddings_three_crops = embeddings_three_crops
"""Alias of :func:`embeddings_three_crops` (name used in the earlier release's guide)."""
