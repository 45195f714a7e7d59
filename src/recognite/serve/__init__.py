"""``recognite serve``: recognition as an HTTP service, with a web page.

Needs the ``serve`` extra (``pip install 'recognite[serve]'``: FastAPI, uvicorn, python-multipart);
:func:`create_app` imports it on first use::

    from recognite.serve import ServeSettings, create_app
    app = create_app("runs/demo/bundle", "gallery.safetensors", ServeSettings(api_key=key))
"""

from __future__ import annotations

from typing import Any

from recognite.serve.settings import API_KEY_ENV, ServeSettings
from recognite.serve.store import GalleryStore

__all__ = ["API_KEY_ENV", "GalleryStore", "ServeSettings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":  # imported on first use: FastAPI is an optional extra
        from recognite.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'recognite.serve' has no attribute {name!r}")
