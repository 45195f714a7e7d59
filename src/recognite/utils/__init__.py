"""Utilities: averaged reference embeddings, running extrema and three-crop test-time augmentation."""

from .avg_ref_embs import avg_ref_embs
from .running_extrema import MAX, MIN, RunningExtrema
from .three_crop import (
    ThreeCrop,
    collate_three_crops,
    collate_with_three_crops,
    embeddings_three_crops,
    get_embeddings_three_crops,
    three_crop,
)

__all__ = [
    "MAX",
    "MIN",
    "RunningExtrema",
    "ThreeCrop",
    "avg_ref_embs",
    "collate_three_crops",
    "collate_with_three_crops",
    "embeddings_three_crops",
    "get_embeddings_three_crops",
    "three_crop",
]
