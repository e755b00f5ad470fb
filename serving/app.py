"""The HTTP API (FastAPI): the cascade behind `POST /v1/moderate`, feedback, health, metrics.

Routes (the public contract):

    POST /v1/moderate    one post {"text", "image" (base64), "id"}, a batch {"posts": [...]},
                         or a multipart/form-data upload (fields text, id; file part image)
    POST /v1/feedback    {"request_id", "post_id"?, "label": 0|1, "moderator"?, "note"?}
    GET  /healthz        the process is up
    GET  /readyz         a model is loaded (503 until then); the last reload error, if any
    GET  /metrics        Prometheus text format
    POST /admin/reload   reload the bundle (token in `Authorization: Bearer ...`)

A request takes the current bundle once and is answered by it to the end (hot reload swaps
bundles between requests, never inside one). Posts the gate decides are answered on the event
loop in well under a millisecond each; the rest wait for the deep-model worker (micro-batched,
on its own thread). Every answered post is queued for the prediction store before the
response is sent, so the store holds a row for each one once the writer has flushed.

Bad input is answered with 4xx and a JSON error naming what was wrong (see serving.errors);
images are decoded only through `adfilter.imageio.read_image`, and a URL is never fetched.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import json
import logging
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from adfilter.config import Params
from adfilter.imageio import ImageError, ImageLimits, read_image
from serving.batcher import DeepResult, Job, MicroBatcher
from serving.bundle import Bundle
from serving.cascade import ALLOW, BLOCK, DEEP, STAGE_DEEP, STAGE_GATE, deep_decision, route
from serving.errors import ApiError, BodyTooLarge, NotReady, Overloaded
from serving.manager import ModelManager
from serving.metrics import ServingMetrics
from serving.schemas import (
    BatchIn,
    BatchResponse,
    FeedbackIn,
    FeedbackOut,
    ModerateResponse,
    MultipartPost,
    PostIn,
    ReloadIn,
    error_responses,
)
from serving.store import PredictionStore, new_id, utcnow

log = logging.getLogger(__name__)

ROUTES = ("/v1/moderate", "/v1/feedback", "/healthz", "/readyz", "/metrics", "/admin/reload",
          "/docs", "/openapi.json")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_DATA_URI = re.compile(r"^data:[^,]{0,100};base64,", re.IGNORECASE)
_GATE_INLINE_POSTS = 8  # larger batches run the gate in the thread pool, off the event loop
_RECENT_REQUESTS = 100_000  # request ids kept in memory so feedback can precede the store flush


@dataclass
class Post:
    id: str
    text: str
    image_bytes: bytes | None
    field: str                      # where in the request it came from, for error messages
    image: np.ndarray | None = None
    norm: str = ""


# --------------------------------------------------------------------------- state


class ServingState:
    """Everything the routes share: limits, the model manager, the deep worker, the store."""

    def __init__(
        self,
        params: Params,
        bundle: str | None = None,
        cascade: bool | None = None,
        store_url: str | None = None,
        poll_seconds: float | None = None,
        admin_token: str | None = None,
        tracking_uri: str | None = None,
    ) -> None:
        serve = params.serve
        self.params = params
        self.cascade = serve.cascade if cascade is None else cascade
        self.max_posts = serve.max_posts_per_request
        self.max_body_bytes = serve.max_body_bytes
        self.max_text_chars = params.validate.max_text_chars
        self.limits = ImageLimits(
            max_bytes=params.validate.max_image_bytes,
            max_pixels=params.validate.max_image_pixels,
            min_side=params.validate.min_image_side,
            formats=tuple(f.upper() for f in params.validate.allowed_image_formats),
        )
        self.gate_feature_fraction = serve.store.gate_feature_fraction
        self.admin_token = (admin_token if admin_token is not None
                            else os.environ.get(serve.reload.admin_token_env, ""))
        self.metrics = ServingMetrics(gpu=_cuda_available())
        self.store = PredictionStore(
            store_url or serve.store.url,
            queue_size=serve.store.queue_size,
            write_batch=serve.store.write_batch,
            flush_interval_s=serve.store.flush_interval_ms / 1000.0,
            include_image=serve.store.store_image_small,
        )
        self.store.on_write = self.metrics.on_store_write
        self.batcher = MicroBatcher(
            run_batch,
            max_size=serve.batch.max_size,
            max_wait_s=serve.batch.max_wait_ms / 1000.0,
            max_queue=serve.batch.max_queue,
            background_limit=max(serve.batch.max_size * 4, 64),
            on_batch=self.metrics.on_batch,
        )
        self.manager = ModelManager(
            bundle or serve.bundle,
            tracking_uri=tracking_uri or params.mlflow.tracking_uri,
            cache_dir=serve.cache_dir,
            device=serve.device,
            default_threshold=params.model.threshold,
            poll_seconds=serve.reload.poll_seconds if poll_seconds is None else poll_seconds,
            optimize=serve.torchscript_optimize,
            gate_thresholds=(serve.gate_low, serve.gate_high),
            warmup=self.warmup,
            on_swap=lambda b: self.metrics.set_model(b.version, b.source),
            on_result=lambda r: self.metrics.model_reloads.labels(r).inc(),
        )
        self.recent: collections.OrderedDict[str, list[str]] = collections.OrderedDict()
        self._recent_lock = threading.Lock()
        self._rng = random.Random(params.seed)
        self.torch_threads = serve.torch_threads

    def start(self) -> None:
        _setup_torch(self.torch_threads)
        self.store.start()
        self.batcher.start()
        self.manager.start()

    def stop(self) -> None:
        """In order: no more reloads, finish the deep worker's jobs, flush the store."""
        self.manager.stop()
        self.batcher.stop()
        self.store.close()
        log.info("store flushed: %d predictions, %d feedback rows written (%d lost)",
                 self.store.written["predictions"], self.store.written["feedback"],
                 self.store.failed)

    def warmup(self, bundle: Bundle) -> None:
        """A few posts of every kind through the deep worker: a bundle whose model or featurizer
        does not run fails here, before it is swapped in."""
        side = max(64, self.limits.min_side)
        rng = np.random.default_rng(0)
        image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        results = self.batcher.run_sync(
            bundle, ["warm-up: is this an ad? call 0800 123 4567", "", "see you tomorrow"],
            [None, image, image],
        )
        for r in results:
            values = [r.p_ad, r.sensitivity, r.score]
            if not all(v is not None and np.isfinite(v) for v in values):
                raise RuntimeError(f"model {bundle.version} gives non-finite outputs {values}")
        if bundle.model.optimize:
            # The profiling executor optimises per input shape on the first two calls: pay
            # that for every batch size now rather than in requests.
            arrays = results[1].features
            for size in range(1, self.batcher.max_size + 1):
                batch = {k: np.stack([v] * size) for k, v in arrays.items()}
                for _ in range(2):
                    bundle.model.predict(batch)
        bundle.gate.p_ad(["warm up"])

    def remember(self, request_id: str, post_ids: list[str]) -> None:
        with self._recent_lock:
            self.recent[request_id] = post_ids
            while len(self.recent) > _RECENT_REQUESTS:
                self.recent.popitem(last=False)

    def sample_for_drift(self) -> bool:
        return self.gate_feature_fraction > 0 and self._rng.random() < self.gate_feature_fraction


