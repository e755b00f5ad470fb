"""`adfilter simulate`: scenario traffic through the real serving cascade into a prediction store.

The posts come from `adfilter.simulate.generate_posts`. They are sent as `POST /v1/moderate`
batches, either to a running server (`url`), or in-process to the same FastAPI app the server
runs (`create_app` under Starlette's TestClient, lifespan included): the gate, the deep-model
worker and the store writer are the production ones, so the store ends up with exactly the rows
and feature blobs live traffic would leave. A share of the posts (`feedback_share`) is labelled
through `POST /v1/feedback`, as a moderator would.

In-process, the app stores `image_small` in the blobs when `drift.simulate.store_image_small` is
on (the image branch's SHAP values need the CNN input), whatever `serve.store.store_image_small`
says; a running server keeps its own setting.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import logging
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from adfilter.config import Params
from adfilter.simulate import SimPost, check_scenario, generate_posts

log = logging.getLogger(__name__)

_PNG_SHARE = 0.2  # as in the embedded sample; the rest is JPEG
_RETRIES = 8


class SimulationError(RuntimeError):
    """The cascade refused the traffic (not ready, errors other than back-pressure)."""


def _encode(image: np.ndarray, rng: random.Random) -> str:
    from PIL import Image

    buf = io.BytesIO()
    if rng.random() < _PNG_SHARE:
        Image.fromarray(image).save(buf, "PNG")
    else:
        Image.fromarray(image).save(buf, "JPEG", quality=rng.randint(80, 95))
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _batches(posts: Iterable[SimPost], size: int) -> Iterator[list[SimPost]]:
    batch: list[SimPost] = []
    for post in posts:
        batch.append(post)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _count_rows(store_url: str | None) -> int | None:
    if not store_url:
        return None
    import sqlalchemy as sa

    from serving.store import make_engine, predictions

    engine = make_engine(store_url)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table(predictions.name):
                return 0
            return int(conn.execute(sa.select(sa.func.count()).select_from(predictions)).scalar_one())
    finally:
        engine.dispose()


@contextlib.contextmanager
def _client(params: Params, url: str | None, store_url: str | None, bundle: str | None) -> Iterator[Any]:
    if url:
        import httpx

        with httpx.Client(base_url=url.rstrip("/"), timeout=300.0) as client:
            yield client
        return
    from fastapi.testclient import TestClient

    from serving.app import create_app

    store = dataclasses.replace(params.serve.store,
                                store_image_small=params.drift.simulate.store_image_small)
    serve = dataclasses.replace(params.serve, store=store)
    app = create_app(dataclasses.replace(params, serve=serve), bundle, store_url=store_url,
                     poll_seconds=0.0)
    with TestClient(app, raise_server_exceptions=True) as client:
        yield client  # leaving the block runs the lifespan's shutdown: the store is flushed


def _wait_ready(client: Any, timeout: float = 300.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        r = client.get("/readyz")
        last = r.json()
        if r.status_code == 200:
            return last
        if last.get("last_reload_error") and not last.get("loading"):
            raise SimulationError(f"the cascade could not load its model: {last['last_reload_error']}")
        time.sleep(0.2)
    raise SimulationError(f"the cascade was not ready after {timeout:.0f} s: {last}")


def _post(client: Any, path: str, body: dict[str, Any]) -> dict[str, Any]:
    for attempt in range(_RETRIES):
        r = client.post(path, json=body)
        if r.status_code == 200:
            return r.json()
        if r.status_code == 503 and attempt < _RETRIES - 1:
            time.sleep(0.25 * 2**attempt)  # back-pressure: the deep queue or the store is full
            continue
        raise SimulationError(f"{path} answered {r.status_code}: {r.text[:500]}")
    raise AssertionError("unreachable")


def unseen_texts(path: str) -> frozenset[str]:
    """The texts of the table at `path` (the train split), which simulated traffic leaves out;
    none when `path` is empty or missing (then said in the log)."""
    if not path:
        return frozenset()
    if not Path(path).is_file():
        log.warning("drift.simulate.unseen_texts_from: %s does not exist; the traffic may reuse "
                    "texts the model was trained on", path)
        return frozenset()
    import pandas as pd

    texts = pd.read_parquet(path, columns=["text"])["text"].dropna()
    return frozenset(t for t in texts if t)


def simulate(
    params: Params,
    scenario: str,
    n: int,
    store_url: str | None = None,
    *,
    seed: int = 0,
    bundle: str | None = None,
    url: str | None = None,
    batch_size: int | None = None,
    feedback_share: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Send `n` posts of `scenario` through the cascade; return what was sent and decided.

    In-process (no `url`), the app serves `bundle` (default `serve.bundle`) and writes to
    `store_url` (default `serve.store.url`). With `url`, a running server answers and writes to
    its own store; `store_url`, when given, is only used to count the rows it wrote."""
    check_scenario(scenario)
    cfg = params.drift.simulate
    batch_size = batch_size or cfg.batch_size
    if not 1 <= batch_size <= params.serve.max_posts_per_request:
        raise SimulationError(
            f"batch size {batch_size} must lie in 1..serve.max_posts_per_request "
            f"({params.serve.max_posts_per_request})"
        )
    feedback_share = cfg.feedback_share if feedback_share is None else feedback_share
    store_url = store_url if (store_url or url) else params.serve.store.url
    before = _count_rows(store_url)
    rng = random.Random(f"simulate:{scenario}:{seed}")
    posts = generate_posts(scenario, n, seed, params.ingest.sample, cfg.variant_share,
                           cfg.shift_share, unseen_texts(cfg.unseen_texts_from))
    tally: dict[tuple[str, int, str], int] = {}
    stages: dict[str, int] = {}
    feedback = 0
    versions: set[str] = set()
    started = time.perf_counter()
    with _client(params, url, store_url, bundle) as client:
        ready = _wait_ready(client)
        bar = tqdm(total=n, desc=f"simulate {scenario}", unit="post", disable=not progress)
        for batch in _batches(posts, batch_size):
            body = {"posts": [
                {"id": p.id, "text": p.text,
                 **({"image": _encode(p.image, rng)} if p.image is not None else {})}
                for p in batch
            ]}
            answer = _post(client, "/v1/moderate", body)
            versions.add(str(answer.get("model_version")))
            for post, res in zip(batch, answer["results"], strict=True):
                key = (post.variant, post.label, res["decision"])
                tally[key] = tally.get(key, 0) + 1
                stages[res["stage"]] = stages.get(res["stage"], 0) + 1
                if feedback_share > 0 and rng.random() < feedback_share:
                    _post(client, "/v1/feedback", {"request_id": answer["request_id"],
                                                   "post_id": post.id, "label": post.label,
                                                   "moderator": f"simulator:{scenario}"})
                    feedback += 1
            bar.update(len(batch))
        bar.close()
    seconds = time.perf_counter() - started
    after = _count_rows(store_url)
    result = {
        "scenario": scenario,
        "n": n,
        "seed": seed,
        "store": store_url,
        "server": url or "in-process",
        "model_version": sorted(versions),
        "rows_written": None if before is None or after is None else after - before,
        "stages": stages,
        "feedback": feedback,
        "seconds": round(seconds, 1),
        "posts_per_second": round(n / seconds, 1) if seconds > 0 else None,
        **_rates(tally),
        "ready": {k: ready.get(k) for k in ("source", "model_version") if k in ready},
    }
    log.info("simulated %d %s posts in %.0f s (%s)", n, scenario, seconds,
             ", ".join(f"{k}: {v}" for k, v in stages.items()))
    return result


def _rates(tally: dict[tuple[str, int, str], int]) -> dict[str, Any]:
    """Blocked shares per label and per scenario variant: what the model made of the traffic."""

    def share(keys: Sequence[tuple[str, int, str]]) -> dict[str, Any]:
        total = sum(tally[k] for k in keys)
        blocked = sum(tally[k] for k in keys if k[2] == "block")
        return {"posts": total, "blocked": blocked,
                "blocked_share": round(blocked / total, 4) if total else None}

    keys = list(tally)
    out: dict[str, Any] = {
        "ads": share([k for k in keys if k[1] == 1]),
        "clean": share([k for k in keys if k[1] == 0]),
        "by_variant": {},
    }
    for variant in sorted({k[0] for k in keys}):
        out["by_variant"][variant or "unchanged"] = {
            "ads": share([k for k in keys if k[0] == variant and k[1] == 1]),
            "clean": share([k for k in keys if k[0] == variant and k[1] == 0]),
        }
    return out
