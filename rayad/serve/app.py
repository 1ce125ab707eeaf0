"""The Ray Serve application: a FastAPI ingress in front of a batched, multiplexed scorer.

    client --HTTP--> Api (FastAPI: auth, size limits, decoding, JSON errors)
                      --handle, multiplexed_model_id=<model>--> Scorer (LRU of Predictors, @serve.batch)

Images are decoded with `load_image` and scored with `Predictor.predict_arrays`, exactly as `rayad predict` and
`rayad evaluate` do, so a served score equals theirs for the same file.
"""

# No `from __future__ import annotations` here: FastAPI must see the route signatures' real types after
# Serve rewrites the methods of the ingress class. Serve serialises the deployment classes when they are
# decorated, so everything their methods use is defined above them.
import asyncio
import base64
import hmac
import io
import json
import logging
import re
import typing
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import yaml
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from python_multipart.multipart import parse_options_header
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError, TaskCancelledError
from ray.serve.exceptions import BackPressureError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as StarletteRequest

from rayad import __version__, layout
from rayad.artifact import Predictor, load_model, model_version, read_metadata, trained_category
from rayad.cluster import node_share
from rayad.config import load_yaml
from rayad.cpu import use_cpus
from rayad.data.images import MAX_IMAGE_PIXELS, ImageTooLarge, load_image
from rayad.errors import ArtifactError, ConfigError, DataError, RayadError
from rayad.layout import BEST, METADATA, METRIC_NAMES, TEST_METRICS
from rayad.settings import ServeSettings, threads_for
from rayad.visualize import heatmap_image

log = logging.getLogger(__name__)
API_KEY_HEADER = "x-api-key"
OPENAPI_URL, DOCS_URL, REDOC_URL = "/openapi.json", "/docs", "/redoc"  # behind the API key when one is set
# A client that hangs up mid-upload: Starlette's error, or Ray's when Serve cancels the request as it reads on
DISCONNECTED = (ClientDisconnect, TaskCancelledError)
_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")  # as in PIL's "cannot identify image file <...>"


def _client_message(message: str) -> str:
    """An error message as a client sees it: the upload called "image", no Python object reprs."""
    return _OBJECT_REPR.sub("", message.replace("<bytes>", "image"))


def discover_models(path: str | Path) -> dict[str, str]:
    """The usable models under `path` (see `rayad.layout.discover_models`); an error when there is none."""
    if Path(path).is_file():
        raise RayadError(f"{path}: a file; give a run's folder, an experiment or a folder of those")
    models = layout.discover_models(path)
    if not models:
        raise RayadError(f"{path}: no model found (a run with {METADATA}, an experiment with {BEST}/{METADATA}, "
                         "or a folder of those)")
    return usable_models(models)


def usable_models(models: dict[str, str]) -> dict[str, str]:
    """The models whose artifacts load (`rayad.artifact.load_model` checks them); each broken one is
    logged and left out, so that one bad artifact never stops the others from being served."""
    usable, broken = {}, []
    for name, run in models.items():
        try:
            load_model(run)
            usable[name] = run
        except RayadError as e:
            log.warning("not serving model %r: %s", name, e)
            broken.append(f"{name}: {e}")
    if not usable:
        raise RayadError("no usable model:\n  " + "\n  ".join(broken))
    return usable


def model_card(name: str, run_dir: str) -> dict[str, Any]:
    """What GET /v1/models says about a model (read from its files, without loading the weights)."""
    run = Path(run_dir)
    meta = read_metadata(run / METADATA)
    metrics = _test_metrics(name, run / TEST_METRICS)
    return {"name": name, "version": model_version(run), "category": trained_category(meta),
            "threshold": meta["threshold"], "pixel_threshold": meta["pixel_threshold"],
            "image_size": meta["image_size"], "normalization": meta["normalization"],
            "max_pixels": meta["config"]["data"].get("max_pixels", MAX_IMAGE_PIXELS),  # as `rayad predict` reads
            "metrics": {k: metrics.get(k) for k in METRIC_NAMES}}


