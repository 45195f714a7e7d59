"""``recognite serve``: recognition over HTTP (needs ``recognite[serve]``)."""

from __future__ import annotations

import argparse

from recognite.cli._options import add_bundle
from recognite.serve.settings import ServeSettings


def _run_serve(args: argparse.Namespace) -> int:
    from recognite.serve.server import run_server
    from recognite.serve.settings import read_api_key

    settings = ServeSettings(
        api_key=read_api_key(args.api_key_file), require_key_for_recognize=args.require_key_for_recognize,
        max_image_bytes=int(args.max_image_mb * 1024**2), max_pixels=args.max_pixels, max_images=args.max_images,
        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, top_k=args.top_k,
    )
    run_server(args.bundle, args.gallery, settings, args.host, args.port, ssl_certfile=args.ssl_certfile,
               ssl_keyfile=args.ssl_keyfile, device=args.device)
    return 0


def _register_serve(sub: argparse._SubParsersAction) -> None:
    defaults = ServeSettings()
    p = sub.add_parser(
        "serve", help="Serve recognition, enrolment and a web page over HTTP (needs recognite[serve]).",
        description="A JSON API (POST /v1/recognize, POST/DELETE /v1/gallery/{label}, GET /v1/gallery, /healthz, "
        "/metrics; OpenAPI at /openapi.json) and a web page at /. Enrolment and removal need an API key "
        "(--api-key-file or the RECOGNITE_API_KEY environment variable), sent as 'Authorization: Bearer <key>'; "
        "without one they are disabled. Every acknowledged enrolment is on disk.")
    add_bundle(p)
    p.add_argument("--gallery", required=True,
                   help="Gallery file (.safetensors); created by the first enrolment when it does not exist.")
    p.add_argument("--host", default="127.0.0.1", help="Address to bind (default: 127.0.0.1, this machine only).")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000).")
    p.add_argument("--api-key-file", default=None, help="File whose first line is the API key.")
    p.add_argument("--require-key-for-recognize", action="store_true",
                   help="Also require the API key for recognition and for listing the gallery.")
    p.add_argument("--max-image-mb", type=float, default=defaults.max_image_bytes / 1024**2,
                   help="Largest image upload in MiB (default: %(default)g).")
    p.add_argument("--max-pixels", type=int, default=defaults.max_pixels,
                   help="Largest image in pixels, checked before decoding (default: %(default)d).")
    p.add_argument("--max-images", type=int, default=defaults.max_images,
                   help="Most images per request (default: %(default)d).")
    p.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size,
                   help="Most images per forward pass, across requests; 1 turns batching off (default: %(default)d).")
    p.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms,
                   help="Longest an image waits for others to share its forward pass (default: %(default)g).")
    p.add_argument("--top-k", type=int, default=defaults.top_k, help="Labels per image when a request does not "
                   "say (default: %(default)d).")
    p.add_argument("--ssl-certfile", default=None, help="TLS certificate (PEM); with --ssl-keyfile.")
    p.add_argument("--ssl-keyfile", default=None, help="TLS private key (PEM); with --ssl-certfile.")
    p.add_argument("--device", default="auto", help="Device: auto (CUDA when available), cpu or cuda (default: auto).")
    p.set_defaults(handler=_run_serve)


REGISTRY = [_register_serve]
