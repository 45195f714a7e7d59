"""Running the service with uvicorn: ``recognite serve`` calls :func:`run_server`."""

from __future__ import annotations

import logging
import os
from typing import Any

from recognite.serve.settings import ServeSettings, is_loopback

__all__ = ["run_server"]

logger = logging.getLogger(__name__)


def run_server(
    bundle: Any,
    gallery: str | os.PathLike,
    settings: ServeSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    device: Any = "auto",
) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM end it cleanly).

    Args:
        bundle, gallery, settings, device: as in :func:`recognite.serve.create_app`.
        host: Address to bind; loopback by default. Binding another address without TLS logs a
            warning: API keys and images would cross the network in clear text.
        port: TCP port (0 = any free port).
        ssl_certfile, ssl_keyfile: PEM certificate and key; both or neither.
    """
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise ValueError("--ssl-certfile and --ssl-keyfile go together: give both or neither")
    for name, path in (("--ssl-certfile", ssl_certfile), ("--ssl-keyfile", ssl_keyfile)):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"{name} {path!r} does not exist")
    try:
        import uvicorn
    except ImportError as exc:
        raise ImportError("recognite serve needs FastAPI, uvicorn and python-multipart: "
                          "pip install 'recognite[serve]'") from exc
    from recognite.serve.app import create_app

    if not is_loopback(host) and ssl_certfile is None:
        logger.warning("Serving on %s without TLS: API keys and images cross the network in clear text. "
                       "Give --ssl-certfile/--ssl-keyfile, or put the service behind a TLS proxy.", host)
    if settings.api_key is None:
        logger.info("No API key configured: enrolment and removal are disabled (--api-key-file or RECOGNITE_API_KEY).")
    app = create_app(bundle, gallery, settings, device=device)
    scheme = "https" if ssl_certfile else "http"
    logger.info("recognite serve: %s://%s:%d/ (gallery %s)", scheme, host, port, app.state.store.path)
    uvicorn.run(app, host=host, port=port, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
                log_level="warning", access_log=False)
