"""Embedding models built from torchvision classification networks."""

from recognite.model.backbones import (
    SUPPORTED_MODELS,
    Preprocessing,
    WeightsUnavailableError,
)
from recognite.model.classifier_ops import (
    get_module_at_path,
    get_path_to_ultimate_classifier,
    get_ultimate_classifier,
    set_module_at_path,
    split_backbone_classifier,
    update_classifier,
)
from recognite.model.recognizer import Recognizer

__all__ = [
    "SUPPORTED_MODELS",
    "Preprocessing",
    "Recognizer",
    "WeightsUnavailableError",
    "get_module_at_path",
    "get_path_to_ultimate_classifier",
    "get_ultimate_classifier",
    "set_module_at_path",
    "split_backbone_classifier",
    "update_classifier",
]
