"""The HTTP service: ``create_app(index, settings)`` returns a FastAPI application.

Every error is JSON ``{"detail": ...}`` with a 4xx status: bad input never reaches a 5xx
or stops the server. Blocking work (decoding, feature extraction, updates, log folds)
runs in a thread pool of ``settings.workers`` threads, searches in the index's searcher
thread (``ServedIndex.submit_search``); the event loop only parses requests.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations, which
# refer to this module's closures (the settings' limits).

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated

import anyio
from fastapi import (
    Depends,
    FastAPI,
    File,
    Form,
    HTTPException,
    Query,
    Request,
    UploadFile,
)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, Field

from .. import __version__
from .._validation import AsmkitError
from .service import KeyConflict, KeyNotFound, ReadOnlyIndex, ServedHybrid, ServedIndex, read_npy
from .settings import Settings

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


# ------------------------------------------------------------------------------ models


class Timings(BaseModel):
    """Milliseconds spent on each step of a request."""

    read_ms: float = Field(description="reading the upload (and decoding the .npy)")
    features_ms: float = Field(0.0, description="decoding the image and extracting its features")
    search_ms: float = Field(0.0, description="Index.search")
    update_ms: float = Field(0.0, description="logging (fsync) and applying an update")
    total_ms: float


class SearchResponse(BaseModel):
    keys: list[str] = Field(description="the best images, best first")
    scores: list[float] = Field(description="their scores, decreasing")
    descriptors: int = Field(description="local descriptors of the query")
    timings: Timings


class AddResponse(BaseModel):
    added: list[str]
    images: int = Field(description="images in the index afterwards")
    timings: Timings


class RemoveResponse(BaseModel):
    removed: str
    images: int


class MemberStats(BaseModel):
    preset: str
    codebook_size: int
    dim: int
    posting_entries: int


class Stats(BaseModel):
    images: int
    version: int = Field(description="increases with every update")
    codebook_size: int = Field(description="of the first member, for a hybrid index")
    dim: int = Field(description="of the first member, for a hybrid index")
    preset: str
    posting_entries: int = Field(description="summed over the members, for a hybrid index")
    wal_records: int = Field(description="logged updates not yet folded into the saved index")
    wal_bytes: int
    last_fold: float = Field(description="Unix time of the last fold")
    uptime_s: float
    version_asmkit: str
    members: list[MemberStats] | None = Field(None, description="each member of a hybrid index")


class Health(BaseModel):
    status: str
    images: int


class ErrorBody(BaseModel):
    detail: str | list


# ------------------------------------------------------------------------------ ASGI guards


class _BodyTooLarge(Exception):
    pass


class _LimitBody:
    """Refuses request bodies over ``limit`` bytes with 413: at once when Content-Length
    says so, else when the bytes read pass the limit."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _send_json(send, 413, f"request body larger than {self.limit} bytes")
        seen, exceeded, started = 0, False, False
        too_large = f"request body larger than {self.limit} bytes"

        async def limited_receive():
            nonlocal seen, exceeded
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                exceeded = True
                raise _BodyTooLarge
            return message

        async def guarded_send(message):
            # The app may turn the interrupted read into an error of its own (a form
            # parser's "bad request"): the answer is "too large" all the same.
            nonlocal started
            if exceeded:
                if not started:
                    started = True
                    await _send_json(send, 413, too_large)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            if not started:
                await _send_json(send, 413, too_large)


async def _send_json(send, status: int, detail: str) -> None:
    response = JSONResponse({"detail": detail}, status_code=status)
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


class _Metrics:
    """Prometheus counters of one application (its own registry, so that several apps in
    one process do not share counts)."""

    def __init__(self, service: ServedIndex | ServedHybrid) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "asmkit_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "asmkit_request_duration_seconds",
            "HTTP request latency",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        Gauge("asmkit_index_images", "Images in the index", registry=self.registry).set_function(lambda: len(service))
        Gauge("asmkit_wal_records", "Logged updates not yet folded", registry=self.registry).set_function(
            lambda: service.pending[0]
        )
        Gauge("asmkit_wal_bytes", "Bytes of the log not yet folded", registry=self.registry).set_function(
            lambda: service.pending[1]
        )


