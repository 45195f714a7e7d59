"""Test-time augmentation: the mean embedding of K deterministic views of each image.

A :class:`ViewSpec` lists the views of a ``(C, S, S)`` network input: the image itself, shifts by
a fraction of its side in the four directions, rescalings about its centre (zoom in: crop and
resize; zoom out: shrink and pad with the border), rotations about its centre (the border
repeats the edge), and the horizontal mirror of each (only where training used flips). :class:`MakeViews` turns one input into ``(K, C, S, S)``;
:func:`collate_views` and :func:`embeddings_of_views` batch them and average the K embeddings
(re-normalized). The three-crop validation of :mod:`recognite.utils.three_crop` is the case "three
crops along the long side" of the same mechanism (it goes through these two functions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recognite.utils.validate import InvalidTypeError, check_number

__all__ = ["ENROLMENT_SCORINGS", "EnrolmentAugmentation", "MakeViews", "ViewSpec", "collate_views",
           "embeddings_of_views", "make_views"]

#: How a reference enrolled as several views is scored: its best view, or their mean (prototype).
ENROLMENT_SCORINGS = ("max", "mean")


@dataclass(frozen=True)
class ViewSpec:
    """Which views of an image are embedded and averaged.

    Attributes:
        shift: Shift as a fraction of the side (e.g. 0.05 = 5 %): adds four views, moved left,
            right, up and down (the uncovered border repeats the edge pixels). 0 = none.
        scales: Rescalings about the centre (e.g. ``(0.9, 1.1)``), one view each; 1 is the image.
        hflip: Also the mirror image of every view (doubles K); only for models trained with flips.
        rotations: Rotations about the centre in degrees, counter-clockwise (e.g. ``(-10, 10)``),
            one view each.
    """

    shift: float = 0.0
    scales: tuple[float, ...] = ()
    hflip: bool = False
    rotations: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        check_number(self.shift, "shift", minimum=0.0, maximum=0.5)
        if not isinstance(self.scales, (tuple, list)):
            raise InvalidTypeError(f"scales must be a list of numbers, got {self.scales!r}")
        object.__setattr__(self, "scales", tuple(check_number(s, "scales", minimum=0.25, maximum=4.0)
                                                 for s in self.scales))
        if not isinstance(self.hflip, bool):
            raise InvalidTypeError(f"hflip must be True or False, got {self.hflip!r}")
        if not isinstance(self.rotations, (tuple, list)):
            raise InvalidTypeError(f"rotations must be a list of numbers, got {self.rotations!r}")
        object.__setattr__(self, "rotations", tuple(check_number(r, "rotations", minimum=-180.0, maximum=180.0)
                                                    for r in self.rotations))

    @property
    def num_views(self) -> int:
        """K: the number of views per image (1 = no augmentation)."""
        return (1 + (4 if self.shift else 0) + len(self.scales) + len(self.rotations)) * (2 if self.hflip else 1)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"shift": self.shift, "scales": list(self.scales), "hflip": self.hflip}
        if self.rotations:  # written only when used: earlier bundles keep their bytes and digest
            out["rotations"] = list(self.rotations)
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str = "the views") -> ViewSpec:
        if not isinstance(data, dict) or set(data) - {"shift", "scales", "hflip", "rotations"}:
            raise ValueError(f"{source} must be a dict with keys shift, scales, hflip, rotations; got {data!r}")
        return cls(shift=data.get("shift", 0.0), scales=tuple(data.get("scales", ())), hflip=data.get("hflip", False),
                   rotations=tuple(data.get("rotations", ())))


@dataclass(frozen=True)
class EnrolmentAugmentation:
    """Enrolment augmentation: every reference enrolled as the views of ``views``.

    Attributes:
        views: The views of each reference image (a :class:`ViewSpec` with ``num_views > 1``).
        scoring: ``'max'``: each view is a gallery row and a reference scores its best view;
            ``'mean'``: one row per reference, the re-normalized mean of its views (a prototype).
    """

    views: ViewSpec
    scoring: str = "max"

    def __post_init__(self) -> None:
        if not isinstance(self.views, ViewSpec) or self.views.num_views < 2:
            raise ValueError(f"views must be a ViewSpec with at least 2 views, got {self.views!r}")
        if self.scoring not in ENROLMENT_SCORINGS:
            raise ValueError(f"scoring must be one of {ENROLMENT_SCORINGS}, got {self.scoring!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"views": self.views.to_dict(), "scoring": self.scoring}

    @classmethod
    def from_dict(cls, data: Any, source: str = "enrolment_augmentation") -> EnrolmentAugmentation:
        if not isinstance(data, dict) or set(data) != {"views", "scoring"}:
            raise ValueError(f"{source} must be a dict with keys views, scoring; got {data!r}")
        return cls(ViewSpec.from_dict(data["views"], f"{source}.views"), data["scoring"])


def _shifted(img: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """``img`` moved by ``dx`` columns right and ``dy`` rows down; the border repeats the edge."""
    _, height, width = img.shape
    pad = (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0))  # left, right, top, bottom
    padded = F.pad(img.unsqueeze(0), pad, mode="replicate").squeeze(0)
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[:, top : top + height, left : left + width]


def _rescaled(img: torch.Tensor, scale: float) -> torch.Tensor:
    """``img`` zoomed by ``scale`` about its centre, same size (zoom out pads with the edge)."""
    _, height, width = img.shape
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    resized = F.interpolate(img.unsqueeze(0), size=(new_h, new_w), mode="bilinear", align_corners=False,
                            antialias=scale < 1).squeeze(0)
    if scale >= 1:
        top, left = (new_h - height) // 2, (new_w - width) // 2
        return resized[:, top : top + height, left : left + width]
    pad_h, pad_w = height - new_h, width - new_w
    pad = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
    return F.pad(resized.unsqueeze(0), pad, mode="replicate").squeeze(0)


def _rotated(img: torch.Tensor, degrees: float) -> torch.Tensor:
    """``img`` rotated counter-clockwise by ``degrees`` about its centre (bilinear; the border repeats the edge)."""
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    _, height, width = img.shape
    # affine_grid maps output to input coordinates in [-1, 1]; the aspect ratio keeps the turn rigid
    theta = torch.tensor([[cos, -sin * height / width, 0.0], [sin * width / height, cos, 0.0]],
                         dtype=img.dtype if img.dtype.is_floating_point else torch.float32, device=img.device)
    grid = F.affine_grid(theta.unsqueeze(0), [1, *img.shape], align_corners=False)
    return F.grid_sample(img.unsqueeze(0).to(theta.dtype), grid, mode="bilinear", padding_mode="border",
                         align_corners=False).squeeze(0).to(img.dtype)


def make_views(img: torch.Tensor, spec: ViewSpec) -> torch.Tensor:
    """``(C, H, W)`` -> ``(K, C, H, W)``: the image, its shifts, its rescalings, its rotations
    (then all mirrored).

    Example:
        >>> img = torch.arange(9.0).reshape(1, 3, 3)
        >>> views = make_views(img, ViewSpec(shift=0.34))
        >>> views.shape, views[1, 0].tolist()  # the second view: moved one column left
        (torch.Size([5, 1, 3, 3]), [[1.0, 2.0, 2.0], [4.0, 5.0, 5.0], [7.0, 8.0, 8.0]])
    """
    if not isinstance(img, torch.Tensor) or img.dim() != 3:
        raise ValueError(f"make_views expects a (C, H, W) image tensor, got {getattr(img, 'shape', type(img).__name__)}")
    views = [img]
    if spec.shift:
        step = max(1, round(spec.shift * min(img.shape[1:])))
        views += [_shifted(img, dx, dy) for dx, dy in ((-step, 0), (step, 0), (0, -step), (0, step))]
    views += [_rescaled(img, scale) for scale in spec.scales]
    views += [_rotated(img, degrees) for degrees in spec.rotations]
    if spec.hflip:
        views += [view.flip(-1) for view in views]
    return torch.stack(views)


class MakeViews:
    """Transform: ``(C, S, S)`` -> ``(K, C, S, S)`` views (put it last, after normalization)."""

    def __init__(self, spec: ViewSpec) -> None:
        self.spec = spec

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return make_views(img, self.spec)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.spec})"


def collate_views(batch: Sequence[tuple[torch.Tensor, Any]], num_views: int | None = None,
                  name: str = "collate_views", hint: str = "use MakeViews") -> tuple[torch.Tensor, torch.Tensor]:
    """Collate ``(views (K, C, S, S), label)`` samples into ``(B, K, C, S, S)`` and ``(B,)`` labels."""
    if len(batch) == 0:
        raise ValueError(f"{name} got an empty batch")
    images, labels = zip(*((sample[0], sample[1]) for sample in batch))
    expected = num_views if num_views is not None else getattr(images[0], "shape", (None,))[0]
    for position, image in enumerate(images):
        if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[0] != expected:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"{name} expects ({expected}, C, S, S) views per sample ({hint}); "
                             f"sample {position} has {shape}")
    return torch.stack(images), torch.stack([torch.as_tensor(label) for label in labels])


def embeddings_of_views(model: nn.Module, batch: torch.Tensor, normalize: bool = True,
                        num_views: int | None = None) -> torch.Tensor:
    """Mean embedding of the K views of every image: one forward pass on all ``B * K`` views.

    Args:
        model: maps ``(N, C, S, S)`` images to ``(N, ...)`` outputs.
        batch: ``(B, K, C, S, S)`` views from :func:`collate_views`.
        normalize: re-normalize the mean to unit L2 norm (the mean of unit vectors is shorter).
        num_views: the K expected (None = any).

    Returns:
        ``(B, ...)``: the mean over each image's views.
    """
    if not isinstance(batch, torch.Tensor) or batch.dim() != 5 or (num_views is not None and batch.shape[1] != num_views):
        shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
        views = num_views if num_views is not None else "K"
        raise ValueError(f"batch must have shape (B, {views}, C, S, S), got {shape}")
    num_images, k = batch.shape[:2]
    embeddings = model(batch.reshape(num_images * k, *batch.shape[2:]))
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() < 1 or embeddings.shape[0] != num_images * k:
        raise ValueError("model must return a tensor with one row per view, (N, ...) for (N, C, S, S) images")
    mean = embeddings.reshape(num_images, k, *embeddings.shape[1:]).mean(dim=1)
    if not normalize:
        return mean
    return F.normalize(mean.reshape(num_images, -1), dim=1).reshape(mean.shape)