def _test_metrics(name: str, path: Path) -> dict[str, Any]:
    """An experiment's test metrics, shown in its card; {} without them. Damaged ones are only not shown."""
    try:
        metrics = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(metrics, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        log.warning("model %r: its %s is unreadable, its card shows no test metrics: %s", name, path, e)
        return {}
    return metrics


def _boundary(request: Request) -> bytes:
    """The multipart boundary the Content-Type names, read as Starlette's parser reads it (b"" without one: the
    parser refuses that)."""
    return parse_options_header(request.headers.get("content-type", ""))[1].get(b"boundary", b"")


def _is_multipart(request: Request) -> bool:
    """Whether the body is multipart/form-data, by the Content-Type's media type (case-blind, RFC 9110). One that
    only begins so (`multipart/form-data,boundary=x`) is refused: Starlette would find no part in it."""
    content_type = request.headers.get("content-type", "")
    media_type = parse_options_header(content_type)[0]
    if media_type != b"multipart/form-data" and media_type.startswith(b"multipart/form-data"):
        raise HTTPException(400, f"Content-Type {content_type[:100]!r} is not multipart/form-data (give "
                                 "'multipart/form-data; boundary=...')")
    return media_type == b"multipart/form-data"


def _given_once(request: Request, *names: str) -> None:
    """A query parameter given twice (`?model=a&model=b`) is refused: FastAPI would take the last one unsaid."""
    for name in names:
        if (count := len(request.query_params.getlist(name))) > 1:
            raise HTTPException(400, f"query parameter {name} given {count} times; give it once")


@asynccontextmanager
async def _uploads(request: Request, limit_mb: float, max_files: int) -> AsyncIterator[list[tuple[str, UploadFile]]]:
    """(filename, file) of each file of a multipart body, parsed as it arrives and refused with 413 as soon
    as it passes the limit; the files (in memory up to 1 MB each, Starlette's spool size) are open inside
    the `async with`. The body is never held beside its files, nor the files beside copies of themselves."""
    limit = _checked_length(request, limit_mb)
    received, closing = 0, b"--" + _boundary(request) + b"--"
    last, closed = b"", False  # the body's last bytes, and whether its closing boundary came

    async def receive() -> dict[str, Any]:
        nonlocal received, last, closed
        message = await request.receive()
        chunk = message.get("body", b"")
        received += len(chunk)
        if received > limit:
            raise HTTPException(413, f"body is over the limit of {limit:,} bytes")
        tail = chunk[-len(closing):]  # the boundary may span two chunks: look at the last bytes before this one
        closed = closed or closing in chunk or closing in last + chunk[:len(closing)]
        last = (last + tail)[-len(closing):]
        return message

    try:
        form = await StarletteRequest(request.scope, receive).form(max_files=max_files, max_fields=max_files)
    except (HTTPException, *DISCONNECTED):
        raise
    except Exception as e:  # noqa: BLE001 - malformed multipart bodies raise various parser errors
        detail = e.detail if isinstance(e, StarletteHTTPException) else str(e)
        if detail.startswith("Too many files"):  # Starlette's words for more than max_files
            raise HTTPException(*_too_many_files(max_files)) from None
        raise HTTPException(400, _client_message(f"malformed multipart body ({detail})")) from None
    if not closed:  # Starlette drops the part that was cut short, and its file would be missing from the answer
        await form.close()
        raise HTTPException(400, "malformed multipart body (cut short: its closing boundary never came)")
    files = [(item.filename or key, item) for key, item in form.multi_items() if isinstance(item, UploadFile)]
    fields = [key for key, item in form.multi_items() if not isinstance(item, UploadFile)]
    if files and fields:  # it was dropped without a word (a form of text alone is told how to send a file)
        await form.close()
        raise HTTPException(400, _client_message(f"the form's field {fields[0]!r} is no file; send only images"))
    try:
        yield files
    finally:
        await form.close()


def _too_many_files(max_files: int) -> tuple[int, str]:
    if max_files == 1:
        return 400, "one image per request here; send several to /v1/predict/batch"
    return 413, f"more than {max_files} images in one batch (the limit of --max-batch-images)"


def _checked_length(request: Request, limit_mb: float) -> int:
    """The limit in bytes; 413 at once when the declared Content-Length is over it."""
    limit = int(limit_mb * 2**20)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body of {int(declared):,} bytes is over the limit of {limit:,}")
    return limit


def _root_path(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/")


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


MODELS_PER_REPLICA = 4  # the LRU size of loaded models in each scorer replica


class ModelChanged(ArtifactError):
    """A scorer loaded a model whose files are not those the API describes (`GET /v1/models`): they changed after
    the server started. Replicas load models when first asked, and again after the LRU let them go."""


@serve.deployment
class Scorer:
    """Holds an LRU of loaded models (Serve multiplexing) and scores concurrent requests in batches."""

    def __init__(self, settings: dict[str, Any], threads: int):
        self.settings = ServeSettings(**settings)
        use_cpus(threads)
        self.score_batch.set_max_batch_size(self.settings.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(self.settings.batch_wait_s)

    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_REPLICA)
    async def get_model(self, name: str) -> tuple[Predictor, str]:
        """The model and its version (`model_version`)."""
        run = self.settings.models[name]
        return Predictor.load(run), model_version(run)

    async def score(self, image: np.ndarray, with_map: bool, version: str) -> dict[str, Any]:
        """`version`: the model's when the API started, to which it resized `image`."""
        name = serve.get_multiplexed_model_id()
        predictor, loaded = await self.get_model(name)
        if (loaded, predictor.image_size) != (version, image.shape[0]):
            raise ModelChanged(f"model {name!r} changed on disk since the server started (version {version}, now "
                               f"{loaded}); restart the server to serve it")
        return await self.score_batch(predictor, image, with_map)

    @serve.batch
    async def score_batch(self, predictors: list[Predictor], images: list[np.ndarray], with_maps: list[bool]
                          ) -> list[dict[str, Any]]:
        """One forward pass per model present in the batch."""
        results: list[dict[str, Any] | None] = [None] * len(images)
        groups: dict[int, list[int]] = defaultdict(list)
        for i, predictor in enumerate(predictors):
            groups[id(predictor)].append(i)
        for indices in groups.values():
            predictor = predictors[indices[0]]
            preds = predictor.predict_arrays(np.stack([images[i] for i in indices]), len(indices))
            masks = preds.masks() if any(with_maps[i] for i in indices) else None
            for row, i in enumerate(indices):
                results[i] = {"score": float(preds.scores[row]), "normalized_score": float(preds.normalized[row]),
                              "label": bool(preds.labels[row]), "threshold": preds.threshold,
                              "pixel_threshold": preds.pixel_threshold,
                              "map": preds.maps[row] if with_maps[i] else None,
                              "mask": masks[row] if with_maps[i] else None}
        return results


# The docs and the schema are routes of Api below (not FastAPI's own), so that they need the API key too. A path
# with a trailing slash is no route (FastAPI redirected it, before the API key was checked).
app = FastAPI(title="rayad", version=__version__, description="Visual anomaly detection: score images.",
              openapi_url=None, docs_url=None, redoc_url=None, redirect_slashes=False)
_BINARY = {"type": "string", "format": "binary"}
# The bodies the routes read themselves, described for the schema (and /docs' "Try it out")
IMAGE_BODY = {"requestBody": {"required": True, "content": {
    "application/octet-stream": {"schema": _BINARY},
    "multipart/form-data": {"schema": {"type": "object", "properties": {"file": _BINARY}, "required": ["file"]}}}}}
BATCH_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "properties": {"files": {"type": "array", "items": _BINARY}}, "required": ["files"]}}}}}


