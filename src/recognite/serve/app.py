"""The recognition service: a FastAPI app over a bundle and a gallery file.

Routes (OpenAPI at ``/openapi.json``): ``POST /v1/recognize``, ``POST /v1/gallery/{label}``,
``DELETE /v1/gallery/{label}``, ``GET /v1/gallery``, ``GET /healthz``, ``GET /metrics`` and the web
page at ``/``. Errors are JSON ``{"error": {"status": ..., "message": ...}}``.

(No ``from __future__ import annotations`` here: FastAPI reads the route functions' annotations.)
"""

import contextlib
import functools
import hashlib
import hmac
import logging
import os
import time
from importlib import resources
from typing import Annotated, Any

try:
    from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("recognite serve needs FastAPI, uvicorn and python-multipart: "
                      "pip install 'recognite[serve]'") from exc

import torch

from recognite.bundle import Bundle, load_bundle
from recognite.gallery.open_set import UNKNOWN
from recognite.serve.batcher import BatchEmbedder
from recognite.serve.metrics import ServiceMetrics
from recognite.serve.settings import API_KEY_ENV, ServeSettings
from recognite.serve.store import GalleryStore, image_id
from recognite.serve.uploads import UploadError, decode_upload
from recognite.utils.device import resolve_device
from recognite.utils.validate import check_cosine_threshold
from recognite.utils.views import make_views

__all__ = ["MAX_LABEL_LENGTH", "MAX_TOP_K", "create_app"]

logger = logging.getLogger(__name__)

MAX_TOP_K = 100
MAX_LABEL_LENGTH = 200


class ServiceError(HTTPException):
    """An error answered as JSON with its status and a message that names the problem."""


def _error_body(status: int, message: str) -> dict[str, Any]:
    return {"error": {"status": status, "message": message}}


