"""The :class:`Recognizer`: a torchvision network turned into an embedding model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import WeightsEnum

from recognite._bundle_files import (
    BUNDLE_FILE,
    check_config_digest,
    read_manifest,
    read_weights,
    sha256_file,
)
from recognite.model._timm import build_timm, is_timm, load_timm_state
from recognite.model.backbones import (
    build_network,
    check_model_name,
    drop_auxiliary_heads,
    preprocessing_of,
    read_state_dict,
    resolve_weights,
    use_small_input_stem,
)
from recognite.model.classifier_ops import split_backbone_classifier
from recognite.preprocessing import Preprocessing
from recognite.utils.device import resolve_device
from recognite.utils.validate import InvalidTypeError, check_int

logger = logging.getLogger(__name__)

_AUX_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")
_MAX_LISTED = 5
_EPS = 1e-12


def _check_num_classes(num_classes: Any, name: str = "num_classes") -> None:
    try:
        check_int(num_classes, name, minimum=1)
    except ValueError as exc:
        raise type(exc)(f"{name} must be None or a positive integer, got {num_classes!r}.") from None


class Recognizer(nn.Module):
    """An embedding model built from a torchvision classification network.

    The network's final fully-connected layer is removed; the rest is ``backbone`` and its
    output width is ``embedding_dim``. With ``num_classes``, a new linear ``classifier`` (no bias by
    default) is trained on cosine scores: the L2-normalized embedding times the L2-normalized
    class weight vectors.

    Args:
        model_name: A name in ``recognite.model.SUPPORTED_MODELS``, e.g. ``"resnet50"``.
        num_classes: Number of training classes; ``None`` builds no classifier (inference only).
        weights: ``None``, anything torchvision's multi-weight API accepts for this model
            (``"DEFAULT"``, ``"IMAGENET1K_V1"``, ``"ResNet50_Weights.IMAGENET1K_V2"``, the enum
            member), or a path to a local checkpoint file (a torchvision state dict, or a
            Recognizer state dict / training checkpoint).
        bias: Whether the classifier has a bias term (kept off by default, see the user guide).
        normalize: L2-normalize embeddings and class weight vectors. With ``False`` nothing is
            normalized: training mode returns plain logits, eval mode the raw embedding.
        clf_bias: Old name of ``bias``; when given it takes precedence.
        num_subcenters: Class weight vectors per class (sub-center ArcFace); the classifier then
            has ``num_classes * num_subcenters`` outputs laid out class by class.
        embedding_dim: Add an embedding neck: a linear projection (no bias) from the backbone's
            width to this width, then batch norm, before the normalization (``None``: no neck,
            the embedding is the backbone's pooled features).
        **model_kwargs: Passed to the torchvision model builder (e.g. ``dropout``).

    Shapes:
        - input ``x``: ``(N, 3, H, W)``
        - ``forward`` in training mode with a classifier: ``(N, num_classes * num_subcenters)``
          cosine scores in ``[-1, 1]``
        - ``forward`` otherwise, and ``embed``: ``(N, embedding_dim)``, unit norm when
          ``normalize=True``

    Raises:
        ValueError: Unknown ``model_name`` (with close matches), bad ``num_classes`` or weights.
        FileNotFoundError: ``weights`` is a path that does not exist.
        recognite.model.WeightsUnavailableError: Pretrained weights had to be downloaded and could
            not be; the message names the file, its URL and where to place it.
    """

    def __init__(
        self,
        model_name: str,
        num_classes: int | None = None,
        weights: Any = None,
        bias: bool = False,
        normalize: bool = True,
        *,
        clf_bias: bool | None = None,
        num_subcenters: int = 1,
        embedding_dim: int | None = None,
        small_input_stem: bool = False,
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        check_model_name(model_name)
        if num_classes is not None:
            _check_num_classes(num_classes)
        _check_num_classes(num_subcenters, "num_subcenters")
        if clf_bias is not None:
            bias = clf_bias
        if not isinstance(small_input_stem, bool):
            raise InvalidTypeError(f"small_input_stem must be True or False, got {small_input_stem!r}")
        if small_input_stem and weights is not None and not Path(str(weights)).expanduser().is_file():
            raise _stem_with_weights(model_name, weights)  # before anything is downloaded
        backbone, self.backbone_dim, preprocessing, foreign_state, resolved = _build_backbone(
            model_name, weights, model_kwargs)
        if small_input_stem:
            if weights is not None and foreign_state is None:  # pretrained weights, not a recognite checkpoint
                raise _stem_with_weights(model_name, weights)
            use_small_input_stem(backbone, model_name)
        self.small_input_stem = small_input_stem
        self.backbone = backbone
        self.neck: nn.Sequential | None = None
        self.embedding_dim: int = self.backbone_dim
        if embedding_dim is not None:
            _check_num_classes(embedding_dim, "embedding_dim")
            # The re-ID "BNNeck": a projection to the embedding width, then batch norm, before the
            # normalization; gallery memory scales with embedding_dim, not the backbone's width.
            self.neck = nn.Sequential(nn.Linear(self.backbone_dim, embedding_dim, bias=False),
                                      nn.BatchNorm1d(embedding_dim))
            self.embedding_dim = int(embedding_dim)
        self.model_name = model_name
        self.normalize = bool(normalize)
        self.bias = bool(bias)
        self.num_subcenters = int(num_subcenters)
        self.num_classes = num_classes
        self.model_kwargs: dict[str, Any] = dict(model_kwargs)
        self.weights_name = str(weights) if weights is not None else None
        self.preprocessing: Preprocessing = preprocessing
        self.weights_sha256 = _file_sha256(resolved) if isinstance(resolved, Path) else None
        self.classifier: nn.Linear | None = None
        if num_classes is not None:
            self.set_classifier(num_classes, bias=self.bias)

        if foreign_state is not None:  # a Recognizer-format checkpoint
            self._load_recognizer_state(foreign_state, resolved)

    def set_classifier(self, num_classes: int | None, bias: bool = False) -> None:
        """Replace the classifier by a new one with ``num_classes`` classes (``None`` removes it)."""
        if num_classes is None:
            self.classifier = None
            self.num_classes = None
            return
        _check_num_classes(num_classes)
        param = next(self.backbone.parameters())
        classifier = nn.Linear(self.embedding_dim, num_classes * self.num_subcenters, bias=bias)
        self.classifier = classifier.to(device=param.device, dtype=param.dtype)
        self.num_classes = num_classes
        self.bias = bool(bias)

    def _load_recognizer_state(self, state: dict[str, torch.Tensor], path: Path) -> None:
        backbone_state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        _load_strict(self.backbone, backbone_state, path)
        neck_state = {k.removeprefix("neck."): v for k, v in state.items() if k.startswith("neck.")}
        if self.neck is not None and neck_state:
            _load_strict(self.neck, neck_state, path)
        clf_state = {k.removeprefix("classifier."): v for k, v in state.items() if k.startswith("classifier.")}
        if self.classifier is not None and clf_state:
            own = self.classifier.state_dict()
            if {k: v.shape for k, v in clf_state.items()} == {k: v.shape for k, v in own.items()}:
                self.classifier.load_state_dict(clf_state)
            else:
                logger.info("Classifier in %s does not match num_classes=%s; keeping a new one.", path, self.num_classes)

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this model (without its weights)."""
        return {
            "model_name": self.model_name,
            "num_classes": self.num_classes,
            "bias": self.bias,
            "normalize": self.normalize,
            "num_subcenters": self.num_subcenters,
            "embedding_dim": self.embedding_dim,
            "preprocessing": self.preprocessing.to_dict(),
            "model_kwargs": dict(self.model_kwargs),
            "neck_dim": self.embedding_dim if self.neck is not None else None,
            "small_input_stem": self.small_input_stem,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = "the model config") -> Recognizer:
        """Build the model that :meth:`config` describes, without weights (its inverse).

        Args:
            config: ``model_name`` (required), ``num_classes``, ``bias``, ``normalize``,
                ``num_subcenters``, ``model_kwargs``, ``preprocessing`` (a dict), and
                ``embedding_dim`` (checked against the built network when present).
            source: Where the config comes from, named in error messages (e.g. a file).

        Raises:
            ValueError: A missing or unusable entry (the message names ``source`` and the key).
        """
        if not isinstance(config, dict) or not isinstance(config.get("model_name"), str):
            raise ValueError(f"{source} has no model_name: it does not describe a recognite model.")
        kwargs = config.get("model_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise ValueError(f"{source}: model_kwargs must be a dict, got {kwargs!r}.")
        try:
            model = cls(
                config["model_name"],
                num_classes=config.get("num_classes"),
                weights=None,
                bias=bool(config.get("bias", False)),
                normalize=bool(config.get("normalize", True)),
                num_subcenters=int(config.get("num_subcenters", 1)),
                embedding_dim=config.get("neck_dim"),
                small_input_stem=config.get("small_input_stem", False),
                **kwargs,
            )
        except TypeError as exc:
            raise ValueError(f"{source} describes a model that cannot be built: {exc}") from exc
        expected_dim = config.get("embedding_dim")
        if expected_dim is not None and expected_dim != model.embedding_dim:
            raise ValueError(f"{source} says embedding_dim={expected_dim}, but {config['model_name']!r} gives "
                             f"{model.embedding_dim}.")
        if config.get("preprocessing") is not None:
            model.preprocessing = Preprocessing.from_dict(config["preprocessing"], source=source)
        return model

    def load_weights(self, state: dict[str, torch.Tensor], source: str = "the state dict",
                     named_in: str | None = None) -> None:
        """Load a full Recognizer state dict (a ``module.`` prefix from DDP is removed).

        Raises:
            ValueError: Missing or unexpected keys, or shape mismatches (listed, naming ``source`` and
                the file ``named_in`` that names the architecture).
        """
        if isinstance(state, dict) and state and all(k.startswith("module.") for k in state):
            state = {k.removeprefix("module."): v for k, v in state.items()}
        problems = _describe_mismatch(self, state)
        if problems:
            what = f"the architecture {self.model_name!r} named in {named_in}" if named_in else repr(self.model_name)
            raise ValueError(f"The weights in {source} do not fit {what}: {'; '.join(problems)}.")
        self.load_state_dict(state)

    @classmethod
    def from_bundle(cls, path: str | Path, device: str | torch.device | None = None) -> Recognizer:
        """Load the model of a bundle folder written by :func:`recognite.bundle.save_bundle` (eval mode).

        The bundle's weights are checked against their SHA-256; its preprocessing, image size and
        threshold are available from :func:`recognite.bundle.load_bundle`.
        """
        model, _, _ = load_bundle_model(Path(path).expanduser())
        return model.to(resolve_device(device)).eval()

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.backbone(x)
        if self.neck is not None:
            if not isinstance(out, torch.Tensor):  # GoogLeNet / Inception named tuples
                out = out.logits if hasattr(out, "logits") else out[0]
            return self.neck(out)
        if not isinstance(out, torch.Tensor):  # GoogLeNet / Inception named tuples
            out = out.logits if hasattr(out, "logits") else out[0]
        return out

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Return the embedding of ``x`` in any mode.

        Args:
            x: Images ``(N, 3, H, W)``.

        Returns:
            ``(N, embedding_dim)``, L2-normalized when ``normalize=True``.
        """
        features = self._features(x)
        return F.normalize(features, dim=1, eps=_EPS) if self.normalize else features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine scores in training mode with a classifier, the embedding otherwise.

        Args:
            x: Images ``(N, 3, H, W)``.

        Returns:
            Training mode with a classifier: ``(N, num_classes * num_subcenters)`` scores (cosines
            when ``normalize=True``, plus the bias when there is one). Otherwise
            ``(N, embedding_dim)`` embeddings.
        """
        if not (self.training and self.classifier is not None):
            return self.embed(x)
        features = self._features(x)
        if not self.normalize:
            return self.classifier(features)
        weight = self.classifier.weight
        with torch.no_grad():  # keep the stored class vectors at unit norm
            norms = weight.norm(dim=1, keepdim=True)
            # Only touch the parameter when needed, so that several forwards before one
            # backward (gradient accumulation over micro-batches) do not see an in-place edit.
            if bool(((norms - 1).abs() > 1e-6).any()):
                weight.div_(norms.clamp_min(_EPS))
        device_type = features.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            # Gradients flow through the normalization of both factors.
            scores = F.normalize(features.float(), dim=1, eps=_EPS) @ F.normalize(weight.float(), dim=1, eps=_EPS).T
            if self.classifier.bias is not None:
                scores = scores + self.classifier.bias.float()
        return scores


def _stem_with_weights(model_name: str, weights: Any) -> ValueError:
    return ValueError(f"small_input_stem replaces the first convolution of {model_name}, so pretrained weights "
                      f"({weights}) would no longer fit: use it when training from scratch (weights=None)")


def _build_backbone(
    model_name: str, weights: Any, model_kwargs: dict[str, Any]
) -> tuple[nn.Module, int, Preprocessing, dict[str, torch.Tensor] | None, Any]:
    """``(backbone, width, preprocessing, Recognizer-format state to load or None, resolved weights)``.

    torchvision names: the network without its final linear layer; ``timm/`` names: the timm
    network built with ``num_classes=0`` (its pooled features).
    """
    if is_timm(model_name):
        network, preprocessing = build_timm(model_name, weights, **model_kwargs)
        path = None if weights is None or str(weights).upper() == "DEFAULT" else Path(str(weights)).expanduser()
        foreign_state = read_state_dict(path) if path is not None else None
        if foreign_state is not None and not any(k.startswith("backbone.") for k in foreign_state):
            load_timm_state(network, foreign_state, path)  # a timm-format file
            foreign_state = None
        return network, int(network.num_features), preprocessing, foreign_state, path
    resolved = resolve_weights(model_name, weights)
    network = build_network(model_name, resolved if isinstance(resolved, WeightsEnum) else None, **model_kwargs)
    drop_auxiliary_heads(network)
    foreign_state = read_state_dict(resolved) if isinstance(resolved, Path) else None
    if foreign_state is not None and not any(k.startswith("backbone.") for k in foreign_state):
        # A torchvision-format checkpoint: load it into the full network, head included.
        state = {k: v for k, v in foreign_state.items() if not k.startswith(_AUX_PREFIXES)}
        _load_strict(network, state, resolved)
        foreign_state = None
    backbone, old_head = split_backbone_classifier(network)
    return backbone, int(old_head.in_features), preprocessing_of(resolved), foreign_state, resolved


def _file_sha256(path: Path) -> str:
    return sha256_file(path)


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], path: Path | None) -> None:
    result = module.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"missing keys {result.missing_keys[:5]}{' ...' if len(result.missing_keys) > 5 else ''}")
    if result.unexpected_keys:
        problems.append(
            f"unexpected keys {result.unexpected_keys[:5]}{' ...' if len(result.unexpected_keys) > 5 else ''}"
        )
    if problems:
        raise ValueError(f"The weights file {path} does not fit this architecture: {'; '.join(problems)}.")


def _describe_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" ... ({len(items)} in all)" if len(items) > _MAX_LISTED else ""
            problems.append(f"{what} {items[:_MAX_LISTED]}{more}")
    return problems


def load_bundle_model(folder: Path, verify: bool = True) -> tuple[Recognizer, dict[str, Any], str]:
    """The Recognizer of a bundle folder (on the CPU, eval mode), its manifest and weights SHA-256.

    The one place that turns a bundle's files into a model (:meth:`Recognizer.from_bundle` and
    :func:`recognite.bundle.load_bundle` both call it).
    """
    manifest = read_manifest(folder)
    state, digest = read_weights(folder, manifest, verify=verify)
    source = f"{BUNDLE_FILE} in {folder}"
    model = Recognizer.from_config({**manifest["model"], "preprocessing": manifest["preprocessing"]}, source=source)
    model.load_weights(state, source=str(folder / str(manifest.get("weights_file", "model.safetensors"))),
                       named_in=BUNDLE_FILE)
    check_config_digest(folder, manifest)
    return model.eval(), manifest, digest
