"""timm backbones for :class:`~recognite.model.Recognizer`: names ``timm/<architecture>[.<tag>]``.

timm is an optional extra (``pip install 'recognite[timm]'``), imported only when a ``timm/``
name is used. The network is built with ``num_classes=0``, so its pooled features are the
embedding (``num_features`` wide). Pretrained weights (``weights="DEFAULT"``) come from the
Hugging Face Hub through timm, from the local Hub cache when present (``HF_HUB_OFFLINE=1``
forbids any download); the preprocessing (mean, std, input size, interpolation, crop fraction)
comes from the model's data config.
"""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path
from typing import Any

from torch import nn

from recognite.preprocessing import Preprocessing

TIMM_PREFIX = "timm/"


def is_timm(model_name: Any) -> bool:
    """Whether ``model_name`` names a timm architecture (``timm/...``)."""
    return isinstance(model_name, str) and model_name.startswith(TIMM_PREFIX)


def import_timm() -> Any:
    """The ``timm`` module, or an ``ImportError`` that names the extra to install."""
    try:
        import timm
    except ImportError as exc:
        raise ImportError("timm backbones need the timm package: pip install 'recognite[timm]'.") from exc
    return timm


def architecture(model_name: str) -> str:
    """``timm/vit_small_patch14_dinov2.lvd142m`` → ``vit_small_patch14_dinov2.lvd142m``."""
    return model_name[len(TIMM_PREFIX):]


def check_timm_name(model_name: str) -> None:
    """Raise a ``ValueError`` with close matches when timm has no such architecture."""
    timm = import_timm()
    name = architecture(model_name)
    if name and timm.is_model(name):
        return
    close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=3)
    hint = f" Did you mean: {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
    raise ValueError(f"Unknown timm model {model_name!r}.{hint} See `recognite models --timm`.")


def list_timm_models(filter_text: str = "") -> list[str]:
    """Every timm architecture (with the ``timm/`` prefix) whose name contains ``filter_text``."""
    timm = import_timm()
    return [TIMM_PREFIX + name for name in timm.list_models() if filter_text in name]


def timm_input_size_kwargs(model_name: str, image_size: int) -> dict[str, Any]:
    """``{'img_size': S}`` for timm models with a fixed input size (ViTs, Swin...) at another side."""
    timm = import_timm()
    cfg = timm.models.get_pretrained_cfg(architecture(model_name))
    if cfg is not None and getattr(cfg, "fixed_input_size", False) and tuple(cfg.input_size)[-1] != image_size:
        return {"img_size": int(image_size)}
    return {}


def _preprocessing(network: nn.Module) -> Preprocessing:
    timm = import_timm()
    config = timm.data.resolve_data_config({}, model=network)
    crop = int(config["input_size"][-1])
    crop_pct = float(config.get("crop_pct") or 1.0)
    return Preprocessing(
        mean=tuple(float(v) for v in config["mean"]),
        std=tuple(float(v) for v in config["std"]),
        crop_size=crop,
        resize_size=int(math.floor(crop / crop_pct)),
        interpolation=str(config.get("interpolation") or "bicubic"),
    )


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights must be downloaded and the download failed."""


def _hub_unavailable(model_name: str, network_cfg: Any, exc: BaseException) -> Exception:
    try:
        from huggingface_hub import constants

        cache = constants.HF_HUB_CACHE
    except ImportError:
        cache = os.path.expanduser("~/.cache/huggingface/hub")
    repo = getattr(network_cfg, "hf_hub_id", None) or architecture(model_name)
    return WeightsUnavailableError(
        f"Could not load the pretrained weights of {model_name} ({type(exc).__name__}: {exc}). They are the file "
        f"model.safetensors of the Hugging Face repository {repo!r}: download it on a machine with internet access "
        f"(e.g. `huggingface-cli download {repo}`) and copy the folder models--{repo.replace('/', '--')} into the "
        f"Hub cache {cache} (or set HF_HUB_CACHE); it is then used without network, also with HF_HUB_OFFLINE=1."
    )


def build_timm(model_name: str, weights: Any, **model_kwargs: Any) -> tuple[nn.Module, Preprocessing]:
    """The timm network (``num_classes=0``) and its preprocessing; weights ``None``, ``'DEFAULT'``
    (the tag's Hub weights) or a local state-dict file."""
    timm = import_timm()
    check_timm_name(model_name)
    name = architecture(model_name)
    pretrained = isinstance(weights, str) and weights.upper() == "DEFAULT"
    if weights is not None and not pretrained and not Path(str(weights)).expanduser().is_file():
        raise FileNotFoundError(f"weights for {model_name} must be None, 'DEFAULT' or a local file; "
                                f"{str(weights)!r} is not a file.")
    try:
        network = timm.create_model(name, pretrained=pretrained, num_classes=0, **model_kwargs)
    except Exception as exc:  # a Hub download that cannot happen (offline, proxy, missing file ...)
        if not pretrained or isinstance(exc, TypeError):  # TypeError: a bad builder argument
            raise
        raise _hub_unavailable(model_name, timm.models.get_pretrained_cfg(name), exc) from exc
    return network, _preprocessing(network)


def load_timm_state(network: nn.Module, state: dict[str, Any], path: Path) -> None:
    """Load a timm state dict (read from ``path``) into ``network``; its classification head
    (absent here) is ignored."""
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise ValueError(f"The weights file {path} does not fit this timm architecture: missing keys "
                         f"{missing[:5]}{' ...' if len(missing) > 5 else ''}.")
    shapes = [k for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
    if shapes:
        raise ValueError(f"The weights file {path} does not fit this timm architecture: shape mismatches {shapes[:5]}.")
    network.load_state_dict({k: state[k] for k in own}, strict=True)
