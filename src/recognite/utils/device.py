"""The one device resolver of the library."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["resolve_device"]


def resolve_device(device: Any = None) -> torch.device:
    """``None`` or ``'auto'`` → CUDA when available, else CPU; anything else → ``torch.device``.

    Args:
        device: ``None``, ``'auto'``, ``'cpu'``, ``'cuda'``, ``'cuda:N'`` or a ``torch.device``.

    Returns:
        The device.

    Raises:
        ValueError: An unknown device string, or CUDA asked for on a machine without it.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be one of auto, cpu, cuda (or cuda:N), got {device!r}.") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={str(device)!r} was asked for, but CUDA is not available on this machine; use 'cpu' or 'auto'."
        )
    return resolved
