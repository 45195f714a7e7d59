"""Uploaded images: the type sniffed from the bytes, limits in bytes and pixels, then decoded.

Nothing from a request becomes a filesystem path: the bytes are decoded in memory by the library's
one image loader (:func:`recognite.data.images.read_image`), restricted to the format that the
first bytes announce (the file name and the declared content type are ignored).
"""

from __future__ import annotations

from recognite.data.images import ImageTooLargeError, read_image

__all__ = ["SNIFFED_FORMATS", "UploadError", "decode_upload", "sniff_format"]

SNIFFED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
"""Image formats accepted in uploads (Pillow names)."""


class UploadError(ValueError):
    """A refused upload, with the HTTP status that says why (400, 413 or 415)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def sniff_format(data: bytes) -> str | None:
    """The image format that the first bytes of ``data`` announce, or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return None


def decode_upload(data: bytes, name: str, max_bytes: int, max_pixels: int):
    """Check and decode one uploaded image.

    Args:
        data: The uploaded bytes (read with at most ``max_bytes + 1`` bytes).
        name: How the upload is named in messages (its form field file name, never a path).
        max_bytes: Largest accepted upload.
        max_pixels: Largest accepted width x height, checked before decoding.

    Returns:
        The RGB PIL image.

    Raises:
        UploadError: 413 too large (bytes or pixels), 415 not an image, 400 empty or corrupt.
    """
    if len(data) > max_bytes:
        raise UploadError(413, f"image {name!r} is larger than the limit of {max_bytes:,} bytes")
    if not data:
        raise UploadError(400, f"image {name!r} is empty")
    kind = sniff_format(data)
    if kind is None:
        raise UploadError(415, f"{name!r} is not an image: its content is none of {', '.join(SNIFFED_FORMATS)} "
                               "(the type is read from the bytes, not from the name)")
    try:
        return read_image(data, max_pixels=max_pixels, formats=(kind,))
    except ImageTooLargeError as exc:
        size = f"is {exc.size[0]} x {exc.size[1]} pixels" if exc.size else f"has more than {max_pixels:,} pixels"
        raise UploadError(413, f"image {name!r} {size}, over the limit of {max_pixels:,} pixels; it was not decoded") from exc
    except ValueError as exc:
        raise UploadError(400, f"image {name!r} is a corrupt or truncated {kind}: {exc}") from exc
