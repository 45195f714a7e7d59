"""Classification losses on cosine scores.

Every loss here takes the **cosine scores** that :class:`recognite.model.Recognizer` returns in
training mode, ``scores: (N, C)``, the cosines between the L2-normalized embeddings and the
L2-normalized class weight vectors, and integer class indices ``targets: (N,)`` in ``0..C-1``.
Each one turns the cosines into logits and applies cross-entropy:

================================  ==========================================================
:class:`NormSoftmaxLoss`          ``logits = cos / temperature`` (fixed or learned temperature)
:class:`CosFaceLoss`              ``logits = s * (cos - m)`` for the target class, ``s * cos``
                                  otherwise (additive cosine margin)
:class:`ArcFaceLoss`              ``logits = s * cos(theta + m)`` for the target class,
                                  ``s * cos`` otherwise (additive angular margin)
:class:`SubCenterArcFaceLoss`     ArcFace on the best of ``K`` sub-centers per class
================================  ==========================================================

Plain cross-entropy on the raw cosines is ``NormSoftmaxLoss(temperature=1.0)``.

The logits are always computed in float32 (the scores are cast with ``.float()``), also under
``torch.autocast``, so that a scale of 30 or a temperature of 0.05 does not overflow half
precision.

Example:
    >>> import torch
    >>> from recognite.losses import build_loss
    >>> loss_fn = build_loss("arcface", scale=30.0, margin=0.5)
    >>> scores = torch.tensor([[0.9, 0.1, -0.2], [0.3, 0.2, 0.8]])
    >>> targets = torch.tensor([0, 2])
    >>> round(loss_fn(scores, targets).item(), 4)
    0.0167
"""

from __future__ import annotations

import difflib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ArcFaceLoss",
    "CosFaceLoss",
    "LOSS_NAMES",
    "NormSoftmaxLoss",
    "SubCenterArcFaceLoss",
    "build_loss",
]

_REDUCTIONS = ("mean", "sum", "none")

# Scores of losses that need cosines may exceed 1 slightly through rounding (bf16 has a spacing
# of 2**-7 just above 1); anything further out is not a cosine.
_COSINE_TOLERANCE = 1e-2


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def _check_common(reduction: str, label_smoothing: float) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(_REDUCTIONS)}; got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")


def _check_inputs(
    scores: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int | None = None,
    require_cosines: bool = False,
) -> None:
    """Validate ``scores (N, C)`` and ``targets (N,)``; raise ``ValueError`` on bad input.

    The value checks (target range, cosine range) cost one host-device synchronisation.
    """
    if not isinstance(scores, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError(
            "scores and targets must be torch.Tensor, got "
            f"{type(scores).__name__} and {type(targets).__name__}"
        )
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape (N, C), got shape {tuple(scores.shape)}")
    if targets.ndim != 1:
        raise ValueError(f"targets must have shape (N,), got shape {tuple(targets.shape)}")
    if scores.shape[0] != targets.shape[0]:
        raise ValueError(
            f"scores and targets disagree on the batch size: scores {tuple(scores.shape)}, "
            f"targets {tuple(targets.shape)}"
        )
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must hold integer class indices, got dtype {targets.dtype}")
    if num_classes is None:
        num_classes = scores.shape[1]
    if targets.numel() == 0:
        return
    bad_target = (targets < 0) | (targets >= num_classes)
    checks = [bad_target.any()]
    if require_cosines:
        checks.append((scores.detach().abs() > 1.0 + _COSINE_TOLERANCE).any())
    flags = torch.stack(checks).tolist()
    if flags[0]:
        bad = targets[bad_target]
        raise ValueError(
            f"targets must be class indices in [0, {num_classes - 1}] for {num_classes} classes; "
            f"got {bad.numel()} out of range, e.g. {bad[:5].tolist()}"
        )
    if require_cosines and flags[1]:
        max_abs = scores.detach().abs().max().item()
        raise ValueError(
            "scores must be cosines in [-1, 1] (the training-mode output of a Recognizer built "
            f"with normalize=True); got a score of magnitude {max_abs:.4g}"
        )


def _margin_logits(
    cosines: torch.Tensor, targets: torch.Tensor, target_logits: torch.Tensor, scale: float
) -> torch.Tensor:
    """Replace the target column of ``cosines (N, C)`` by ``target_logits (N,)``, times scale."""
    logits = cosines.scatter(1, targets.unsqueeze(1), target_logits.unsqueeze(1))
    return logits * scale


class _CosineLoss(nn.Module):
    """Shared plumbing: reduction and label smoothing of the final cross-entropy."""

    def __init__(self, reduction: str = "mean", label_smoothing: float = 0.0) -> None:
        super().__init__()
        _check_common(reduction, label_smoothing)
        self.reduction = reduction
        self.label_smoothing = float(label_smoothing)

    def num_outputs(self, num_classes: int) -> int:
        """Width of the classifier (columns of ``scores``) this loss needs for ``num_classes``."""
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
        return int(num_classes)

    def _cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits,
            targets.long(),
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )


