"""Settings of ``recognite serve`` / :func:`recognite.serve.create_app`, checked when made."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from recognite.utils.validate import check_int, check_number

__all__ = ["API_KEY_ENV", "MIN_API_KEY_LENGTH", "ServeSettings", "is_loopback", "read_api_key"]

API_KEY_ENV = "RECOGNITE_API_KEY"
"""Environment variable read for the API key when no key file is given."""
MIN_API_KEY_LENGTH = 16


@dataclass(frozen=True)
class ServeSettings:
    """Limits and policies of the service.

    Attributes:
        api_key: Key required (``Authorization: Bearer <key>``) to enrol and remove; None
            disables enrolment and removal altogether (they answer 403).
        require_key_for_recognize: Also require the key for recognition and for listing the gallery.
        max_image_bytes: Largest accepted image upload (413 above).
        max_pixels: Largest accepted image, width x height, checked before decoding (413 above).
        max_images: Most images in one request (413 above).
        max_batch_size: Most images per forward pass (1 = no batching).
        max_wait_ms: Longest an image waits for others to share its forward pass.
        top_k: Labels listed per image when a request does not say.
    """

    api_key: str | None = None
    require_key_for_recognize: bool = False
    max_image_bytes: int = 10 * 1024**2
    max_pixels: int = 40_000_000
    max_images: int = 16
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    top_k: int = 5

    def __post_init__(self) -> None:
        if self.api_key is not None:
            if not isinstance(self.api_key, str) or len(self.api_key) < MIN_API_KEY_LENGTH:
                raise ValueError(f"api_key must be a string of at least {MIN_API_KEY_LENGTH} characters "
                                 "(e.g. from `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
            if any(ch.isspace() for ch in self.api_key):
                raise ValueError("api_key must not contain spaces or line breaks")
        check_int(self.max_image_bytes, "max_image_bytes", minimum=1)
        check_int(self.max_pixels, "max_pixels", minimum=1)
        check_int(self.max_images, "max_images", minimum=1)
        check_int(self.max_batch_size, "max_batch_size", minimum=1)
        check_number(self.max_wait_ms, "max_wait_ms", minimum=0.0)
        check_int(self.top_k, "top_k", minimum=1)

    @property
    def max_request_bytes(self) -> int:
        """Largest request body: every image at its limit plus room for the form's other fields."""
        return self.max_images * (self.max_image_bytes + 4096) + 65536


def read_api_key(path: str | os.PathLike | None) -> str | None:
    """The API key from ``path`` (its first line) or else from :data:`API_KEY_ENV`; None if neither."""
    if path is not None:
        try:
            text = Path(path).expanduser().read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"--api-key-file {os.fspath(path)!r} cannot be read: {exc.strerror or exc}") from exc
        key = text.strip().splitlines()[0].strip() if text.strip() else ""
        if not key:
            raise ValueError(f"--api-key-file {os.fspath(path)!r} is empty")
        return key
    key = os.environ.get(API_KEY_ENV, "").strip()
    return key or None


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
