"""The torchvision backbones that :class:`~recognite.model.Recognizer` accepts, and their weights.

``SUPPORTED_MODELS`` is derived from torchvision's own model registry: every classification
model (``torchvision.models.list_models(module=torchvision.models)``) except the families whose
head does not end in a linear layer (SqueezeNet ends in a 1×1 convolution). A slow test builds
every registered model and checks this rule.
"""

from __future__ import annotations

import difflib
import logging
import os
import urllib.parse
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models import (
    WeightsEnum,
    get_model_builder,
    get_model_weights,
    list_models,
)

from recognite.model._timm import (  # noqa: F401 (re-exported)
    WeightsUnavailableError,
    check_timm_name,
    is_timm,
    list_timm_models,
    timm_input_size_kwargs,
)
from recognite.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing  # noqa: F401 (0.1.0 names)

logger = logging.getLogger(__name__)

# Families in torchvision's classification registry whose head is not a final nn.Linear.
_NON_LINEAR_HEAD_FAMILIES = ("squeezenet",)



def _supported_models() -> list[str]:
    names = list_models(module=torchvision.models)
    return sorted(n for n in names if not n.startswith(_NON_LINEAR_HEAD_FAMILIES))


SUPPORTED_MODELS: list[str] = _supported_models()


def check_model_name(model_name: str) -> None:
    """Raise a ``ValueError`` with close matches if ``model_name`` is not supported.

    Names ``timm/<architecture>[.<tag>]`` are timm models (the optional extra ``recognite[timm]``).
    """
    if model_name in SUPPORTED_MODELS:
        return
    if is_timm(model_name):
        check_timm_name(model_name)
        return
    matches = difflib.get_close_matches(str(model_name), SUPPORTED_MODELS, n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(matches)}?" if matches else ""
    raise ValueError(
        f"Unknown model {model_name!r}.{hint} See recognite.model.SUPPORTED_MODELS "
        f"({len(SUPPORTED_MODELS)} torchvision classification models) or run `recognite models`."
    )


def _looks_like_path(weights: str) -> bool:
    return (
        os.sep in weights
        or "/" in weights
        or weights.endswith((".pth", ".pt", ".bin", ".ckpt", ".safetensors"))
        or os.path.exists(weights)
    )


def resolve_weights(model_name: str, weights: Any) -> WeightsEnum | Path | None:
    """Turn a ``weights`` argument into a torchvision weights enum member or a local file path.

    Args:
        model_name: A name in ``SUPPORTED_MODELS``.
        weights: ``None``; a weights enum member; a string torchvision's multi-weight API accepts
            (``"DEFAULT"``, ``"IMAGENET1K_V1"``, ``"ResNet50_Weights.IMAGENET1K_V2"``); or a path
            (``str`` or ``os.PathLike``) to a local checkpoint file.

    Returns:
        ``None``, the enum member, or the ``Path`` of an existing local file.

    Raises:
        ValueError: If the weights name is unknown for this model (lists the valid names).
        FileNotFoundError: If ``weights`` looks like a path but the file does not exist.
    """
    if weights is None:
        return None
    weights_enum = get_model_weights(model_name)
    if isinstance(weights, os.PathLike) or (isinstance(weights, str) and _looks_like_path(weights)):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights={str(weights)!r} looks like a file path, but no such file exists.")
        return path
    if isinstance(weights, Enum):
        if not isinstance(weights, weights_enum):
            raise ValueError(
                f"weights={weights} belong to another model; {model_name!r} takes {weights_enum.__name__} "
                f"members: {', '.join(m for m in weights_enum.__members__)}."
            )
        return weights
    if isinstance(weights, str):
        member = weights.removeprefix(weights_enum.__name__ + ".")
        if member in weights_enum.__members__:
            return weights_enum[member]
        raise ValueError(
            f"Unknown weights {weights!r} for model {model_name!r}. Allowed: None, a path to a local "
            f"checkpoint file, or one of {', '.join(weights_enum.__members__)} "
            f"(optionally prefixed with '{weights_enum.__name__}.')."
        )
    raise TypeError(
        f"weights must be None, a string, a {weights_enum.__name__} member or a path; got {type(weights).__name__}."
    )