@app.exception_handler(StarletteHTTPException)  # FastAPI's HTTPException too, and routing's 404 and 405
async def _json_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail
    if type(exc) is StarletteHTTPException and exc.status_code == 404:  # no route: not an unknown model
        detail = f"no such route: {request.url.path} (the API is listed at {DOCS_URL})"
    elif type(exc) is StarletteHTTPException and exc.status_code == 405:
        detail = f"method {request.method} is not allowed on {request.url.path}"
    return JSONResponse({"error": detail}, status_code=exc.status_code, headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def _bad_parameters(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return JSONResponse({"error": f"bad request parameters ({problems})"}, status_code=422)


@app.exception_handler(ClientDisconnect)
@app.exception_handler(TaskCancelledError)
async def _disconnected(request: Request, exc: Exception) -> Response:
    log.info("client left during %s %s; request dropped", request.method, request.url.path)
    return Response(status_code=499)  # nobody reads it: nginx's code for a request the client closed


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s", request.url.path)
    return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)


def authorize(request: Request, key: str | None) -> None:
    """With an API key set: the X-API-Key header, or `Authorization: Bearer KEY`, compared in constant time."""
    if not key:
        return
    given = request.headers.get(API_KEY_HEADER)
    if given is None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip(" \t") if scheme.lower() == "bearer" else ""  # not str.strip(): 0xa0 ends 'à' in UTF-8
    # Starlette decodes header values as Latin-1: encoding them back gives the bytes that were sent.
    if not hmac.compare_digest(given.encode("latin-1", "replace"), key.encode()):
        raise HTTPException(401, "missing or wrong API key (send it in the X-API-Key header, or as "
                                 "Authorization: Bearer KEY)", headers={"WWW-Authenticate": "Bearer"})


async def _key_of_this_replica(request: Request) -> None:
    authorize(request, serve.get_replica_context().servable_object.settings.api_key)


# A route dependency runs before FastAPI checks the query, so a client without the key gets 401, never a 422
# that would tell it about the parameters.
KEY_REQUIRED = [Depends(_key_of_this_replica)]


@serve.deployment
@serve.ingress(app)
class Api:
    """HTTP routes. Validates everything a client can get wrong before the scorer sees it."""

    def __init__(self, scorer, settings: dict[str, Any]):
        self.scorer = scorer
        self.settings = ServeSettings(**settings)
        self.cards = {name: model_card(name, run) for name, run in usable_models(self.settings.models).items()}
        self.scored: set[str] = set()  # the models a scorer has answered for since this replica started
        self.last_scored = ""
        self.stopping, self.in_flight = False, 0  # see `drain`

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.api_route("/readyz", methods=["GET", "HEAD"])
    async def readyz(self) -> dict[str, Any]:
        """Ready when the scorer has answered for every model (loading them if needed), and answers now for the
        one that last did. Probing all each time would load them in turn where they outnumber a replica's LRU. A
        full queue is busy, not unready, for a model it has answered for: under load the probe would otherwise
        take replicas out of service just when they are needed."""
        if self.stopping:
            raise HTTPException(503, "not ready: the server is stopping")
        blank = np.zeros((8, 8, 3), np.uint8)
        for name in [n for n in self.cards if n not in self.scored] or [self.last_scored]:
            card = self.cards[name]
            image = np.resize(blank, (card["image_size"], card["image_size"], 3))
            try:
                await self.scorer.options(multiplexed_model_id=name).score.remote(image, False, card["version"])
            except BackPressureError:
                if name not in self.scored:
                    raise HTTPException(503, "not ready: BackPressureError") from None
            except Exception as e:  # noqa: BLE001 - any other failure means not ready
                raise HTTPException(503, f"not ready: {type(e).__name__}") from None
            self.scored.add(name)
            self.last_scored = name
        return {"status": "ready", "models": sorted(self.cards)}

    async def drain(self, timeout_s: float) -> int:
        """Refuse new images (503) and wait up to `timeout_s` for those being scored; returns how many are left.
        `rayad serve` calls this before it deletes the application: Serve stops the scorer replicas at once, and
        the requests queued for them would wait for none, then fail when this replica is stopped."""
        self.stopping = True
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        return self.in_flight

    @asynccontextmanager
    async def _accepted(self) -> AsyncIterator[None]:
        """Around a request that scores: counted for `drain`, or refused once the server is stopping."""
        if self.stopping:
            raise HTTPException(503, "the server is stopping; retry shortly", headers={"Retry-After": "1"})
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    @app.get(OPENAPI_URL, include_in_schema=False, dependencies=KEY_REQUIRED)
    async def openapi(self) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get(DOCS_URL, include_in_schema=False, dependencies=KEY_REQUIRED)
    async def docs(self, request: Request) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=_root_path(request) + OPENAPI_URL, title=f"{app.title} - Swagger UI")

    @app.get(REDOC_URL, include_in_schema=False, dependencies=KEY_REQUIRED)
    async def redoc(self, request: Request) -> HTMLResponse:
        return get_redoc_html(openapi_url=_root_path(request) + OPENAPI_URL, title=f"{app.title} - ReDoc")

    @app.get("/v1/models", dependencies=KEY_REQUIRED)
    async def models(self) -> dict[str, Any]:
        return {"models": list(self.cards.values())}

    @app.post("/v1/predict", dependencies=KEY_REQUIRED, openapi_extra=IMAGE_BODY)
    async def predict(self, request: Request, model: str | None = None, heatmap: bool = False) -> dict[str, Any]:
        """One image: the raw request body, or a multipart upload (field `file`)."""
        _given_once(request, "model", "heatmap")
        name = self._model(model)
        async with self._accepted():
            if _is_multipart(request):
                async with _uploads(request, self.settings.max_upload_mb, max_files=1) as files:
                    if not files:
                        raise HTTPException(400, "no file in the multipart upload (send it in the field 'file' as a "
                                                 "file: curl -F file=@image.png)")
                    body = await files[0][1].read()
            else:
                body = await self._read_body(request, self.settings.max_upload_mb)
            return await self._score(name, await self._decode(body, name), heatmap)

    @app.post("/v1/predict/batch", dependencies=KEY_REQUIRED, openapi_extra=BATCH_BODY)
    async def predict_batch(self, request: Request, model: str | None = None, heatmap: bool = False
                            ) -> dict[str, Any]:
        """Several images as a multipart upload (any field names); bad images get an error entry each."""
        _given_once(request, "model", "heatmap")
        name = self._model(model)
        if not _is_multipart(request):
            raise HTTPException(400, "send the images as multipart/form-data")
        async with self._accepted(), _uploads(request, self.settings.max_batch_mb,
                                              self.settings.max_batch_images) as files:
            if not files:
                raise HTTPException(400, "no files in the upload")
            in_flight = asyncio.Semaphore(self.settings.batch_images_in_flight)
            try:  # a 503 cancels the batch's other images (gather went on scoring them, crowding other requests)
                async with asyncio.TaskGroup() as group:
                    tasks = [group.create_task(self._score_upload(name, filename, upload, heatmap, in_flight))
                             for filename, upload in files]
            except BaseExceptionGroup as failed:
                raise failed.exceptions[0] from None
            return {"model": name, "results": [task.result() for task in tasks]}

    async def _score_upload(self, name: str, filename: str, upload: UploadFile, heatmap: bool,
                            in_flight: asyncio.Semaphore) -> dict[str, Any]:
        try:
            if upload.size is not None and upload.size > self.settings.max_upload_mb * 2**20:
                raise HTTPException(413, f"over the upload limit of {self.settings.max_upload_mb:g} MB")
            try:
                image = await self._decode(upload.file if upload.size else b"", name)  # from the file: no copy
            finally:
                await upload.close()  # its memory goes as soon as it is decoded
            async with in_flight:
                return {"file": filename, **await self._score(name, image, heatmap)}
        except HTTPException as e:
            if e.status_code == 503:
                raise
            return {"file": filename, "error": e.detail, "status": e.status_code}

    async def _score(self, name: str, image: np.ndarray, heatmap: bool) -> dict[str, Any]:
        card = self.cards[name]
        try:
            result = await self.scorer.options(multiplexed_model_id=name).score.remote(image, heatmap, card["version"])
        except BackPressureError:
            raise HTTPException(503, "overloaded: too many requests queued; retry shortly",
                                headers={"Retry-After": "1"}) from None
        except (RayActorError, ActorUnavailableError):  # a replica died; Serve is replacing it
            raise HTTPException(503, "a scorer replica failed and is restarting; retry shortly",
                                headers={"Retry-After": "1"}) from None
        except RayTaskError as e:
            if isinstance(e.cause, ModelChanged):
                raise HTTPException(503, str(e.cause)) from None
            if isinstance(e.cause, ArtifactError):  # its files changed after the start, and broke
                log.error("model %r cannot be loaded: %s", name, e.cause)
                raise HTTPException(503, f"model {name!r} cannot be loaded (its files are damaged; see the "
                                         "server log)") from None
            raise
        self.scored.add(name)
        self.last_scored = name
        out = {"model": name, "version": card["version"], "score": result["score"],
               "normalized_score": result["normalized_score"], "label": result["label"],
               "threshold": result["threshold"]}
        if heatmap:
            out["pixel_threshold"] = result["pixel_threshold"]
            out["heatmap_png"] = _png_base64(heatmap_image(result["map"], result["pixel_threshold"]))
            out["mask_png"] = _png_base64(Image.fromarray(result["mask"].astype(np.uint8) * 255))
        return out

    def _model(self, model: str | None) -> str:
        if model is None:
            if len(self.cards) == 1:
                return next(iter(self.cards))
            raise HTTPException(400, f"several models are served; pick one with ?model= ({sorted(self.cards)})")
        if model not in self.cards:  # named in part: a client's name of any length came back whole
            shown = model if len(model) <= 80 else f"{model[:80]}… ({len(model):,} characters)"
            raise HTTPException(404, f"unknown model {shown!r}; served: {sorted(self.cards)}")
        return model

    async def _decode(self, content: bytes | BinaryIO, name: str) -> np.ndarray:
        """Decoded in a worker thread: the event loop keeps answering (/healthz) while images decode."""
        if isinstance(content, bytes) and not content:
            raise HTTPException(400, "empty image")
        try:
            card = self.cards[name]
            return await asyncio.to_thread(load_image, content, card["image_size"],
                                           min(self.settings.max_pixels, card["max_pixels"]))
        except ImageTooLarge as e:
            raise HTTPException(413, _client_message(str(e))) from None
        except DataError as e:
            raise HTTPException(400, _client_message(str(e))) from None

    @staticmethod
    async def _read_body(request: Request, limit_mb: float) -> bytes:
        """The body, refused with 413 as soon as it passes the limit (never buffered beyond it)."""
        limit = _checked_length(request, limit_mb)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"body is over the limit of {limit:,} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        if not body:
            raise HTTPException(400, "empty body: send an image")
        return body