class _MeasureRequests:
    """Counts requests by method, route template and status, and times them."""

    def __init__(self, app, metrics: _Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500
        t0 = time.perf_counter()

        async def record_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            # The route template, not the path: paths carry keys, which would make a
            # series per image.
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)


# ------------------------------------------------------------------------------ the app


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def create_app(index: ServedIndex | ServedHybrid, settings: Settings | None = None) -> FastAPI:
    """The service over ``index``.

    The application owns ``index`` from then on: its shutdown folds the log and releases
    the workspace. A TestClient used as a context manager runs startup and shutdown.

    Parameters
    ----------
    index : ServedIndex or ServedHybrid
        A hybrid workspace is searched only: adds and removes answer 405.
    settings : Settings, optional
        Default: ``index.settings``.
    """
    settings = settings or index.settings
    limiter = anyio.CapacityLimiter(settings.workers)
    started = time.time()
    page = (resources.files("asmkit.serve") / "static" / "index.html").read_text(encoding="utf-8")

    async def blocking(fn: Callable, *args):
        return await anyio.to_thread.run_sync(fn, *args, limiter=limiter)

    async def fold_periodically():
        while True:
            await asyncio.sleep(settings.fold_interval_s)
            try:
                await blocking(index.fold)
            except OSError:
                logger.exception("folding the log failed; the log keeps the updates")

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        task = asyncio.create_task(fold_periodically())
        try:
            yield
        finally:
            task.cancel()
            await anyio.to_thread.run_sync(index.close)

    app = FastAPI(
        title="asmkit serve",
        version=__version__,
        lifespan=lifespan,
        description="Search an ASMK image index over HTTP; add and remove images durably.",
        responses={
            400: {"model": ErrorBody},
            401: {"model": ErrorBody},
            413: {"model": ErrorBody},
            422: {"model": ErrorBody},
        },
    )
    metrics = _Metrics(index)
    bearer = HTTPBearer(auto_error=False)

    def check_token(credentials: HTTPAuthorizationCredentials | None) -> None:
        given = "" if credentials is None else credentials.credentials
        if not hmac.compare_digest(given.encode(), settings.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    # async: FastAPI would run a plain function in the thread pool, a hand-off per request.
    async def require_write(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if settings.token is not None:
            check_token(credentials)

    async def require_read(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if settings.token_reads:
            check_token(credentials)

    @app.exception_handler(KeyNotFound)
    async def not_found(_request: Request, exc: KeyNotFound):
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(KeyConflict)
    async def conflict(_request: Request, exc: KeyConflict):
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(ReadOnlyIndex)
    async def read_only(_request: Request, exc: ReadOnlyIndex):
        return JSONResponse({"detail": str(exc)}, status_code=405)

    @app.exception_handler(AsmkitError)
    async def bad_input(_request: Request, exc: AsmkitError):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError):
        # The default handler echoes the input, which can be megabytes of an upload.
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def home() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        return Health(status="ok", images=len(index))

    @app.get("/stats", response_model=Stats, dependencies=[Depends(require_read)])
    async def stats() -> Stats:
        return Stats(**index.stats(), uptime_s=time.time() - started, version_asmkit=__version__)

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(require_read)])
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get(
        "/thumbnail",
        dependencies=[Depends(require_read)],
        responses={200: {"content": {"image/jpeg": {}}}, 404: {"model": ErrorBody}},
    )
    async def thumbnail(key: Annotated[str, Query(max_length=settings.max_key_length * 4)]) -> Response:
        data = await blocking(index.thumbnail, key)
        if data is None:
            raise HTTPException(404, f"no readable image file for key {key!r}")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=300"})

    @app.post("/search", response_model=SearchResponse, dependencies=[Depends(require_read)])
    async def search(
        k: Annotated[int, Query(ge=1, le=settings.max_k, description="results to return")] = 10,
        image: Annotated[UploadFile | None, File(description="an image file")] = None,
        descriptors: Annotated[UploadFile | None, File(description="float32 [n, D] local descriptors, .npy")] = None,
    ) -> SearchResponse:
        """Search with an image (featurised as the index's images were) or its descriptors."""
        t0 = time.perf_counter()
        if (image is None) == (descriptors is None):
            raise HTTPException(422, "give exactly one of the multipart fields 'image' and 'descriptors'")
        data = await (image or descriptors).read()
        timings = {"read_ms": 0.0, "features_ms": 0.0}
        if descriptors is not None:
            vecs = read_npy(data, "descriptors")
            timings["read_ms"] = _ms(time.perf_counter() - t0)
        elif getattr(index, "query_turns", ()):
            # A workspace that searches each query at several rotations (deep_qrot).
            timings["read_ms"] = _ms(time.perf_counter() - t0)
            t1 = time.perf_counter()
            turned = await blocking(index.featurize_query, data)
            timings["features_ms"] = _ms(time.perf_counter() - t1)
            t1 = time.perf_counter()
            keys, scores = await blocking(index.search_turned, turned, k)
            timings["search_ms"] = _ms(time.perf_counter() - t1)
            timings["total_ms"] = _ms(time.perf_counter() - t0)
            return SearchResponse(keys=keys, scores=scores, descriptors=len(turned[0]), timings=Timings(**timings))
        else:
            timings["read_ms"] = _ms(time.perf_counter() - t0)
            t1 = time.perf_counter()
            vecs = await blocking(index.featurize, data)
            timings["features_ms"] = _ms(time.perf_counter() - t1)
        t1 = time.perf_counter()
        # Awaited on the event loop: the searcher thread answers, no pool thread waits.
        keys, scores = await asyncio.wrap_future(index.submit_search(vecs, k))
        timings["search_ms"] = _ms(time.perf_counter() - t1)
        timings["total_ms"] = _ms(time.perf_counter() - t0)
        # A hybrid's query is one descriptor array per member.
        n = sum(len(v) for v in vecs) if isinstance(vecs, list) else len(vecs)
        return SearchResponse(keys=keys, scores=scores, descriptors=n, timings=Timings(**timings))

    @app.post(
        "/images",
        response_model=AddResponse,
        status_code=201,
        dependencies=[Depends(require_write)],
        responses={409: {"model": ErrorBody}},
    )
    async def add_images(
        image: Annotated[list[UploadFile], File(description="image files (one or more)")],
        key: Annotated[list[str], Form(description="one key per image, in the same order")],
    ) -> AddResponse:
        """Add images; the answer comes once they are in the fsynced log."""
        index.check_writable()
        t0 = time.perf_counter()
        if len(image) != len(key):
            raise HTTPException(422, f"got {len(image)} images and {len(key)} keys; give one key per image")
        data = [await upload.read() for upload in image]
        read_ms = _ms(time.perf_counter() - t0)
        t1 = time.perf_counter()
        vecs = [await blocking(index.featurize, item) for item in data]
        features_ms = _ms(time.perf_counter() - t1)
        t1 = time.perf_counter()
        images = await blocking(index.add, list(zip(key, vecs)))
        timings = Timings(
            read_ms=read_ms,
            features_ms=features_ms,
            update_ms=_ms(time.perf_counter() - t1),
            total_ms=_ms(time.perf_counter() - t0),
        )
        if index.pending[1] >= settings.fold_bytes:
            asyncio.get_running_loop().create_task(blocking(index.fold))
        return AddResponse(added=key, images=images, timings=timings)

    @app.delete(
        "/images/{key:path}",
        response_model=RemoveResponse,
        dependencies=[Depends(require_write)],
        responses={404: {"model": ErrorBody}},
    )
    async def remove_image(key: str) -> RemoveResponse:
        """Remove an image; the answer comes once the removal is in the fsynced log."""
        index.check_writable()
        images = await blocking(index.remove, key)
        return RemoveResponse(removed=key, images=images)

    app.add_middleware(_MeasureRequests, metrics=metrics)
    app.add_middleware(_LimitBody, limit=settings.max_request_bytes)
    return app
