"""Gallery index: enrol labelled reference embeddings, search them, recognize or reject queries."""

from recognite.gallery.index import (
    AGGREGATIONS,
    BACKENDS,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_NPROBE,
    GalleryIndex,
    SearchResult,
)
from recognite.gallery.open_set import UNKNOWN, RecognitionResult, open_set_predictions

__all__ = [
    "AGGREGATIONS",
    "BACKENDS",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_NPROBE",
    "GalleryIndex",
    "RecognitionResult",
    "SearchResult",
    "UNKNOWN",
    "open_set_predictions",
]