def scorer_cpus(settings: ServeSettings) -> float:
    """A scorer replica's CPUs: `replica_cpus`, or by default the smallest node's cores shared by `max_replicas`
    replicas, at least 1. On 2 cores one replica with both served 1.3x the requests of one with 1 CPU, and two
    replicas of 1 CPU no more (docs/benchmarks.md)."""
    if settings.replica_cpus is not None:
        return settings.replica_cpus
    return node_share(settings.max_replicas)


def build_app(settings: ServeSettings):
    """The Serve application graph for `serve.run` (and `rayad serve`), on a connected Ray cluster."""
    raw, cpus = asdict(settings), scorer_cpus(settings)
    threads = threads_for(cpus)
    log.info("scorer replicas: %g CPU each, %d torch threads", cpus, threads)
    scorer = Scorer.options(
        ray_actor_options={"num_cpus": cpus, "num_gpus": settings.replica_gpus},
        autoscaling_config={"min_replicas": settings.min_replicas, "max_replicas": settings.max_replicas,
                            "target_ongoing_requests": settings.target_ongoing_requests},
        max_ongoing_requests=max(2 * settings.max_batch_size, int(settings.target_ongoing_requests)),
        max_queued_requests=settings.max_queued_requests,
    ).bind(raw, threads)
    return Api.options(ray_actor_options={"num_cpus": settings.ingress_cpus}, max_ongoing_requests=1000).bind(
        scorer, raw)


def app_builder(args: dict[str, Any]):
    """Entry for `serve run` / `serve deploy` configs: args are ServeSettings fields, plus `run` (a
    folder to discover models in) instead of `models`."""
    args = dict(args)
    unknown = set(args) - {f.name for f in fields(ServeSettings)} - {"run"}
    if unknown:
        raise ConfigError(f"serve config args: unknown {sorted(unknown)}; valid: run and the fields of "
                          f"{sorted(f.name for f in fields(ServeSettings))}")
    if "run" in args:
        args["models"] = discover_models(args.pop("run"))
    hints = typing.get_type_hints(ServeSettings)
    text_fields = {name for name, tp in hints.items() if tp is str or set(typing.get_args(tp)) == {str, type(None)}}
    args = {name: _scalar(value) if isinstance(value, str) and name not in text_fields else value
            for name, value in args.items()}
    return build_app(ServeSettings(**args))


def _scalar(text: str) -> Any:
    """A value `serve run IMPORT_PATH key=value` gave as text, read as YAML reads it ("16" is 16); text that is no
    YAML stays text, for ServeSettings to name."""
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text

