"""The prediction store behind a live server: after a clean shutdown there is one row per
answered post (none for rejected requests), rows match the answers, features decode to the
featurizer's widths, and feedback joins its prediction."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest

from serving.store import read_feedback, read_predictions, stack_features
from tests.serving_fixtures import (
    LiveServer,
    b64,
    ci_params,
    png_bytes,
    sample_posts,
    shared_bundle,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_bundle(tmp_path_factory)


def test_rows_equal_answered_posts_after_shutdown(bundle_dir: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store' / 'predictions.db'}"
    params = ci_params(store={"url": url, "write_batch": 16, "flush_interval_ms": 50.0,
                              "gate_feature_fraction": 1.0})
    df, images = sample_posts(n_text=40, n_image=6, seed=5)
    texts = [t for t in df["text"] if t]
    encoded = [b64(png_bytes(img)) for img in images.values()]
    bodies = []
    for i in range(60):
        if i % 6 == 5:
            bodies.append({"posts": [{"text": texts[(i + j) % len(texts)], "id": f"b{i}-{j}"}
                                     for j in range(3)]})
        elif i % 6 == 4:
            bodies.append({"text": texts[i % len(texts)], "image": encoded[i % len(encoded)],
                           "id": f"s{i}"})
        else:
            bodies.append({"text": texts[i % len(texts)], "id": f"s{i}"})
    bad = [{"text": 5}, {}, {"image": "http://x/y.png"}]

    live = LiveServer(params, str(bundle_dir), poll_seconds=0)
    with live:
        async def run() -> list[httpx.Response]:
            sem = asyncio.Semaphore(8)
            async with httpx.AsyncClient(base_url=live.url, timeout=120) as c:
                async def one(body: dict) -> httpx.Response:
                    async with sem:
                        return await c.post("/v1/moderate", json=body)

                return await asyncio.gather(*(one(b) for b in bodies + bad))

        responses = asyncio.run(run())
        good = [r.json() for r in responses if r.status_code == 200]
        assert len(good) == len(bodies) and len(responses) - len(good) == len(bad)
        answers = {}
        for body in good:
            for res in body.get("results", [body]):
                answers[(body["request_id"], res["id"])] = res
        for key in list(answers)[:5]:
            fb = httpx.post(f"{live.url}/v1/feedback",
                            json={"request_id": key[0], "post_id": key[1], "label": 1,
                                  "note": "checked"})
            assert fb.status_code == 200, fb.text
        dropped = live.state.metrics.drift_samples_dropped._value.get()
    # The server is stopped: the lifespan flushed the queue before returning.
    assert not live.thread.is_alive()

    rows = read_predictions(url)
    assert len(rows) == len(answers) == 60 + 10 * 2
    stored = {(r.request_id, r.post_id): r for r in rows.itertuples()}
    assert set(stored) == set(answers)
    for key, res in answers.items():
        row = stored[key]
        assert (row.stage, row.decision, row.model_version) == (
            res["stage"], res["decision"], res["model_version"])
        assert row.score == pytest.approx(res["score"])
    deep = rows[rows["stage"] == "deep"]
    gate = rows[rows["stage"] == "gate"]
    assert len(deep) and len(gate)
    assert (deep["features_kind"] == "model").all() and deep["features"].notna().all()
    assert deep["sensitivity"].notna().all() and gate["sensitivity"].isna().all()
    assert set(gate["features_kind"]) <= {"sampled", "none"}
    assert (gate["features_kind"] == "none").sum() == dropped

    from adfilter.features import FeaturePipeline

    dims = FeaturePipeline.load(bundle_dir / "featurizer").feature_dims
    stacked = stack_features(rows["features"])
    assert len(stacked["row"]) == rows["features"].notna().sum()
    for name in ("tfidf", "sent_emb", "sift_bow", "hsv", "qr"):
        assert stacked[name].shape == (len(stacked["row"]), dims[name]), name
        assert np.isfinite(stacked[name]).all()
    assert stacked["token_ids"].shape[1] == dims["token_ids"]
    image_rows = rows["has_image"].to_numpy()[stacked["row"]]
    assert (stacked["has_image"] == image_rows).all()
    assert (stacked["hsv"][~image_rows] == 0).all() and (stacked["hsv"][image_rows].sum(1) > 0.99).all()

    fb = read_feedback(url)
    assert len(fb) == 5 and set(fb["note"]) == {"checked"}
    joined = fb.merge(rows, on=["request_id", "post_id"], how="left")
    assert joined["stage"].notna().all()
