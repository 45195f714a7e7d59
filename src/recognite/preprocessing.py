"""How images are prepared for a network: the :class:`Preprocessing` record (foundation layer).

It knows no network: a model or a bundle names its preprocessing (torchvision's weight enums
point at their transform presets the same way), and ``recognite.data.transforms`` turns it
into transforms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from recognite.utils.validate import check_choice, check_int, check_number

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Preprocessing"]

# Used only when the weights do not carry their own preprocessing (no weights, or a local file).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MAX_SIDE = 4096
"""Largest crop / resize side accepted from a file (a larger one asks for gigabytes per image)."""

INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")
"""Resize interpolation names (torchvision's ``InterpolationMode`` values)."""


@dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for a backbone.

    Attributes:
        mean: Per-channel mean subtracted after scaling pixels to [0, 1].
        std: Per-channel standard deviation divided by.
        crop_size: Side of the square input the weights were evaluated at.
        resize_size: Side the short edge is resized to before the centre crop.
        interpolation: Name of the resize interpolation mode (e.g. ``"bilinear"``).
        content_crop: Crop each image to the square around its content (the pixels that differ
            from the border colour) before resizing, instead of the centre crop. Set by training
            with ``--content-crop``; stored in checkpoints and bundles so that recognition
            prepares images the same way.
        content_margin: Margin added around the content box, as a fraction of its longer side.
    """

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_size: int = 224
    resize_size: int = 256
    interpolation: str = "bilinear"
    content_crop: bool = False
    content_margin: float = 0.05

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_size": self.crop_size,
            "resize_size": self.resize_size,
            "interpolation": self.interpolation,
            "content_crop": self.content_crop,
            "content_margin": self.content_margin,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "preprocessing") -> Preprocessing:
        """Read :meth:`to_dict` output back, checking every entry.

        Raises:
            ValueError: A missing or bad entry; the message names ``source`` and the key.
        """
        if not isinstance(d, dict):
            raise ValueError(f"{source}: preprocessing must be an object, got {d!r}.")
        try:
            values = {
                "mean": _channels(d["mean"], "mean"),
                "std": _channels(d["std"], "std", positive=True),
                "crop_size": check_int(d["crop_size"], "crop_size", 1, MAX_SIDE),
                "resize_size": check_int(d["resize_size"], "resize_size", 1, MAX_SIDE),
                "interpolation": check_choice(d["interpolation"], "interpolation", INTERPOLATIONS),
                "content_crop": _boolean(d.get("content_crop", False), "content_crop"),
                "content_margin": check_number(d.get("content_margin", 0.05), "content_margin", 0.0, 1.0),
            }
        except KeyError as exc:
            raise ValueError(f"{source}: preprocessing lacks the entry {exc.args[0]!r}.") from exc
        except ValueError as exc:
            raise ValueError(f"{source}: preprocessing {exc}") from exc
        return cls(**values)


def _channels(value: Any, name: str, positive: bool = False) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(f"{name} must be a list of 3 numbers (one per RGB channel), got {value!r}.")
    numbers = tuple(check_number(v, name) for v in value)
    if positive and min(numbers) <= 0:
        raise ValueError(f"{name} must be > 0 for every channel, got {list(numbers)}.")
    return numbers


def _boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}.")
    return value
