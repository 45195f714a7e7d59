"""Rotated copies of every training image as new classes.

For objects whose rotated version is a different thing (handwritten characters, symbols, logos),
each of the 90°, 180° and 270° rotations of a class can be trained on as a class of its own. This
multiplies the number of training classes, which is what open-set recognition learns from: the
Omniglot literature trains on the 964 background characters in four rotations (Vinyals et al.
2016, Snell et al. 2017). See ``benchmarks/RESULTS.md`` for what it gives here.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .dataset import DataFrameDataset

__all__ = ["ROTATIONS", "RotationClasses"]

# Counter-clockwise rotations PIL does losslessly, by angle in degrees.
ROTATIONS: dict[int, Image.Transpose] = {
    90: Image.Transpose.ROTATE_90,
    180: Image.Transpose.ROTATE_180,
    270: Image.Transpose.ROTATE_270,
}


def _check_rotations(rotations: Sequence[int]) -> tuple[int, ...]:
    if isinstance(rotations, (str, bytes)) or not isinstance(rotations, Sequence):
        raise TypeError(f"rotations must be a sequence of angles, got {type(rotations).__name__}.")
    angles = tuple(rotations)
    bad = [a for a in angles if isinstance(a, bool) or a not in ROTATIONS]
    if not angles or bad or len(set(angles)) != len(angles):
        raise ValueError(
            f"rotations must be distinct angles from {sorted(ROTATIONS)} (at least one), got {list(angles)}."
        )
    return angles


class RotationClasses(Dataset):
    """A labelled image dataset plus its images rotated by 90°, 180° and/or 270° as new classes.

    Item ``r * N + i`` (``N = len(dataset)``) is row ``i`` rotated by ``(0, *rotations)[r]``
    degrees counter-clockwise, *before* the dataset's transform (so random crops and affine
    augmentation apply to the rotated image as usual). Its label is the row's label plus
    ``r * C``, where ``C`` is the number of labels of ``dataset``: the original classes keep
    their integers ``0..C-1`` and the rotated copies of class ``c`` are ``c + C``, ``c + 2C``...
    Rotated classes are named ``"<label>@rot<angle>"`` (e.g. ``"a@rot90"``).

    Args:
        dataset: The training set; its ``label_to_int`` must map its labels to ``0..C-1``.
        rotations: Angles in degrees, distinct, each one of 90, 180, 270.

    Attributes:
        dataset: The wrapped dataset.
        rotations: The angles, original (0) first: ``(0, *rotations)``.
        label_to_int: Original labels and the rotated classes' names, to ``0..(1 + R) * C - 1``.
        unique_labels: The keys of ``label_to_int``.

    Raises:
        TypeError: ``dataset`` is not a :class:`~recognite.data.DataFrameDataset` or
            ``rotations`` is not a sequence.
        ValueError: Bad angles, labels not numbered ``0..C-1``, or a rotated class's name is
            already a label of ``dataset``.
    """

    def __init__(self, dataset: DataFrameDataset, rotations: Sequence[int] = (90, 180, 270)) -> None:
        if not isinstance(dataset, DataFrameDataset):
            raise TypeError(f"dataset must be a DataFrameDataset, got {type(dataset).__name__}.")
        angles = _check_rotations(rotations)
        base = {label: dataset.label_to_int[label] for label in dataset.unique_labels}
        num_labels = len(base)
        if sorted(base.values()) != list(range(num_labels)):
            raise ValueError(
                f"RotationClasses needs the dataset's {num_labels} labels mapped to 0..{num_labels - 1}; "
                "build it with recognite.data.label_mapping."
            )
        label_to_int: dict[Hashable, int] = dict(base)
        for r, angle in enumerate(angles, start=1):
            for label, index in base.items():
                name = f"{label}@rot{angle}"
                if name in base:
                    raise ValueError(f"The rotated class name {name!r} is already a label of the dataset.")
                label_to_int[name] = index + r * num_labels
        self.dataset = dataset
        self.rotations = (0, *angles)
        self.label_to_int = label_to_int
        self.unique_labels = set(label_to_int)
        self._num_labels = num_labels

    def __len__(self) -> int:
        return len(self.rotations) * len(self.dataset)

    def __getitem__(self, idx: int) -> tuple[Any, int]:
        """Returns ``(image, int_label)`` of item ``idx``: a row of the dataset, rotated."""
        if not -len(self) <= idx < len(self):
            raise IndexError(f"index {idx} is out of range for {len(self)} items.")
        r, row = divmod(idx % len(self), len(self.dataset))
        image = self.dataset.load_image(row)
        if self.rotations[r]:
            image = image.transpose(ROTATIONS[self.rotations[r]])
        if self.dataset.transform is not None:
            image = self.dataset.transform(image)
        return image, self.dataset.int_label(row) + r * self._num_labels

    @property
    def int_labels(self) -> np.ndarray:
        """The integer label of every item, shape ``(len(self),)``, dtype int64."""
        base = self.dataset.int_labels
        return np.concatenate([base + r * self._num_labels for r in range(len(self.rotations))])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.dataset!r}, rotations={list(self.rotations[1:])})"
