"""A torch ``Dataset`` over a DataFrame of image paths and labels."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from torch.utils.data import Dataset

from recognite.data.images import read_image

from ._checks import check_column, check_dataframe

__all__ = ["DataFrameDataset"]


class DataFrameDataset(Dataset):
    """Images and integer labels listed in a DataFrame.

    ``ds[i]`` opens the image at ``df[image_key].iloc[i]`` with PIL, converts it
    to ``image_mode`` (RGB by default, so grayscale, palette and RGBA files all
    come out with 3 bands), passes it through ``transform`` when given, and
    returns it with ``label_to_int[df[label_key].iloc[i]]``.

    Image paths are opened as they are: relative paths resolve against the
    current working directory. :func:`recognite.data.load_csv` and
    :func:`recognite.data.train_val_datasets` store absolute paths, so their
    datasets work from any directory.

    Attributes:
        df: The DataFrame (not copied); rows are addressed by position.
        label_key: Column with the labels.
        image_key: Column with the image paths.
        label_to_int: Mapping from label value to class index.
        transform: Callable applied to the PIL image, or ``None``.
        image_mode: PIL mode the image is converted to, or ``None`` to keep
            the file's own mode.
        unique_labels: The set of label values in ``df``.

    Args:
        df: One row per image.
        label_key: Column with the labels.
        image_key: Column with the image paths.
        label_to_int: Mapping from every label in ``df`` to an integer.
        transform: Optional callable applied to each PIL image (e.g. a
            torchvision transform that returns a ``(C, H, W)`` tensor).
        image_mode: PIL mode to convert to (``'RGB'``, ``'L'``, ...); ``None``
            keeps the mode of the file.

    Raises:
        TypeError: ``df`` is not a DataFrame, ``label_to_int`` is not a
            mapping or ``transform`` is not callable.
        ValueError: A column is missing or a label of ``df`` has no entry in
            ``label_to_int``.
    """

    def __init__(
        self,
        df: pd.DataFrame,
        label_key: str,
        image_key: str,
        label_to_int: Mapping[Hashable, int],
        transform: Callable[[Image.Image], Any] | None = None,
        image_mode: str | None = "RGB",
    ) -> None:
        check_dataframe(df)
        check_column(df, label_key, "label_key")
        check_column(df, image_key, "image_key")
        if not isinstance(label_to_int, Mapping):
            raise TypeError(
                "label_to_int must be a mapping from label to int, got "
                f"{type(label_to_int).__name__}."
            )
        if transform is not None and not callable(transform):
            raise TypeError(
                f"transform must be callable or None, got {type(transform).__name__}."
            )
        unique_labels = set(df[label_key].unique().tolist())
        unmapped = [lab for lab in unique_labels if lab not in label_to_int]
        if unmapped:
            examples = sorted(unmapped, key=repr)[:5]
            raise ValueError(
                f"{len(unmapped)} labels of column {label_key!r} have no entry in "
                f"label_to_int, e.g. {examples}."
            )

        self.df = df
        self.label_key = label_key
        self.image_key = image_key
        self.label_to_int = label_to_int
        self.transform = transform
        self.image_mode = image_mode
        self.unique_labels = unique_labels

    def __len__(self) -> int:
        return len(self.df)

    def __getitem__(self, idx: int) -> tuple[Any, int]:
        """Returns ``(image, int_label)`` of row ``idx`` (by position)."""
        image = self.load_image(idx)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.int_label(idx)

    def load_image(self, idx: int) -> Image.Image:
        """The PIL image of row ``idx`` (by position), in ``image_mode``, before ``transform``."""
        return read_image(self.df[self.image_key].iloc[idx], mode=self.image_mode)

    def int_label(self, idx: int) -> int:
        """The integer label of row ``idx`` (by position)."""
        return int(self.label_to_int[self.df[self.label_key].iloc[idx]])

    @property
    def int_labels(self) -> np.ndarray:
        """The integer label of every row, shape ``(N,)``, dtype int64.

        Read without opening any image (e.g. for class-balanced samplers).
        """
        labels = self.df[self.label_key]
        return np.fromiter(
            (self.label_to_int[lab] for lab in labels), dtype=np.int64, count=len(labels)
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_images={len(self)}, "
            f"num_labels={len(self.unique_labels)}, image_key={self.image_key!r}, "
            f"label_key={self.label_key!r}, image_mode={self.image_mode!r}, "
            f"transform={self.transform!r})"
        )