def run_batch(bundle: Bundle, jobs: Sequence[Job]) -> list[DeepResult]:
    """Featurize the posts with the bundle's FeaturePipeline and score the `predict` ones."""
    arrays = bundle.featurizer.featurize_posts([j.text for j in jobs], [j.image for j in jobs])
    idx = [i for i, j in enumerate(jobs) if j.predict]
    out: dict[str, np.ndarray] = {}
    if idx:
        subset = arrays if len(idx) == len(jobs) else {k: v[idx] for k, v in arrays.items()}
        out = bundle.model.predict(subset)
        for name, values in out.items():
            if not np.all(np.isfinite(values)):
                raise RuntimeError(f"model {bundle.version}: non-finite {name} {values.tolist()}")
    where = {i: k for k, i in enumerate(idx)}
    results = []
    for i, job in enumerate(jobs):
        row = {k: v[i] for k, v in arrays.items()}
        if job.predict:
            k = where[i]
            results.append(DeepResult(float(out["p_ad"][k]), float(out["sensitivity"][k]),
                                      float(out["score"][k]), row, 0.0, 0.0, 0))
        else:
            results.append(DeepResult(None, None, None, row, 0.0, 0.0, 0))
    return results


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def _setup_torch(threads: int) -> None:
    import torch

    # One core stays with the event loop, the gate and image decoding; the deep worker is the
    # only thread running torch, so intra-op threads are all it needs.
    n = threads if threads > 0 else max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only allowed before the first parallel op in the process
        pass
    log.info("torch threads: %d", torch.get_num_threads())