def hub_checkpoint_path(weights: WeightsEnum) -> Path:
    """Where torch's hub cache keeps (or would keep) the file of ``weights``."""
    filename = os.path.basename(urllib.parse.urlparse(weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def preprocessing_of(weights: WeightsEnum | Path | None) -> Preprocessing:
    """The preprocessing the weights were trained with (ImageNet statistics when unknown)."""
    if not isinstance(weights, WeightsEnum):
        return Preprocessing()
    transform = weights.transforms()
    crop = transform.crop_size[0] if isinstance(transform.crop_size, (list, tuple)) else transform.crop_size
    resize = transform.resize_size[0] if isinstance(transform.resize_size, (list, tuple)) else transform.resize_size
    return Preprocessing(
        mean=tuple(float(v) for v in transform.mean),
        std=tuple(float(v) for v in transform.std),
        crop_size=int(crop),
        resize_size=int(resize),
        interpolation=str(transform.interpolation.value),
    )


def _build_with_enum(builder: Callable[..., nn.Module], weights: WeightsEnum, **kwargs: Any) -> nn.Module:
    cached = hub_checkpoint_path(weights)
    if cached.is_file():
        logger.info("Loading %s from the torch hub cache %s", weights, cached)
        return builder(weights=weights, **kwargs)
    try:
        return builder(weights=weights, **kwargs)
    except Exception as exc:  # the download failed: network, proxy, disk ...
        raise WeightsUnavailableError(
            f"Could not download the pretrained weights {weights} ({type(exc).__name__}: {exc}). "
            f"Download the file {cached.name} from {weights.url} on a machine with internet access and "
            f"place it at {cached} (the torch hub cache: $TORCH_HOME/hub/checkpoints); it is then used "
            "without network."
        ) from exc


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a local checkpoint file.

    Accepts ``.safetensors`` files and ``torch.save`` files holding a state dict, or a dict that
    wraps one under ``'model'``, ``'state_dict'`` or ``'model_state_dict'`` (recognite training
    checkpoints are of that kind). A ``'module.'`` prefix (DistributedDataParallel) is removed.
    Pickled files are read with ``weights_only=True``, so loading runs no code from the file.

    Raises:
        ValueError: If the file holds no state dict.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"Could not read the checkpoint file {path}: {exc}") from exc
    if isinstance(state, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"The checkpoint file {path} does not hold a state dict of tensors.")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def build_network(model_name: str, weights: WeightsEnum | None, **model_kwargs: Any) -> nn.Module:
    """Build the torchvision network ``model_name``, loading ``weights`` (an enum member or None)."""
    check_model_name(model_name)
    builder = get_model_builder(model_name)
    if model_name in ("googlenet", "inception_v3") and weights is None:
        # Silence torchvision's FutureWarning about the slow scipy-based default init.
        model_kwargs.setdefault("init_weights", False)
    if weights is None:
        return builder(weights=None, **model_kwargs)
    if _is_vit(model_name) and "image_size" in model_kwargs:
        return _vit_at_size(builder, weights, **model_kwargs)
    return _build_with_enum(builder, weights, **model_kwargs)


def _is_vit(model_name: str) -> bool:
    return model_name.startswith("vit_")


def input_size_kwargs(model_name: str, image_size: int) -> dict[str, Any]:
    """Builder arguments a network needs to take ``image_size`` inputs (the one mechanism for input sizes).

    torchvision's ViTs fix their input side at build time (``image_size``, default 224), timm's
    fixed-size models (ViTs, Swin, ...) take ``img_size``; every other network takes any size.

    >>> input_size_kwargs("vit_b_16", 112), input_size_kwargs("vit_b_16", 224), input_size_kwargs("resnet18", 64)
    ({'image_size': 112}, {}, {})
    """
    if is_timm(model_name):
        return timm_input_size_kwargs(model_name, image_size)
    if _is_vit(model_name) and image_size != 224:
        return {"image_size": int(image_size)}
    return {}


def _vit_at_size(builder: Callable[..., nn.Module], weights: WeightsEnum, image_size: int,
                 **model_kwargs: Any) -> nn.Module:
    """A pretrained ViT for another input side: position embeddings interpolated to the new grid."""
    from torchvision.models.vision_transformer import interpolate_embeddings

    pretrained = _build_with_enum(builder, weights, **model_kwargs)
    if image_size == pretrained.image_size:
        return pretrained
    if image_size % pretrained.patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of the patch size {pretrained.patch_size} "
                         f"of this ViT.")
    state = interpolate_embeddings(image_size, pretrained.patch_size, pretrained.state_dict())
    network = builder(weights=None, image_size=image_size, **model_kwargs)
    network.load_state_dict(state)
    logger.info("Interpolated the position embeddings of %s from %d px to %d px.", weights, pretrained.image_size,
                image_size)
    return network


def drop_auxiliary_heads(network: nn.Module) -> None:
    """Remove GoogLeNet / Inception-v3 auxiliary classifiers so forward returns one tensor."""
    if getattr(network, "aux_logits", False):
        network.aux_logits = False
        for name in ("aux1", "aux2", "AuxLogits"):
            if hasattr(network, name):
                setattr(network, name, None)


SMALL_INPUT_STEM_FAMILIES = ("resnet", "resnext", "wide_resnet")
"""torchvision families whose stem :func:`use_small_input_stem` can replace."""


def use_small_input_stem(network: nn.Module, model_name: str) -> None:
    """Replace a ResNet-family stem (7x7 stride-2 convolution + 3x3 stride-2 max-pool) in place by
    one 3x3 stride-1 convolution, the usual choice for 28-64 px inputs: the first residual stage
    then sees the full input resolution instead of a quarter of it (4x the spatial detail per
    side, about 16x the compute of the stages).

    Raises:
        ValueError: ``model_name`` is not a ResNet-family torchvision network.
    """
    conv = getattr(network, "conv1", None)
    if not model_name.startswith(SMALL_INPUT_STEM_FAMILIES) or not isinstance(conv, nn.Conv2d) \
            or not hasattr(network, "maxpool"):
        raise ValueError(f"small_input_stem applies to ResNet-family backbones ({', '.join(f'{f}*' for f in SMALL_INPUT_STEM_FAMILIES)}), "
                         f"not {model_name!r}")
    network.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    network.maxpool = nn.Identity()