class NormSoftmaxLoss(_CosineLoss):
    """Normalized softmax: cross-entropy on ``cos / temperature``.

    With ``learn_temperature=True`` the inverse temperature is learned as
    ``scale = exp(log_scale)`` (always positive), starting from ``1 / temperature``; the
    parameter ``log_scale`` must then be given to the optimizer (it is a parameter of this
    module, and the only entry of its ``state_dict``; a fixed temperature is not saved).
    ``NormSoftmaxLoss(temperature=1.0)`` is plain cross-entropy on the raw cosines.

    Args:
        temperature: Divides the cosines; > 0. Small values (0.05) sharpen the softmax.
        learn_temperature: Learn the temperature, starting from ``temperature``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-sample losses ``(N,)``).
        label_smoothing: Passed to :func:`torch.nn.functional.cross_entropy`.

    Shapes:
        scores: ``(N, C)`` cosines; targets: ``(N,)`` int64 in ``0..C-1``; result: scalar, or
        ``(N,)`` with ``reduction="none"``.

    Example:
        >>> import torch
        >>> loss_fn = NormSoftmaxLoss(temperature=0.5)
        >>> scores = torch.tensor([[0.5, 0.0]])
        >>> round(loss_fn(scores, torch.tensor([0])).item(), 4)  # log(1 + e**-1)
        0.3133
    """

    def __init__(
        self,
        temperature: float = 0.05,
        learn_temperature: bool = False,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(reduction=reduction, label_smoothing=label_smoothing)
        temperature = _check_positive("temperature", temperature)
        self.learn_temperature = bool(learn_temperature)
        log_scale = torch.tensor(-math.log(temperature), dtype=torch.float32)
        if self.learn_temperature:
            self.log_scale = nn.Parameter(log_scale)
        else:
            # not in the state dict: a fixed temperature comes from the arguments, not from a
            # checkpoint
            self.register_buffer("log_scale", log_scale, persistent=False)

    @property
    def temperature(self) -> float:
        """The current temperature ``1 / exp(log_scale)``."""
        return float(torch.exp(-self.log_scale.detach()).item())

    def forward(self, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of ``scores (N, C)`` against ``targets (N,)``."""
        _check_inputs(scores, targets)
        logits = scores.float() * torch.exp(self.log_scale.float())
        return self._cross_entropy(logits, targets)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:.4g}, learn_temperature={self.learn_temperature}"


class CosFaceLoss(_CosineLoss):
    """CosFace / large margin cosine loss: logits ``s * (cos - m)`` for the target class.

    Non-target classes keep ``s * cos``. Reference: Wang et al., "CosFace: Large Margin Cosine
    Loss for Deep Face Recognition", CVPR 2018.

    Args:
        scale: ``s`` > 0, multiplies all cosines.
        margin: ``m`` >= 0, subtracted from the target cosine.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        label_smoothing: Passed to :func:`torch.nn.functional.cross_entropy`.

    Shapes:
        scores: ``(N, C)`` cosines in ``[-1, 1]``; targets: ``(N,)`` int64 in ``0..C-1``.

    Example:
        >>> import torch
        >>> loss_fn = CosFaceLoss(scale=2.0, margin=0.25)
        >>> scores = torch.tensor([[0.75, 0.0]])  # logits [2 * 0.5, 0] = [1, 0]
        >>> round(loss_fn(scores, torch.tensor([0])).item(), 4)  # log(1 + e**-1)
        0.3133
    """

    def __init__(
        self,
        scale: float = 30.0,
        margin: float = 0.35,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(reduction=reduction, label_smoothing=label_smoothing)
        self.scale = _check_positive("scale", scale)
        margin = float(margin)
        if not math.isfinite(margin) or margin < 0:
            raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
        self.margin = margin

    def forward(self, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of cosine ``scores (N, C)`` against ``targets (N,)``."""
        _check_inputs(scores, targets, require_cosines=True)
        cosines = scores.float()
        targets = targets.long()
        target_cos = cosines.gather(1, targets.unsqueeze(1)).squeeze(1)
        logits = _margin_logits(cosines, targets, target_cos - self.margin, self.scale)
        return self._cross_entropy(logits, targets)

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}, margin={self.margin:g}"


def _arcface_target_cos(
    target_cos: torch.Tensor, margin: float, easy_margin: bool, eps: float
) -> torch.Tensor:
    """``cos(theta + m)`` of the target cosines ``(N,)``, with insightface's fallback.

    ``cos(theta + m) = cos * cos(m) - sin * sin(m)``. It is only monotone in ``theta`` while
    ``theta + m <= pi``; beyond (``cos <= cos(pi - m)``) the CosFace-like
    ``cos - m * sin(m)`` is used instead (``easy_margin``: the plain cosine when ``cos <= 0``).
    """
    cos = target_cos.clamp(-1.0 + eps, 1.0 - eps)
    sin = torch.sqrt(1.0 - cos * cos)
    phi = cos * math.cos(margin) - sin * math.sin(margin)
    if easy_margin:
        return torch.where(cos > 0, phi, cos)
    threshold = math.cos(math.pi - margin)
    return torch.where(cos > threshold, phi, cos - margin * math.sin(margin))


class ArcFaceLoss(_CosineLoss):
    """ArcFace / additive angular margin: logits ``s * cos(theta + m)`` for the target class.

    ``theta = arccos(cos)`` is the angle between the embedding and the target class weight;
    non-target classes keep ``s * cos``. The target cosine is clamped to
    ``[-1 + eps, 1 - eps]`` so that the gradient of ``sin = sqrt(1 - cos**2)`` stays finite.
    As in insightface, when ``theta + m > pi`` (that is ``cos <= cos(pi - m)``) the target
    logit falls back to ``s * (cos - m * sin(m))``, which keeps it decreasing in ``theta``; with
    ``easy_margin=True`` the margin is applied only where ``cos > 0``. Reference: Deng et al.,
    "ArcFace: Additive Angular Margin Loss for Deep Face Recognition", CVPR 2019.

    Args:
        scale: ``s`` > 0, multiplies all cosines.
        margin: Angular margin ``m`` in radians, ``0 <= m < pi / 2``.
        easy_margin: Apply the margin only to targets with a positive cosine.
        eps: Clamp distance from +-1 for the target cosine.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        label_smoothing: Passed to :func:`torch.nn.functional.cross_entropy`.

    Shapes:
        scores: ``(N, C)`` cosines in ``[-1, 1]``; targets: ``(N,)`` int64 in ``0..C-1``.

    Example:
        >>> import math, torch
        >>> loss_fn = ArcFaceLoss(scale=1.0, margin=math.pi / 6)
        >>> scores = torch.tensor([[math.cos(math.pi / 6), 0.0]])  # target logit cos(pi/3) = 0.5
        >>> round(loss_fn(scores, torch.tensor([0])).item(), 4)  # log(1 + e**-0.5)
        0.4741
    """

    def __init__(
        self,
        scale: float = 30.0,
        margin: float = 0.5,
        easy_margin: bool = False,
        eps: float = 1e-7,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(reduction=reduction, label_smoothing=label_smoothing)
        self.scale = _check_positive("scale", scale)
        margin = float(margin)
        if not math.isfinite(margin) or not 0.0 <= margin < math.pi / 2:
            raise ValueError(f"margin must be in [0, pi/2) radians, got {margin!r}")
        eps = float(eps)
        if not 0.0 < eps < 0.5:
            raise ValueError(f"eps must be in (0, 0.5), got {eps!r}")
        self.margin = margin
        self.easy_margin = bool(easy_margin)
        self.eps = eps

    def _loss_from_cosines(self, cosines: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.long()
        target_cos = cosines.gather(1, targets.unsqueeze(1)).squeeze(1)
        target_logit = _arcface_target_cos(target_cos, self.margin, self.easy_margin, self.eps)
        logits = _margin_logits(cosines, targets, target_logit, self.scale)
        return self._cross_entropy(logits, targets)

    def forward(self, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of cosine ``scores (N, C)`` against ``targets (N,)``."""
        _check_inputs(scores, targets, require_cosines=True)
        return self._loss_from_cosines(scores.float(), targets)

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}, margin={self.margin:g}, easy_margin={self.easy_margin}"


class SubCenterArcFaceLoss(ArcFaceLoss):
    """Sub-center ArcFace: each class has ``K`` weight vectors; the best one counts.

    The classifier must have ``num_outputs(num_classes) = num_classes * K`` outputs, laid out
    class by class: columns ``[c * K, (c + 1) * K)`` are the ``K`` sub-centers of class ``c``
    (``class0 sub0 .. sub(K-1), class1 sub0 ..``). The per-class cosine is the maximum over its
    sub-centers (:meth:`class_scores`), then :class:`ArcFaceLoss` applies. Reference: Deng et
    al., "Sub-center ArcFace: Boosting Face Recognition by Large-Scale Noisy Web Faces",
    ECCV 2020.

    Args:
        num_subcenters: ``K`` >= 1 sub-centers per class (``K = 1`` is plain ArcFace).
        scale: ``s`` > 0.
        margin: Angular margin in radians, ``0 <= m < pi / 2``.
        easy_margin, eps, reduction, label_smoothing: As in :class:`ArcFaceLoss`.

    Shapes:
        scores: ``(N, C * K)`` cosines; targets: ``(N,)`` int64 in ``0..C-1``.

    Example:
        >>> import torch
        >>> loss_fn = SubCenterArcFaceLoss(num_subcenters=2)
        >>> loss_fn.num_outputs(10)
        20
        >>> loss_fn.class_scores(torch.tensor([[0.1, 0.7, -0.3, 0.2]]))
        tensor([[0.7000, 0.2000]])
    """

    def __init__(
        self,
        num_subcenters: int = 3,
        scale: float = 30.0,
        margin: float = 0.5,
        easy_margin: bool = False,
        eps: float = 1e-7,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(
            scale=scale,
            margin=margin,
            easy_margin=easy_margin,
            eps=eps,
            reduction=reduction,
            label_smoothing=label_smoothing,
        )
        if isinstance(num_subcenters, bool) or int(num_subcenters) != num_subcenters:
            raise ValueError(f"num_subcenters must be an integer >= 1, got {num_subcenters!r}")
        if num_subcenters < 1:
            raise ValueError(f"num_subcenters must be an integer >= 1, got {num_subcenters!r}")
        self.num_subcenters = int(num_subcenters)

    def num_outputs(self, num_classes: int) -> int:
        """Classifier width for ``num_classes`` classes: ``num_classes * num_subcenters``."""
        return super().num_outputs(num_classes) * self.num_subcenters

    def class_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Per-class cosines ``(N, C)``: the max over the sub-centers of ``scores (N, C * K)``."""
        if scores.ndim != 2 or scores.shape[1] % self.num_subcenters != 0:
            raise ValueError(
                f"scores must have shape (N, num_classes * {self.num_subcenters}) for "
                f"num_subcenters={self.num_subcenters} (see num_outputs()); got shape "
                f"{tuple(scores.shape)}"
            )
        num_classes = scores.shape[1] // self.num_subcenters
        return scores.view(scores.shape[0], num_classes, self.num_subcenters).amax(dim=2)

    def forward(self, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of sub-center cosines ``scores (N, C * K)`` against ``targets (N,)``."""
        cosines = self.class_scores(scores)
        _check_inputs(cosines, targets, require_cosines=True)
        return self._loss_from_cosines(cosines.float(), targets)

    def extra_repr(self) -> str:
        return f"num_subcenters={self.num_subcenters}, " + super().extra_repr()


_LOSSES: dict[str, type[_CosineLoss]] = {
    "norm_softmax": NormSoftmaxLoss,
    "cosface": CosFaceLoss,
    "arcface": ArcFaceLoss,
    "subcenter_arcface": SubCenterArcFaceLoss,
}

#: Names accepted by :func:`build_loss`.
LOSS_NAMES: tuple[str, ...] = tuple(_LOSSES)


def build_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build a loss on cosine scores by name.

    Args:
        name: One of :data:`LOSS_NAMES`: ``"norm_softmax"``, ``"cosface"``, ``"arcface"``,
            ``"subcenter_arcface"`` (case-insensitive; ``-`` may replace ``_``).
        **kwargs: Passed to the loss class, e.g. ``temperature=0.05`` or ``margin=0.5``.

    Returns:
        The loss module. Use ``loss.num_outputs(num_classes)`` for the classifier width.

    Raises:
        ValueError: Unknown name, or an argument the loss does not accept.

    Example:
        >>> build_loss("norm_softmax", temperature=0.1)
        NormSoftmaxLoss(temperature=0.1, learn_temperature=False)
    """
    if not isinstance(name, str):
        raise ValueError(
            f"loss name must be a string, one of {', '.join(LOSS_NAMES)}; got {name!r}"
        )
    key = name.strip().lower().replace("-", "_")
    if key not in _LOSSES:
        close = difflib.get_close_matches(key, LOSS_NAMES, n=2)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"Unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}.{hint}")
    cls = _LOSSES[key]
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"Bad arguments for loss {key!r} ({cls.__name__}): {err}") from err
