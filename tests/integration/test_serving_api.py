"""The HTTP API against a live uvicorn server on 127.0.0.1, with a real (small) bundle: the
contract, every kind of bad input, a fuzz of the body, and concurrent load."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from serving.schemas import BatchResponse, ErrorBody, ModerateResponse
from tests.serving_fixtures import (
    LiveServer,
    b64,
    ci_params,
    free_port,
    png_bytes,
    sample_posts,
    shared_bundle,
)

pytestmark = pytest.mark.integration

MAX_IMAGE_BYTES = 300_000
MAX_BODY = 2_000_000
MAX_POSTS = 8
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def server(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    db = tmp_path_factory.mktemp("api-store") / "predictions.db"
    params = ci_params(
        validate={"max_image_bytes": MAX_IMAGE_BYTES},
        max_body_bytes=MAX_BODY,
        max_posts_per_request=MAX_POSTS,
        store={"url": f"sqlite:///{db}"},
    )
    with LiveServer(params, str(bundle_dir), poll_seconds=0, admin_token=TOKEN) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServer) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def posts() -> tuple[Any, dict[str, np.ndarray]]:
    return sample_posts(n_text=60, n_image=8, seed=3)


def _image(seed: int = 0, side: int = 80) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def _alive(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.post("/v1/moderate", json={"text": "still there?"})
    assert r.status_code == 200, r.text


def _error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = ErrorBody.model_validate(r.json()).model_dump()
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    assert body["request_id"] == r.headers["x-request-id"]
    return body


# --------------------------------------------------------------------------- contract


def test_openapi_schema_lists_the_contract(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    for path, method in [("/v1/moderate", "post"), ("/v1/feedback", "post"), ("/healthz", "get"),
                         ("/readyz", "get"), ("/metrics", "get"), ("/admin/reload", "post")]:
        assert method in spec["paths"][path], path
    body = spec["paths"]["/v1/moderate"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    schemas = spec["components"]["schemas"]
    for name in ("PostIn", "BatchIn", "MultipartPost", "ModerateResponse", "BatchResponse",
                 "FeedbackIn", "ErrorBody"):
        assert name in schemas, name
    assert set(schemas["PostIn"]["properties"]) == {"id", "text", "image"}
    assert set(schemas["ModerateResponse"]["required"]) >= {
        "request_id", "id", "decision", "score", "p_ad", "sensitivity", "stage",
        "model_version", "latency_ms"}


def test_answers_match_the_published_schema(client: httpx.Client) -> None:
    import jsonschema

    spec = client.get("/openapi.json").json()

    def check(instance: Any, name: str) -> None:
        schema = {"$ref": f"#/components/schemas/{name}", "components": spec["components"]}
        jsonschema.validate(instance, schema, cls=jsonschema.Draft202012Validator)

    single = client.post("/v1/moderate", json={"text": "hello there"})
    check(single.json(), "ModerateResponse")
    batch = client.post("/v1/moderate", json={"posts": [{"text": "a"}, {"text": "b"}]})
    check(batch.json(), "BatchResponse")
    bad = client.post("/v1/moderate", json={"text": 3})
    check(bad.json(), "ErrorBody")
    check({"text": "x", "id": "1"}, "PostIn")
    with pytest.raises(jsonschema.ValidationError):
        check({"text": "x", "colour": "red"}, "PostIn")  # the server answers 422 to it too


def test_single_post_answer_has_every_field(client: httpx.Client, server: LiveServer) -> None:
    r = client.post("/v1/moderate", json={"text": "are we still on for lunch?", "id": "post-1"},
                    headers={"x-request-id": "req-abc"})
    assert r.status_code == 200, r.text
    body = ModerateResponse.model_validate(r.json())
    assert body.id == "post-1" and body.request_id == "req-abc" == r.headers["x-request-id"]
    assert body.model_version == server.state.manager.current.version
    assert 0.0 <= body.score <= 1.0 and 0.0 <= body.p_ad <= 1.0 and body.latency_ms > 0
    assert body.decision == ("block" if body.stage == "deep" and body.score > 0.85 else body.decision)


def test_the_cascade_routes_as_documented(client: httpx.Client, server: LiveServer,
                                          posts: tuple) -> None:
    from adfilter.features import normalize_text

    bundle = server.state.manager.current
    df, _ = posts
    texts = [t for t in df["text"] if t]
    p = bundle.gate.p_ad([normalize_text(t) for t in texts])
    sure_clean = texts[int(np.argmin(p))]
    sure_ad = texts[int(np.argmax(p))]
    assert p.min() <= bundle.gate.low and p.max() >= bundle.gate.high, "fixture gate too unsure"

    r = client.post("/v1/moderate", json={"posts": [
        {"text": sure_clean}, {"text": sure_ad}, {"text": sure_ad, "image": b64(png_bytes(_image()))},
        {"image": b64(png_bytes(_image(1)))},
    ]})
    assert r.status_code == 200, r.text
    res = BatchResponse.model_validate(r.json()).results
    assert [(x.stage, x.decision) for x in res[:2]] == [("gate", "allow"), ("gate", "block")]
    assert res[0].sensitivity is None and res[0].p_ad == pytest.approx(float(p.min()), abs=1e-6)
    # Posts with an image always reach the deep model, however sure the gate is of the text.
    assert res[2].stage == "deep" and res[3].stage == "deep"
    assert all(x.sensitivity is not None for x in res[2:])
    for x in res[2:]:
        assert x.decision == ("block" if x.score > bundle.threshold else "allow")


def test_deep_only_mode_sends_everything_to_the_model(bundle_dir: Path,
                                                      tmp_path: Path, posts: tuple) -> None:
    df, _ = posts
    params = ci_params(store={"url": f"sqlite:///{tmp_path / 'p.db'}"})
    with LiveServer(params, str(bundle_dir), cascade=False, poll_seconds=0) as live:
        r = httpx.post(f"{live.url}/v1/moderate",
                       json={"posts": [{"text": t} for t in df["text"][:6] if t]}, timeout=60)
        ready = httpx.get(f"{live.url}/readyz").json()
    assert r.status_code == 200
    assert {x["stage"] for x in r.json()["results"]} == {"deep"}
    assert ready["cascade"] is False


def test_gate_thresholds_from_params_override_the_bundle(bundle_dir: Path, tmp_path: Path,
                                                         posts: tuple) -> None:
    df, _ = posts
    params = ci_params(gate_low=-1.0, gate_high=2.0, store={"url": f"sqlite:///{tmp_path / 'p.db'}"})
    with LiveServer(params, str(bundle_dir), poll_seconds=0) as live:
        r = httpx.post(f"{live.url}/v1/moderate",
                       json={"posts": [{"text": t} for t in df["text"][:8] if t]}, timeout=60)
        gate = httpx.get(f"{live.url}/readyz").json()["model"]["gate"]
    assert gate == {"low": -1.0, "high": 2.0}
    assert {x["stage"] for x in r.json()["results"]} == {"deep"}


def test_profiling_executor_mode(bundle_dir: Path, tmp_path: Path) -> None:
    params = ci_params(torchscript_optimize=True, batch={"max_size": 3},
                       store={"url": f"sqlite:///{tmp_path / 'p.db'}"})
    with LiveServer(params, str(bundle_dir), poll_seconds=0) as live:
        assert live.state.manager.current.model.optimize is True
        r = httpx.post(f"{live.url}/v1/moderate", json={"posts": [
            {"image": b64(png_bytes(_image(i)))} for i in range(5)]}, timeout=60)
    assert r.status_code == 200 and [x["stage"] for x in r.json()["results"]] == ["deep"] * 5


def test_image_upload_forms(client: httpx.Client) -> None:
    data = png_bytes(_image(2))
    r = client.post("/v1/moderate", files={"image": ("x.png", data, "image/png")},
                    data={"text": "look", "id": "up-1"})
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "up-1" and r.json()["stage"] == "deep"
    r = client.post("/v1/moderate", json={"image": "data:image/png;base64," + b64(data)})
    assert r.status_code == 200, r.text
    jpeg = png_bytes(_image(3), "JPEG")
    r = client.post("/v1/moderate", files={"image": ("x.jpg", jpeg, "image/jpeg")})
    assert r.status_code == 200, r.text


def test_health_ready_and_metrics(client: httpx.Client, server: LiveServer) -> None:
    ready = client.get("/readyz").json()
    assert ready["ready"] is True and ready["model"]["model_version"] == server.state.manager.current.version
    assert ready["model"]["gate"] == {"low": 0.2, "high": 0.8}
    r = client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(r.text)}
    for name in ("adfilter_posts", "adfilter_stage_latency_seconds", "adfilter_deep_batch_size",
                 "adfilter_errors", "adfilter_model_info", "adfilter_http_requests",
                 "adfilter_model_reloads"):
        assert name in names, name


# --------------------------------------------------------------------------- bad input


def _png_declaring(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def _tiff() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_image(4)).save(buf, "TIFF")
    return buf.getvalue()


JSON = {"content-type": "application/json"}
BAD_JSON_BODIES = [
    ("invalid_json", b'{"text": "unterminated', 400, "invalid_json"),
    ("not_utf8", b'{"text": "\xff\xfe"}', 400, "invalid_json"),
    ("too_deep", b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json"),
    ("empty_body", b"", 400, "empty_body"),
    ("text_not_string", b'{"text": 5}', 422, "invalid_request"),
    ("id_not_string", b'{"text": "hi", "id": 17}', 422, "invalid_request"),
    ("image_not_string", b'{"image": ["a"]}', 422, "invalid_request"),
    ("posts_not_list", b'{"posts": "abc"}', 422, "invalid_request"),
    ("post_not_object", b'{"posts": [1]}', 422, "invalid_request"),
    ("unknown_field", b'{"text": "hi", "url": "x"}', 422, "invalid_request"),
    ("top_level_list", b'[{"text": "hi"}]', 422, "invalid_request"),
    ("top_level_string", b'"hello"', 422, "invalid_request"),
    ("empty_post", b"{}", 422, "empty_post"),
    ("blank_text", b'{"text": "   \\n\\t "}', 422, "empty_post"),
    ("null_text", b'{"text": null, "image": null}', 422, "empty_post"),
    ("empty_batch", b'{"posts": []}', 422, "invalid_request"),
    ("empty_post_in_batch", b'{"posts": [{"text": "ok"}, {}]}', 422, "empty_post"),
    ("lone_surrogate_text", b'{"text": "hi \\ud800 there"}', 422, "invalid_text"),
    ("lone_surrogate_id", b'{"text": "hi", "id": "\\udfff"}', 422, "invalid_request"),
]


@pytest.mark.parametrize("name,body,status,code", BAD_JSON_BODIES, ids=[c[0] for c in BAD_JSON_BODIES])
def test_bad_json_bodies(client: httpx.Client, name: str, body: bytes, status: int, code: str) -> None:
    _error(client.post("/v1/moderate", content=body, headers=JSON), status, code)


def test_bad_field_is_named(client: httpx.Client) -> None:
    body = _error(client.post("/v1/moderate", json={"posts": [{"text": "a"}, {"text": 3}]}),
                  422, "invalid_request")
    assert body["error"]["field"] == "posts[1].text"
    body = _error(client.post("/v1/moderate", json={"posts": [{"text": "a"}, {}]}), 422, "empty_post")
    assert body["error"]["field"] == "posts[1]"


BAD_IMAGES = [
    ("random_bytes", lambda: b64(bytes(range(256)) * 4), "image_corrupt"),
    ("truncated_png", lambda: b64(png_bytes(_image(5, 200))[:3000]), "image_corrupt"),
    ("decompression_bomb", lambda: b64(_png_declaring(10_000, 10_000)), "image_bomb"),
    ("unsupported_format", lambda: b64(_tiff()), "image_format"),
    ("too_small", lambda: b64(png_bytes(_image(6, 8))), "image_too_small"),
    ("not_base64", lambda: "this is *not* base64!", "image_base64"),
    ("too_large", lambda: b64(b"\0" * (MAX_IMAGE_BYTES + 10)), "image_too_large"),
    ("url", lambda: "https://example.com/cat.png", "image_url_not_allowed"),
    ("file_url", lambda: "file:///etc/passwd", "image_url_not_allowed"),
]


@pytest.mark.parametrize("name,make,code", BAD_IMAGES, ids=[c[0] for c in BAD_IMAGES])
def test_bad_images(client: httpx.Client, name: str, make: Any, code: str) -> None:
    body = _error(client.post("/v1/moderate", json={"text": "hi", "image": make()}), 422, code)
    assert body["error"]["field"] == "image"
    # Also inside a batch, the post is named.
    body = _error(client.post("/v1/moderate", json={"posts": [{"text": "x"}, {"image": make()}]}),
                  422, code)
    assert body["error"]["field"] == "posts[1].image"


def test_text_over_the_limit(client: httpx.Client, server: LiveServer) -> None:
    limit = server.state.max_text_chars
    client.post("/v1/moderate", json={"text": "a" * limit}).raise_for_status()
    body = _error(client.post("/v1/moderate", json={"text": "a" * (limit + 1)}), 422, "text_too_long")
    assert str(limit) in body["error"]["message"]


def test_oversized_batch_and_bodies(client: httpx.Client) -> None:
    posts = [{"text": f"post {i}"} for i in range(MAX_POSTS + 1)]
    _error(client.post("/v1/moderate", json={"posts": posts}), 413, "batch_too_large")
    client.post("/v1/moderate", json={"posts": posts[:MAX_POSTS]}).raise_for_status()
    big = json.dumps({"text": "x" * (MAX_BODY + 10)}).encode()
    _error(client.post("/v1/moderate", content=big, headers=JSON), 413, "body_too_large")

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(MAX_BODY // 65536 + 2):
            yield b" " * 65536

    _error(client.post("/v1/moderate", content=chunks(), headers=JSON), 413, "body_too_large")


def test_media_types_and_methods(client: httpx.Client) -> None:
    _error(client.post("/v1/moderate", content=b"text=hi", headers={"content-type": "text/plain"}),
           415, "unsupported_media_type")
    _error(client.post("/v1/moderate", content=b'{"text": "hi"}', headers={"content-type": ""}),
           415, "unsupported_media_type")
    _error(client.get("/v1/moderate"), 405, "method_not_allowed")
    _error(client.get("/v2/nothing"), 404, "not_found")


def test_bad_multipart(client: httpx.Client) -> None:
    _error(client.post("/v1/moderate", files={"image": ("x.bin", b"garbage", "image/png")}),
           422, "image_corrupt")
    _error(client.post("/v1/moderate", data={"text": "hi", "extra": "1"}, files={"f": ("a", b"b")}),
           422, "invalid_request")
    _error(client.post("/v1/moderate", files={"image": (None, b64(png_bytes(_image(side=16))))}),
           422, "invalid_request")
    _error(client.post("/v1/moderate", files={"image": (None, b64(png_bytes(_image())))}),
           413, "part_too_large")
    two = [("image", ("a.png", png_bytes(_image()), "image/png"))] * 2
    _error(client.post("/v1/moderate", files=two), 422, "invalid_request")
    _error(client.post("/v1/moderate", files={"image": ("x.png", b"", "image/png")},
                       data={"text": "hi"}), 422, "image_empty")
    _error(client.post("/v1/moderate", content=b"--xyz\r\nnot a part",
                       headers={"content-type": "multipart/form-data; boundary=xyz"}),
           400, "invalid_multipart")
    big = b"\0" * (MAX_IMAGE_BYTES + 1)
    _error(client.post("/v1/moderate", files={"image": ("x.png", big, "image/png")}),
           422, "image_too_large")


def test_a_url_is_never_fetched(client: httpx.Client) -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen(4)
        listener.settimeout(0.5)
        url = f"http://127.0.0.1:{port}/ad.png"
        _error(client.post("/v1/moderate", json={"text": "see", "image": url}), 422,
               "image_url_not_allowed")
        _error(client.post("/v1/moderate", json={"posts": [{"image": url}]}), 422,
               "image_url_not_allowed")
        # A URL in the text is text: scored, never followed.
        assert client.post("/v1/moderate", json={"text": f"look {url}"}).status_code == 200
        with pytest.raises(TimeoutError):
            listener.accept()


def test_feedback(client: httpx.Client, server: LiveServer) -> None:
    r = client.post("/v1/moderate", json={"posts": [{"text": "a", "id": "p-a"},
                                                    {"text": "b", "id": "p-b"}]})
    rid = r.json()["request_id"]
    ok = client.post("/v1/feedback", json={"request_id": rid, "post_id": "p-b", "label": 1,
                                           "moderator": "mod-7"})
    assert ok.status_code == 200 and ok.json() == {"status": "recorded", "request_id": rid,
                                                   "post_id": "p-b"}
    _error(client.post("/v1/feedback", json={"request_id": rid, "label": 0}), 422, "post_id_required")
    _error(client.post("/v1/feedback", json={"request_id": rid, "post_id": "p-z", "label": 0}),
           404, "unknown_post")
    _error(client.post("/v1/feedback", json={"request_id": "nope", "label": 0}), 404, "unknown_request")
    _error(client.post("/v1/feedback", json={"request_id": rid, "post_id": "p-a", "label": 2}),
           422, "invalid_request")
    _error(client.post("/v1/feedback", json={"request_id": rid, "post_id": "p-a", "label": "1"}),
           422, "invalid_request")
    _error(client.post("/v1/feedback", content=b"{", headers=JSON), 400, "invalid_json")
    single = client.post("/v1/moderate", json={"text": "single"}).json()["request_id"]
    assert client.post("/v1/feedback", json={"request_id": single, "label": 0}).status_code == 200
    # Past the in-memory window, the request is found in the store.
    store = server.state.store
    deadline = time.monotonic() + 30
    while store.depth and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the writer's last batch
    with server.state._recent_lock:
        server.state.recent.clear()
    ok = client.post("/v1/feedback", json={"request_id": rid, "post_id": "p-a", "label": 0})
    assert ok.status_code == 200, ok.text


def test_admin_reload_needs_the_token(client: httpx.Client) -> None:
    _error(client.post("/admin/reload"), 401, "unauthorized")
    _error(client.post("/admin/reload", headers={"authorization": "Bearer wrong"}), 403, "forbidden")
    r = client.post("/admin/reload", json={"wait": True}, headers={"authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json()["status"] == "loaded"


def test_errors_are_counted_by_kind(client: httpx.Client) -> None:
    def count() -> float:
        text = client.get("/metrics").text
        for family in text_string_to_metric_families(text):
            if family.name == "adfilter_errors":
                return sum(s.value for s in family.samples
                           if s.name == "adfilter_errors_total" and s.labels["kind"] == "image_base64")
        return 0.0

    before = count()
    for _ in range(3):
        client.post("/v1/moderate", json={"image": "%%%"})
    assert count() == before + 3


# --------------------------------------------------------------------------- fuzz


# Any code point, lone surrogates included (valid in a JSON string, not in UTF-8).
_chars = st.characters() | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF,
                                         categories=["Cs"])
_leaf = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
         | st.text(max_size=30) | st.text(_chars, max_size=10))
_json = st.recursive(_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                     max_leaves=12)
_b64ish = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=", max_size=80)
_post = st.fixed_dictionaries({}, optional={"text": _json | st.text(max_size=120) | st.text(_chars, max_size=40),
                                            "image": _json | _b64ish, "id": _json | st.text(_chars, max_size=20)})
_body = st.one_of(
    _json.map(lambda v: json.dumps(v).encode()),
    _post.map(lambda v: json.dumps(v).encode()),
    st.lists(_post | _json, max_size=MAX_POSTS + 3).map(lambda v: json.dumps({"posts": v}).encode()),
    st.binary(max_size=200),
)


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=_body)
def test_fuzzed_bodies_never_break_the_server(client: httpx.Client, body: bytes) -> None:
    r = client.post("/v1/moderate", content=body, headers=JSON)
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert ErrorBody.model_validate(r.json()).error.code
    else:
        data = r.json()
        assert "results" in data or data["decision"] in ("allow", "block")


def test_alive_after_the_bad_input(client: httpx.Client) -> None:
    _alive(client)


# --------------------------------------------------------------------------- load


def test_200_concurrent_requests_8_at_a_time(server: LiveServer, posts: tuple) -> None:
    df, images = posts
    texts = [t for t in df["text"] if t]
    encoded = [b64(png_bytes(img)) for img in images.values()]
    bodies: list[dict] = []
    for i in range(200):
        kind = i % 10
        if kind < 7:
            bodies.append({"text": texts[i % len(texts)]})
        elif kind < 9:
            bodies.append({"text": texts[(i * 7) % len(texts)], "image": encoded[i % len(encoded)]})
        else:
            bodies.append({"posts": [{"text": texts[(i + j) % len(texts)]} for j in range(3)]})

    def posts_by_stage() -> dict[str, float]:
        text = httpx.get(f"{server.url}/metrics").text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            if family.name == "adfilter_posts":
                for s in family.samples:
                    if s.name == "adfilter_posts_total":
                        out[s.labels["stage"]] = out.get(s.labels["stage"], 0) + s.value
        return out

    before = posts_by_stage()

    async def run() -> list[httpx.Response]:
        sem = asyncio.Semaphore(8)
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            async def one(body: dict) -> httpx.Response:
                async with sem:
                    return await c.post("/v1/moderate", json=body)

            return await asyncio.gather(*(one(b) for b in bodies))

    responses = asyncio.run(run())
    statuses = [r.status_code for r in responses]
    assert not [s for s in statuses if s >= 500]
    assert statuses == [200] * 200
    n_posts = sum(len(b.get("posts", [b])) for b in bodies)
    after = posts_by_stage()
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert sum(delta.values()) == n_posts
    assert delta.get("gate", 0) > 0 and delta.get("deep", 0) >= 40  # every image post is deep
    ids = {r.json()["request_id"] for r in responses}
    assert len(ids) == 200