# --------------------------------------------------------------------------- middleware


class RequestContext:
    """Pure ASGI middleware: request id, the body-size limit, latency and status metrics."""

    def __init__(self, app: Callable[..., Awaitable[None]], state: ServingState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})
        scope["state"]["request_id"] = request_id
        scope["state"]["start"] = start
        path = scope.get("path", "")
        route_label = path if path in ROUTES else "other"
        status = {"code": 500}
        limit = self.state.max_body_bytes

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            declared = headers.get("content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > limit):
                err = (BodyTooLarge(limit, int(declared)) if declared.isdigit() else
                       ApiError(400, "invalid_content_length", "Content-Length is not a number"))
                self.state.metrics.errors.labels(err.code).inc()
                response = JSONResponse(err.body(request_id), status_code=err.status,
                                        headers={"connection": "close"})
                await response(scope, receive, send_wrapper)
                return
            received = 0

            async def receive_limited() -> dict:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise BodyTooLarge(limit)
                return message

            await self.app(scope, receive_limited, send_wrapper)
        finally:
            m = self.state.metrics
            m.http_latency.labels(route_label).observe(time.perf_counter() - start)
            m.http_requests.labels(route_label, str(status["code"])).inc()


# --------------------------------------------------------------------------- parsing


def _request_id(request: Request) -> str:
    return getattr(request.state, "request_id", None) or uuid.uuid4().hex


def _validation_error(exc: ValidationError | RequestValidationError, prefix: str = "") -> ApiError:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = _loc(prefix, first.get("loc", ()))
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return ApiError(422, "invalid_request",
                    f"{loc or 'the body'}: {first.get('msg', 'invalid')}{more}", field=loc or None)


def _loc(prefix: str, loc: Sequence[Any]) -> str:
    out = prefix
    for part in loc:
        if part == "body":
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


async def _json_body(request: Request) -> Any:
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().split(";")[0].strip() == "application/json":
        raise ApiError(415, "unsupported_media_type",
                       f"Content-Type '{ctype or '(none)'}' is not accepted here; send "
                       f"application/json")
    raw = await request.body()
    if not raw.strip():
        raise ApiError(400, "empty_body", "the request body is empty; send a JSON object")
    try:
        return json.loads(raw)
    except RecursionError as exc:
        raise ApiError(400, "invalid_json", "the JSON body is nested too deeply") from exc
    except UnicodeDecodeError as exc:
        raise ApiError(400, "invalid_json", f"the body is not UTF-8 text ({exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json",
                       f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column "
                       f"{exc.colno}") from exc


def _validate(model: type[BaseModel], data: Any, prefix: str = "") -> Any:
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as exc:
        raise _validation_error(exc, prefix) from exc
    except RecursionError as exc:
        raise ApiError(400, "invalid_json", "the JSON body is nested too deeply") from exc


def _image_bytes(value: str, field: str, limits: ImageLimits) -> bytes:
    value = value.strip()
    if _URL.match(value):
        raise ApiError(422, "image_url_not_allowed",
                       f"{field} is a URL; images are never fetched on a client's behalf: send "
                       f"the file's bytes base64-encoded, or upload it as multipart/form-data",
                       field=field)
    value = _DATA_URI.sub("", value, count=1)
    # base64 is 4 characters per 3 bytes: refuse an oversized image before decoding it.
    if len(value) * 3 // 4 > limits.max_bytes + 3:
        raise ApiError(422, "image_too_large",
                       f"{field} is about {len(value) * 3 // 4} bytes; the limit is "
                       f"{limits.max_bytes}", field=field)
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(422, "image_base64",
                       f"{field} is not valid base64 ({exc}); send the image file's bytes "
                       f"base64-encoded (standard alphabet, with padding)", field=field) from exc
    if not data:
        raise ApiError(422, "image_empty", f"{field} is empty; leave the field out for a post "
                       f"without an image", field=field)
    return data


def _check_text(value: str | None, field: str) -> None:
    """JSON may carry lone surrogates (\\ud800), which no UTF-8 consumer (fastText, the
    tokenizer, the database) accepts: refuse them here rather than fail further in."""
    if value:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ApiError(422, "invalid_text",
                           f"{field} holds an unpaired surrogate code point at position "
                           f"{exc.start}; send valid Unicode text", field=field) from exc


def _post_from(p: PostIn | MultipartPost, index: int, request_id: str, batch: bool,
               state: ServingState) -> Post:
    base = f"posts[{index}]" if batch else ""

    def field(name: str) -> str:
        return f"{base}.{name}" if base else name

    text = p.text or ""
    _check_text(text, field("text"))
    _check_text(p.id, field("id"))
    if len(text) > state.max_text_chars:
        raise ApiError(422, "text_too_long",
                       f"{field('text')} has {len(text)} characters; the limit is "
                       f"{state.max_text_chars} (validate.max_text_chars)", field=field("text"))
    image_bytes: bytes | None = None
    if isinstance(p, MultipartPost):
        image_bytes = p.image
    elif p.image is not None and p.image != "":
        image_bytes = _image_bytes(p.image, field("image"), state.limits)
    if not text.strip() and image_bytes is None:
        raise ApiError(422, "empty_post",
                       f"{base or 'the post'} has neither text nor an image; send at least one",
                       field=base or None)
    post_id = p.id if p.id else (f"{request_id}:{index}" if batch else request_id)
    return Post(post_id, text, image_bytes, base)


def _decode_images(posts: Sequence[Post], limits: ImageLimits) -> None:
    for post in posts:
        if post.image_bytes is None:
            continue
        where = f"{post.field}.image" if post.field else "image"
        try:
            post.image = read_image(post.image_bytes, limits)
        except ImageError as exc:
            raise ApiError(422, exc.reason, f"{where}: {exc.detail}", field=where) from exc
        post.image_bytes = None


async def _parse_moderate(request: Request, state: ServingState) -> tuple[list[Post], bool]:
    request_id = _request_id(request)
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith("multipart/form-data"):
        return [await _parse_multipart(request, state)], False
    data = await _json_body(request)
    if isinstance(data, dict) and "posts" in data:
        posts = data["posts"]
        if isinstance(posts, list) and len(posts) > state.max_posts:
            raise ApiError(413, "batch_too_large",
                           f"the batch has {len(posts)} posts; the limit is {state.max_posts} "
                           f"(serve.max_posts_per_request): split it", field="posts")
        batch = _validate(BatchIn, data)
        return [_post_from(p, i, request_id, True, state) for i, p in enumerate(batch.posts)], True
    post = _validate(PostIn, data)
    return [_post_from(post, 0, request_id, False, state)], False


async def _parse_multipart(request: Request, state: ServingState) -> Post:
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException

    part_limit = state.max_text_chars * 4 + 1024  # UTF-8 text of max_text_chars characters
    try:
        form = await request.form(max_files=1, max_fields=8, max_part_size=part_limit)
    except (MultiPartException, StarletteHTTPException) as exc:
        # Starlette reports multipart limits as a 400 HTTPException; they are ours to name.
        detail = str(getattr(exc, "detail", None) or getattr(exc, "message", None) or exc)
        if "maximum size" in detail:
            raise ApiError(413, "part_too_large",
                           f"a form field is over {part_limit} bytes ({detail}); send the image "
                           f"as a file part and text within the text limit") from exc
        if "Too many" in detail:
            raise ApiError(422, "invalid_request", f"the form has too many parts ({detail}); send "
                           f"the fields text, id and one image file part") from exc
        raise ApiError(400, "invalid_multipart", f"the multipart body cannot be read: {detail}") from exc
    try:
        unknown = sorted(set(form.keys()) - {"text", "id", "image"})
        if unknown:
            raise ApiError(422, "invalid_request",
                           f"unknown form field(s) {', '.join(unknown)}; send text, id and an "
                           f"image file part", field=unknown[0])
        values: dict[str, Any] = {}
        for name in ("text", "id"):
            items = form.getlist(name)
            if len(items) > 1:
                raise ApiError(422, "invalid_request", f"form field {name} is sent more than once",
                               field=name)
            if items:
                if not isinstance(items[0], str):
                    raise ApiError(422, "invalid_request", f"form field {name} must be text, not "
                                   f"a file", field=name)
                values[name] = items[0]
        image = form.get("image")
        if image is not None:
            if not isinstance(image, UploadFile):
                raise ApiError(422, "invalid_request",
                               "form field image must be a file part (Content-Disposition with "
                               "a filename), not text", field="image")
            if image.size is not None and image.size > state.limits.max_bytes:
                raise ApiError(422, "image_too_large",
                               f"image is {image.size} bytes; the limit is {state.limits.max_bytes}",
                               field="image")
            data = await image.read(state.limits.max_bytes + 1)
            if len(data) > state.limits.max_bytes:
                raise ApiError(422, "image_too_large",
                               f"image is over the limit of {state.limits.max_bytes} bytes",
                               field="image")
            values["image"] = data if data else None
            if not data:
                raise ApiError(422, "image_empty", "the image file part is empty", field="image")
        if "id" in values and len(values["id"]) > 200:
            raise ApiError(422, "invalid_request", "id: at most 200 characters", field="id")
        post = MultipartPost(**values)
        return _post_from(post, 0, _request_id(request), False, state)
    finally:
        await form.close()


# --------------------------------------------------------------------------- the cascade


async def _moderate(request: Request, state: ServingState) -> JSONResponse:
    start = request.state.start
    request_id = _request_id(request)
    bundle = state.manager.current
    if bundle is None:
        raise NotReady("loading" if state.manager.loading else
                       state.manager.last_error or "no bundle configured")
    posts, batch = await _parse_moderate(request, state)
    if not state.store.has_room(len(posts)):
        raise Overloaded(f"the prediction store's queue ({state.store.depth} rows)")
    if any(p.image_bytes is not None for p in posts):
        await anyio.to_thread.run_sync(_decode_images, posts, state.limits)

    n = len(posts)
    has_image = np.array([p.image is not None for p in posts], dtype=bool)
    p_gate = np.full(n, np.nan)
    if state.cascade:
        t0 = time.perf_counter()
        if n > _GATE_INLINE_POSTS:
            p_gate = await anyio.to_thread.run_sync(_gate, bundle, posts)
        else:
            p_gate = _gate(bundle, posts)
        gate_s = (time.perf_counter() - t0) / n
        has_text = np.array([bool(p.norm) for p in posts], dtype=bool)
        routes = route(np.nan_to_num(p_gate, nan=0.5), has_text, has_image, bundle.gate.low,
                       bundle.gate.high)
        for _ in range(n):
            state.metrics.stage_latency.labels(STAGE_GATE).observe(gate_s)
    else:
        routes = [DEEP] * n

    deep_idx = [i for i, r in enumerate(routes) if r == DEEP]
    deep: dict[int, DeepResult] = {}
    if deep_idx:
        calls = [state.batcher.predict(bundle, posts[i].text, posts[i].image) for i in deep_idx]
        try:
            outs = await asyncio.gather(*calls)
        except ApiError:
            raise
        except Exception as exc:
            raise ApiError(500, "inference_failed",
                           f"the deep model failed on this request ({type(exc).__name__}); it "
                           f"is logged with the request id") from exc
        for i, r in zip(deep_idx, outs, strict=True):
            deep[i] = r
            state.metrics.stage_latency.labels(STAGE_DEEP).observe(r.queued_s + r.batch_s)

    latency_ms = (time.perf_counter() - start) * 1000.0
    now = utcnow()
    results = []
    for i, post in enumerate(posts):
        gp = None if np.isnan(p_gate[i]) else float(p_gate[i])
        row = {
            "id": new_id(), "request_id": request_id, "post_id": post.id, "created_at": now,
            "model_version": bundle.version, "has_text": bool(post.text.strip()),
            "has_image": bool(has_image[i]), "text_chars": len(post.text),
            "latency_ms": latency_ms, "p_gate": gp,
        }
        if routes[i] == DEEP:
            r = deep[i]
            decision = deep_decision(r.score, bundle.threshold)
            result = {"id": post.id, "decision": decision, "score": r.score, "p_ad": r.p_ad,
                      "sensitivity": r.sensitivity, "stage": STAGE_DEEP}
            row.update(stage=STAGE_DEEP, decision=decision, score=r.score, p_ad=r.p_ad,
                       sensitivity=r.sensitivity, features_kind="model", features=r.features)
            state.store.put_prediction(row)
        else:
            decision = BLOCK if routes[i] == BLOCK else ALLOW
            result = {"id": post.id, "decision": decision, "score": gp, "p_ad": gp,
                      "sensitivity": None, "stage": STAGE_GATE}
            row.update(stage=STAGE_GATE, decision=decision, score=gp, p_ad=gp, sensitivity=None)
            _store_gate_row(state, bundle, post, row)
        state.metrics.posts.labels(result["stage"], decision).inc()
        result["model_version"] = bundle.version
        result["latency_ms"] = latency_ms
        results.append(result)
    state.remember(request_id, [p.id for p in posts])
    state.metrics.stage_latency.labels("end_to_end").observe(latency_ms / 1000.0)
    if batch:
        body: dict[str, Any] = {"request_id": request_id, "model_version": bundle.version,
                                "latency_ms": latency_ms, "results": results}
    else:
        body = {**results[0], "request_id": request_id}
    return JSONResponse(body)


def _gate(bundle: Bundle, posts: Sequence[Post]) -> np.ndarray:
    from adfilter.features import normalize_text

    for post in posts:
        post.norm = normalize_text(post.text) if post.text else ""
    p = np.full(len(posts), np.nan)
    idx = [i for i, post in enumerate(posts) if post.norm]
    if idx:
        p[idx] = bundle.gate.p_ad([posts[i].norm for i in idx])
    return p


def _store_gate_row(state: ServingState, bundle: Bundle, post: Post, row: dict[str, Any]) -> None:
    """A gate-decided post's row: with features when it is picked for the drift sample."""
    if not state.sample_for_drift():
        state.store.put_prediction({**row, "features_kind": "none", "features": None})
        return

    def done(result: Any) -> None:
        if isinstance(result, DeepResult):
            state.store.put_prediction({**row, "features_kind": "sampled", "features": result.features})
        else:
            state.store.put_prediction({**row, "features_kind": "none", "features": None})

    if not state.batcher.submit_background(Job(bundle, post.text, post.image, False, done)):
        state.metrics.drift_samples_dropped.inc()
        state.store.put_prediction({**row, "features_kind": "none", "features": None})


# --------------------------------------------------------------------------- the app


def create_app(
    params: Params,
    bundle: str | None = None,
    *,
    cascade: bool | None = None,
    store_url: str | None = None,
    poll_seconds: float | None = None,
    admin_token: str | None = None,
    tracking_uri: str | None = None,
) -> FastAPI:
    """The API for `params` (`bundle`, `cascade`, `store_url`, `poll_seconds` and `admin_token`
    override `params.serve`, `tracking_uri` overrides `params.mlflow.tracking_uri`). Nothing
    starts until the app's lifespan starts (uvicorn)."""
    state = ServingState(params, bundle, cascade, store_url, poll_seconds, admin_token,
                         tracking_uri)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        await anyio.to_thread.run_sync(state.start)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(state.stop)

    app = FastAPI(
        title="adfilter",
        version="1",
        description="Finds advertising and spam in user posts: a fastText gate in front of a "
        "multimodal TorchScript model.",
        lifespan=lifespan,
    )
    app.state.serving = state
    app.add_middleware(RequestContext, state=state)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        state.metrics.errors.labels(exc.code).inc()
        return JSONResponse(exc.body(_request_id(request)), status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await _api_error(request, _validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = (f"no route {request.method} {request.url.path}; see /docs"
                   if exc.status_code in (404, 405) else str(exc.detail))
        return await _api_error(request, ApiError(exc.status_code, code, message))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request %s failed", _request_id(request))
        state.metrics.errors.labels("internal_error").inc()
        err = ApiError(500, "internal_error", "the server failed on this request; it is logged "
                       "with the request id")
        return JSONResponse(err.body(_request_id(request)), status_code=500)

    moderate_body = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"anyOf": [
                    {"$ref": "#/components/schemas/PostIn"},
                    {"$ref": "#/components/schemas/BatchIn"},
                ]}},
                "multipart/form-data": {"schema": {"$ref": "#/components/schemas/MultipartPost"}},
            },
        },
        "responses": {"200": {"content": {"application/json": {"schema": {"anyOf": [
            {"$ref": "#/components/schemas/ModerateResponse"},
            {"$ref": "#/components/schemas/BatchResponse"},
        ]}}}}},
    }

    @app.post(
        "/v1/moderate",
        response_model=ModerateResponse | BatchResponse,
        responses=error_responses(400, 413, 415, 422, 500, 503),
        openapi_extra=moderate_body,
        summary="Decide one post or a batch: allow or block",
    )
    async def moderate(request: Request) -> JSONResponse:
        return await _moderate(request, state)

    @app.post("/v1/feedback", response_model=FeedbackOut,
              responses=error_responses(400, 404, 415, 422, 503),
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": {"$ref": "#/components/schemas/FeedbackIn"}}}}},
              summary="Record a moderator's label for a decided post")
    async def feedback(request: Request) -> JSONResponse:
        data = _validate(FeedbackIn, await _json_body(request))
        for name in ("request_id", "post_id", "moderator", "note"):
            _check_text(getattr(data, name), name)
        with state._recent_lock:
            post_ids = state.recent.get(data.request_id)
        if post_ids is None:
            post_ids = await anyio.to_thread.run_sync(state.store.find_request, data.request_id)
        if not post_ids:
            raise ApiError(404, "unknown_request",
                           f"no prediction has request id '{data.request_id}'; use the "
                           f"request_id a /v1/moderate answer gave", field="request_id")
        if data.post_id is None:
            if len(post_ids) > 1:
                raise ApiError(422, "post_id_required",
                               f"request '{data.request_id}' held {len(post_ids)} posts; say "
                               f"which with post_id", field="post_id")
            post_id = post_ids[0]
        elif data.post_id not in post_ids:
            raise ApiError(404, "unknown_post",
                           f"request '{data.request_id}' has no post '{data.post_id}'",
                           field="post_id")
        else:
            post_id = data.post_id
        if not state.store.has_room(1):
            raise Overloaded("the prediction store's queue")
        state.store.put_feedback({
            "request_id": data.request_id, "post_id": post_id, "created_at": utcnow(),
            "label": int(data.label), "moderator": data.moderator, "note": data.note,
        })
        return JSONResponse({"status": "recorded", "request_id": data.request_id,
                             "post_id": post_id})

    @app.get("/healthz", summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="A model is loaded", responses={503: {}})
    async def readyz() -> JSONResponse:
        status = state.manager.status()
        status["cascade"] = state.cascade
        status["deep_queue"] = state.batcher.pending
        status["store_queue"] = state.store.depth
        return JSONResponse(status, status_code=200 if status["ready"] else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        m = state.metrics
        m.deep_queue.set(state.batcher.pending)
        m.store_queue.set(state.store.depth)
        m.model_ready.set(1 if state.manager.current is not None else 0)
        return Response(m.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reload", status_code=202, responses=error_responses(401, 403, 409, 500),
              openapi_extra={"requestBody": {"required": False, "content": {"application/json": {
                  "schema": {"$ref": "#/components/schemas/ReloadIn"}}}}},
              summary="Reload the model bundle in the background (token protected)")
    async def admin_reload(request: Request) -> JSONResponse:
        _check_token(request, state)
        raw = await request.body()
        body = ReloadIn()
        if raw.strip():
            body = _validate(ReloadIn, await _json_body(request))
        if body.wait:
            try:
                bundle = await anyio.to_thread.run_sync(state.manager.load_now, body.source)
            except Exception as exc:
                raise ApiError(500, "reload_failed", f"the new model did not load, the old one "
                               f"keeps serving: {exc}") from exc
            return JSONResponse({"status": "loaded", "model_version": bundle.version if bundle
                                 else None}, status_code=200)
        if not state.manager.reload(body.source):
            raise ApiError(409, "reload_in_progress", "a model load is already running; see "
                           "GET /readyz")
        return JSONResponse({"status": "loading", "source": body.source or state.manager.source.spec},
                            status_code=202)

    def openapi() -> dict[str, Any]:
        # The bodies are parsed by hand (JSON or multipart on one route, errors in our format),
        # so FastAPI does not see their models; they are added to the schema here.
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (PostIn, BatchIn, MultipartPost, FeedbackIn, ReloadIn):
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for name, sub in js.pop("$defs", {}).items():
                    components.setdefault(name, sub)
                components[model.__name__] = js
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _check_token(request: Request, state: ServingState) -> None:
    import hmac

    expected = state.admin_token
    if not expected:
        raise ApiError(403, "admin_disabled",
                       f"admin routes are disabled: set the token in the environment variable "
                       f"{state.params.serve.reload.admin_token_env}")
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    if not given:
        raise ApiError(401, "unauthorized", "send the admin token as 'Authorization: Bearer "
                       "<token>'", headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(403, "forbidden", "the admin token is wrong")