class _BodyLimit:
    """ASGI middleware: a request body larger than ``limit`` bytes is refused with 413, from its
    ``Content-Length`` before anything is read, or as soon as the bytes received pass the limit."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            response = JSONResponse(_error_body(413, f"the request body ({int(declared):,} bytes) is larger than the "
                                                     f"limit of {self.limit:,} bytes"), status_code=413)
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise ServiceError(413, f"the request body is larger than the limit of {self.limit:,} bytes")
            return message

        await self.app(scope, limited_receive, send)


def _check_label(label: str) -> str:
    if not label or not label.strip():
        raise ServiceError(400, "the label is empty")
    if label == UNKNOWN:
        raise ServiceError(400, f"{UNKNOWN!r} is reserved for queries that match no label; choose another label")
    if len(label) > MAX_LABEL_LENGTH:
        raise ServiceError(400, f"the label has {len(label)} characters, more than the limit of {MAX_LABEL_LENGTH}")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in label):
        raise ServiceError(400, "the label contains control characters")
    if label != label.strip():
        raise ServiceError(400, f"the label {label!r} starts or ends with spaces")
    return label


def _page() -> str:
    return resources.files("recognite.serve").joinpath("page.html").read_text(encoding="utf-8")


def create_app(
    bundle: Any,
    gallery: Any,
    settings: ServeSettings | None = None,
    *,
    device: Any = "auto",
) -> FastAPI:
    """The recognition service as a FastAPI app (mount it, or run it with uvicorn).

    Args:
        bundle: A :class:`~recognite.bundle.Bundle` or a bundle folder.
        gallery: A :class:`GalleryStore` or the gallery file (created by the first enrolment when
            it does not exist yet).
        settings: Limits and the API key (:class:`ServeSettings`; default: no key, so enrolment
            and removal are disabled).
        device: Where the model runs when ``bundle`` is a path (``'auto'``: CUDA when available).

    Returns:
        The app. Its batching loop starts with the app's lifespan (uvicorn and
        ``fastapi.testclient.TestClient`` used as a context manager run it).
    """
    settings = settings if settings is not None else ServeSettings()
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle, device=resolve_device(device))
    store = gallery if isinstance(gallery, GalleryStore) else GalleryStore(gallery, bundle.weights_sha256)
    metrics = ServiceMetrics()
    model = bundle.model.eval()
    model_device = next(model.parameters()).device
    batcher = BatchEmbedder(model.embed, model_device, settings.max_batch_size, settings.max_wait_ms,
                            on_batch=metrics.observe_batch)
    transform = bundle.transform
    views = bundle.test_time_augmentation  # the bundle's test-time views, as every other embedding path uses
    normalize = bool(getattr(model, "normalize", True))

    async def embed(images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, S, S)`` -> ``(N, D)``: through the batcher; with views, their mean per image."""
        if views is None or views.num_views == 1:
            return await batcher.embed(images)
        stacked = torch.stack([make_views(image, views) for image in images])  # (N, K, 3, S, S)
        flat = await batcher.embed(stacked.flatten(0, 1))
        mean = flat.reshape(stacked.shape[0], stacked.shape[1], -1).mean(dim=1)
        return torch.nn.functional.normalize(mean, dim=1) if normalize else mean

    enrolment = bundle.enrolment_augmentation
    stored = bundle.reranking  # the bundle's re-ranking, as `recognite recognize` applies it
    reranking = {} if stored is None else {"query_expansion": stored.query_expansion, "qe_alpha": stored.qe_alpha,
                                           "k_reciprocal": stored.k_reciprocal}

    async def embed_references(images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, S, S)`` -> ``(N, K, D)`` gallery rows per image, as ``Bundle.embed_references``."""
        if enrolment is None:
            return (await embed(images)).unsqueeze(1)
        stacked = torch.stack([make_views(image, enrolment.views) for image in images])
        flat = (await batcher.embed(stacked.flatten(0, 1))).reshape(stacked.shape[0], stacked.shape[1], -1)
        if enrolment.scoring == "max":
            return flat
        mean = flat.mean(dim=1)
        return (torch.nn.functional.normalize(mean, dim=1) if normalize else mean).unsqueeze(1)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="recognite", version="1", lifespan=lifespan,
                  description="Open-set image recognition: recognise images against a gallery of labelled "
                              "references, enrol and remove labels without retraining.")
    app.state.store, app.state.settings, app.state.bundle, app.state.metrics = store, settings, bundle, metrics

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(_error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error.get("loc", ())[1:]) or "request"
            problems.append(f"{where}: {error.get('msg', 'invalid')}")
        message = "; ".join(problems) or "invalid request"
        return JSONResponse(_error_body(400, message), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse(_error_body(500, f"internal error ({type(exc).__name__}); see the server log"),
                            status_code=500)

    @app.middleware("http")
    async def observe(request: Request, call_next: Any) -> Any:
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = getattr(request.scope.get("route"), "path", None) or "unmatched"
            metrics.observe_request(request.method, route, status, time.perf_counter() - start)

    app.add_middleware(_BodyLimit, limit=settings.max_request_bytes)

    def require_key(request: Request, action: str) -> None:
        if settings.api_key is None:
            raise ServiceError(403, f"{action} is disabled: start the service with --api-key-file or {API_KEY_ENV} "
                                    "to allow it")
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ServiceError(401, f"{action} needs the API key: send the header 'Authorization: Bearer <key>'",
                               headers={"WWW-Authenticate": "Bearer"})
        given = hashlib.sha256(token.strip().encode("utf-8")).digest()
        if not hmac.compare_digest(given, hashlib.sha256(settings.api_key.encode("utf-8")).digest()):
            raise ServiceError(403, "the API key is wrong")

    async def read_images(images: list[UploadFile]) -> tuple[list[str], list[str], torch.Tensor]:
        if len(images) > settings.max_images:
            raise ServiceError(413, f"{len(images)} images in one request; the limit is {settings.max_images}")
        names, ids, datas = [], [], []
        for position, upload in enumerate(images):
            data = await upload.read(settings.max_image_bytes + 1)
            names.append(os.path.basename(upload.filename or "") or f"image {position + 1}")
            datas.append(data)
            ids.append(image_id(data))

        def decode() -> torch.Tensor:
            return torch.stack([transform(decode_upload(data, name, settings.max_image_bytes, settings.max_pixels))
                                for data, name in zip(datas, names)])

        try:
            tensors = await run_in_threadpool(decode)
        except UploadError as exc:
            raise ServiceError(exc.status, str(exc)) from exc
        return names, ids, tensors

    @app.post("/v1/recognize", summary="Recognise images against the gallery")
    async def recognize(
        request: Request,
        images: Annotated[list[UploadFile], File(description="one or more images (JPEG, PNG, GIF, WebP, BMP, TIFF)")],
        top_k: Annotated[int | None, Form(description=f"labels listed per image (1-{MAX_TOP_K}; default from the "
                                                      "service settings)")] = None,
        threshold: Annotated[float | None, Form(description="open-set threshold in [-1, 1] (default: the "
                                                            "bundle's)")] = None,
    ) -> dict[str, Any]:
        """Per image: the top-k labels with their cosine scores, and the decision (a label or
        ``unknown`` when the best score is below the threshold)."""
        if settings.require_key_for_recognize:
            require_key(request, "recognition")
        k = settings.top_k if top_k is None else top_k
        if not 1 <= k <= MAX_TOP_K:
            raise ServiceError(400, f"top_k must be between 1 and {MAX_TOP_K}, got {k}")
        try:
            cut = check_cosine_threshold(bundle.threshold if threshold is None else threshold)
        except ValueError as exc:
            raise ServiceError(400, str(exc)) from exc
        names, _, tensors = await read_images(images)
        embeddings = await embed(tensors)
        gallery_now = store.gallery
        results = []
        if len(gallery_now) == 0:
            results = [{"filename": name, "prediction": UNKNOWN, "accepted": False, "score": None, "top_k": []}
                       for name in names]
        else:
            found = await run_in_threadpool(functools.partial(gallery_now.recognize, embeddings, k, cut, **reranking))
            for position, name in enumerate(names):
                record = found[position]
                results.append({"filename": name, "prediction": record["prediction"],
                                "accepted": record["prediction"] != UNKNOWN, "score": record["score"],
                                "top_k": record["top_k"]})
        return {"threshold": cut, "gallery_references": len(gallery_now), "results": results}

    @app.post("/v1/gallery/{label:path}", status_code=201, summary="Enrol images under a label (API key)")
    async def enrol(
        request: Request,
        label: str,
        images: Annotated[list[UploadFile], File(description="reference images of the label")],
    ) -> dict[str, Any]:
        """Embed the images and add them to the gallery under ``label`` (URL-encoded). Answers
        only once the gallery file holding them is on disk. The same image sent again under the
        same label is skipped, so a retried request enrols nothing twice."""
        require_key(request, "enrolment")
        label = _check_label(label)
        _, ids, tensors = await read_images(images)
        embeddings = await embed_references(tensors)
        try:
            outcome = await run_in_threadpool(store.enrol, label, embeddings, ids)
        except OSError as exc:
            raise ServiceError(507, f"the gallery could not be written: {exc}") from exc
        gallery_now = store.gallery
        return {"label": label, **outcome, "gallery": {"references": len(gallery_now),
                                                         "labels": len(gallery_now.labels)}}

    @app.delete("/v1/gallery/{label:path}", summary="Remove a label and its references (API key)")
    async def remove(request: Request, label: str) -> dict[str, Any]:
        """Remove every reference of ``label``; 404 when the gallery has no such label."""
        require_key(request, "removal")
        try:
            removed = await run_in_threadpool(store.remove, label)
        except KeyError:
            raise ServiceError(404, f"the gallery has no label {label!r}") from None
        except OSError as exc:
            raise ServiceError(507, f"the gallery could not be written: {exc}") from exc
        gallery_now = store.gallery
        return {"label": label, "removed": removed,
                "gallery": {"references": len(gallery_now), "labels": len(gallery_now.labels)}}

    @app.get("/v1/gallery", summary="Labels in the gallery and their reference counts")
    async def list_gallery(request: Request) -> dict[str, Any]:
        if settings.require_key_for_recognize:
            require_key(request, "listing the gallery")
        gallery_now = store.gallery
        counts = gallery_now.label_counts()
        return {"references": len(gallery_now), "labels": len(counts),
                "counts": [{"label": label, "references": counts[label]} for label in sorted(counts)]}

    @app.get("/healthz", summary="Liveness and what is served")
    async def healthz() -> dict[str, Any]:
        gallery_now = store.gallery
        return {"status": "ok", "model_sha256": bundle.weights_sha256, "image_size": bundle.image_size,
                "embedding_dim": bundle.embedding_dim, "threshold": bundle.threshold,
                "gallery": {"references": len(gallery_now), "labels": len(gallery_now.labels)},
                "enrolment": settings.api_key is not None, "recognition_needs_key": settings.require_key_for_recognize,
                "limits": {"max_image_bytes": settings.max_image_bytes, "max_pixels": settings.max_pixels,
                           "max_images": settings.max_images, "max_top_k": MAX_TOP_K}}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def prometheus() -> PlainTextResponse:
        gallery_now = store.gallery
        return PlainTextResponse(metrics.render(len(gallery_now), len(gallery_now.labels)),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(_page())

    return app
