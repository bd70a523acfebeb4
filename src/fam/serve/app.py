"""The HTTP API of ``fam serve`` (FastAPI), for one embedding model and optionally one index.

    POST /v1/embeddings   OpenAI's shape; images via vLLM's ``messages`` or an ``input`` object
    POST /v1/search       top-k of the loaded index for a text and/or image query (MaxSim
                          and per-query-token similarity maps on a multi-vector index)
    GET  /v1/models       the served model
    GET  /health          liveness, model, index size, batching counters
    GET  /                the search page (when an index is loaded)
    GET  /v1/index/items/{i}/image   the image of indexed item i (only files the index lists)
    GET  /v1/index/items/{i}/images/{j}, .../video_frames/{j}   its further images, its
                          video's sampled frames (the search page's frame strip)

Client errors are answered ``{"error": {"message", "type", "param", "code"}}`` with a 4xx
status and one line naming the field; an unexpected failure is logged with its traceback and
answered 500 with no internals. The model runs on one worker thread
(:class:`fam.serve.batching.BatchEncoder`) that groups concurrent requests.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import logging
import secrets
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from fam.errors import DataError
from fam.serve.batching import BatchEncoder, QueueFull
from fam.serve.hits import hit_json
from fam.config import ServeConfig
from fam.serve.inputs import ParsedInput, RequestError, load_images, parse_input, parse_messages
from fam.serve.late import check_maps_flag, late_maps, late_search

log = logging.getLogger(__name__)

_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
                ".webp": "image/webp", ".gif": "image/gif", ".bmp": "image/bmp"}


def error_body(status: int, message: str, type_: str = "invalid_request_error",
               param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes (413), declared or streamed."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _send_json(send, 413, error_body(
                413, f"request body of {int(declared)} bytes is larger than the limit of "
                     f"{self.limit} bytes"))
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise RequestError(413, f"request body is larger than the limit of "
                                            f"{self.limit} bytes")
            return msg

        return await self.app(scope, limited, send)


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class Service:
    """What the routes share: the model worker, the index, the settings.

    Args:
        model: a :class:`fam.model.EmbeddingModel` (owned by the worker thread from now on).
        config: server settings.
        index: an optional :class:`fam.index.Index` built by this model.
        model_path: the model folder (for ``/v1/models``).
    """

    def __init__(self, model, config: ServeConfig, index=None, model_path: str | None = None):
        from fam.index.embed import embed

        config.validate()
        self.model, self.config, self.index = model, config, index
        self.name = config.served_model_name or (Path(model_path).name if model_path else "fam")
        self.created = int(time.time())
        self.dim = int(model.adapter.hidden_size)
        #: The model's input rules (the contract ``fam encode`` applies too).
        self.rules = model.adapter.input_rules
        # A copy for usage counts on the event loop: the worker thread uses the adapter's
        # tokenizer, and a fast tokenizer must not be used from two threads at once.
        self.tokenizer = copy.deepcopy(model.adapter.tokenizer)

        def encode(items, images):
            return embed(model, items, [ims or None for ims in images],
                         batch_size=config.max_batch)

        self.encoder = BatchEncoder(encode, config.max_batch, config.max_wait_ms,
                                    config.max_queue)
        #: Late interaction and similarity maps on a multi-vector index (fam.serve.late).
        self.late = late_maps(index, model, model_path)

    async def embed(self, inputs: list[ParsedInput]) -> torch.Tensor:
        images = await load_images(inputs, self.config, self.rules)
        try:
            fut = self.encoder.submit([p.item() for p in inputs], images)
        except QueueFull as e:
            raise RequestError(503, f"server busy: {e}; retry later", type_="server_busy") \
                from None
        return await asyncio.wrap_future(fut)

    def count_tokens(self, inputs: list[ParsedInput]) -> int:
        """Text tokens of the inputs (image tokens are not counted)."""
        return sum(len(self.tokenizer(p.text, add_special_tokens=False)["input_ids"])
                   for p in inputs)

    def check_model_name(self, body: dict) -> None:
        name = body.get("model")
        if name is not None and name != self.name:
            raise RequestError(404, f"model {name!r} is not served here; GET /v1/models lists "
                                    f"{self.name!r}", "model", "model_not_found")


def load_service(model: str | Path, config: ServeConfig, index: str | Path | None = None,
                 image_root: str | Path | None = None) -> Service:
    """Load the model (and an index, checked to be built by it) into a :class:`Service`.

    Raises:
        ConfigError: invalid settings, not an index folder, or an index of another model.
    """
    from fam.index.identity import model_identity
    from fam.index.index import Index
    from fam.model.encode import load_embedding_model

    config.validate()
    idx = None
    if index is not None:
        idx = Index.load(index, image_root=image_root)
        idx.check_model(model_identity(model), str(model))
    return Service(load_embedding_model(model), config, idx, model_path=str(model))


def _json_object(raw: bytes) -> dict:
    if not raw:
        raise RequestError(400, "empty request body; send a JSON object")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = f"{e.msg} at line {e.lineno} column {e.colno}" if isinstance(
            e, json.JSONDecodeError) else "not UTF-8"
        raise RequestError(400, f"malformed JSON body ({msg})") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the JSON body must be an object")
    return body


def _encode_vector(v: torch.Tensor, fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii")
    return v.tolist()


def _json(obj: dict) -> Response:
    # Serialised here (plain json) rather than through FastAPI's jsonable_encoder, which walks
    # every float of every vector in Python: the largest per-request cost of a busy server.
    return Response(json.dumps(obj, separators=(",", ":")), media_type="application/json")


def create_app(service: Service) -> FastAPI:
    """The FastAPI application around a :class:`Service`."""
    cfg = service.config

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        log.info("serving model %s (dim %d)%s", service.name, service.dim,
                 f" with an index of {len(service.index)} items" if service.index else "")
        yield
        # Graceful shutdown: uvicorn has stopped accepting and waited for open requests;
        # the worker finishes anything still queued, then stops.
        service.encoder.close()
        log.info("model worker stopped (%d requests, %d batches)", service.encoder.stats.requests,
                 service.encoder.stats.batches)

    app = FastAPI(title="fam embedding server", lifespan=lifespan, docs_url="/docs",
                  redoc_url=None)
    app.add_middleware(BodyLimit, limit=cfg.max_request_bytes)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError):
        return JSONResponse(error_body(e.status, e.message, e.type, e.param), status_code=e.status,
                            headers={"WWW-Authenticate": "Bearer"} if e.status == 401 else None)

    @app.exception_handler(DataError)
    async def _data_error(request: Request, e: DataError):
        # The contract checks inputs before they are queued; one that only the model could
        # refuse still gets a 400 with its reason, never a 500.
        status = getattr(e, "status", 400)
        return JSONResponse(error_body(status, getattr(e, "reason", str(e))),
                            status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        msg = {404: f"no such endpoint: {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(
                   e.status_code, str(e.detail))
        return JSONResponse(error_body(e.status_code, msg), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        return JSONResponse(error_body(400, f"{where}: {err.get('msg', 'invalid request')}"),
                            status_code=400)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=e)
        return JSONResponse(error_body(500, "internal server error (details are in the "
                                            "server log)", "server_error"), status_code=500)

    def authorize(request: Request) -> None:
        if cfg.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise RequestError(401, "missing bearer token: send 'Authorization: Bearer <key>'",
                               type_="authentication_error")
        if not secrets.compare_digest(token.strip().encode(), cfg.api_key.encode()):
            raise RequestError(401, "invalid API key", type_="authentication_error")

    def need_index() -> Any:
        if service.index is None:
            raise RequestError(404, "no index is loaded: start fam serve with --index IDX",
                               type_="not_found")
        return service.index

    @app.get("/health")
    async def health():
        s = service.encoder.stats
        return {"status": "ok", "model": service.name, "dim": service.dim,
                "index": len(service.index) if service.index is not None else None,
                "auth": cfg.api_key is not None, "multivector": service.late is not None,
                "batching": {"max_batch": cfg.max_batch, "max_wait_ms": cfg.max_wait_ms,
                             "requests": s.requests, "inputs": s.inputs, "batches": s.batches,
                             "largest_batch": s.max_batch_seen}}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": service.name, "object": "model",
                                            "created": service.created, "owned_by": "fam",
                                            "dimensions": service.dim}]}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        authorize(request)
        body = _json_object(await request.body())
        service.check_model_name(body)
        unknown = set(body) - {"model", "input", "messages", "encoding_format", "dimensions",
                               "user"}
        if unknown:
            raise RequestError(400, f"unknown field(s) {sorted(unknown)}", sorted(unknown)[0])
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise RequestError(400, f"encoding_format: expected 'float' or 'base64', got "
                                    f"{fmt!r}", "encoding_format")
        dims = body.get("dimensions")
        if dims is not None and dims != service.dim:
            raise RequestError(400, f"dimensions: this model gives {service.dim}-dimensional "
                                    f"embeddings; other sizes are not supported", "dimensions")
        if ("input" in body) == ("messages" in body):
            raise RequestError(400, "give exactly one of 'input' (text, or objects with "
                                    "'text'/'image') and 'messages' (chat-style)")
        inputs = (parse_input(body["input"], cfg, rules=service.rules) if "input" in body
                  else [parse_messages(body["messages"], cfg, service.rules)])
        emb = await service.embed(inputs)
        n_tok = service.count_tokens(inputs)
        return _json({"object": "list",
                      "data": [{"object": "embedding", "index": i,
                                "embedding": _encode_vector(v, fmt)} for i, v in enumerate(emb)],
                      "model": service.name,
                      "usage": {"prompt_tokens": n_tok, "total_tokens": n_tok}})

    @app.post("/v1/search")
    async def search(request: Request):
        authorize(request)
        index = need_index()
        body = _json_object(await request.body())
        service.check_model_name(body)
        unknown = set(body) - {"model", "query", "messages", "k", "maps"}
        if unknown:
            raise RequestError(400, f"unknown field(s) {sorted(unknown)}", sorted(unknown)[0])
        k = body.get("k", 10)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= cfg.max_k:
            raise RequestError(400, f"k: expected an integer in 1..{cfg.max_k}, got {k!r}", "k")
        maps = check_maps_flag(body, service.late)
        if ("query" in body) == ("messages" in body):
            raise RequestError(400, "give exactly one of 'query' (a string or an object with "
                                    "'text'/'image') and 'messages' (chat-style)")
        if "query" in body:
            if isinstance(body["query"], list):
                raise RequestError(400, "query: expected one query (a string or an object with "
                                        "'text'/'image'), got an array", "query")
            inp = parse_input(body["query"], cfg, "query", service.rules)[0]
        else:
            inp = parse_messages(body["messages"], cfg, service.rules)
        # The query's text as fam search makes it (query prompt; image-only: as the documents).
        inp.text = index.query_text(inp.text, bool(inp.images or inp.video))
        if service.late is not None:  # multi-vector index: MaxSim, maps on request
            return _json(await late_search(service, inp, k, maps))
        emb = await service.embed([inp])
        hits = index.search(emb, k)[0]
        data = []
        for h in hits:
            data.append(hit_json(index, h))
        return _json({"object": "list", "data": data, "model": service.name})

    @app.get("/v1/index/items/{i}/image")
    async def item_image(i: int, request: Request):
        authorize(request)
        index = need_index()
        path = index.image_file(i)
        if path is None or path.suffix.lower() not in _IMAGE_TYPES:
            raise RequestError(404, f"item {i} has no image in the index", type_="not_found")
        return FileResponse(path, media_type=_IMAGE_TYPES[path.suffix.lower()],
                            headers={"Cache-Control": "private, max-age=3600",
                                     "X-Content-Type-Options": "nosniff"})

    @app.get("/v1/index/items/{i}/{key}/{j}")
    async def item_visual(i: int, key: str, j: int, request: Request):
        """Image ``j`` of an indexed item's ``images`` or of its video's sampled frames
        (``video_frames``): only files the index lists."""
        authorize(request)
        index = need_index()
        path = index.image_file(i, key, j) if key in ("images", "video_frames") else None
        if path is None or path.suffix.lower() not in _IMAGE_TYPES:
            raise RequestError(404, f"item {i} has no {key} entry {j} in the index",
                               type_="not_found")
        return FileResponse(path, media_type=_IMAGE_TYPES[path.suffix.lower()],
                            headers={"Cache-Control": "private, max-age=3600",
                                     "X-Content-Type-Options": "nosniff"})

    page = resources.files("fam.serve").joinpath("static/index.html").read_text("utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def home():
        need_index()
        return HTMLResponse(page, headers={
            "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                                       "style-src 'self' 'unsafe-inline'; "
                                       "script-src 'self' 'unsafe-inline'",
            "X-Content-Type-Options": "nosniff"})

    return app

