"""Unit tests of the serving parts that need no server: routing, gate loading, bundle sources,
the micro-batcher, the prediction store and its blobs, the TorchScript input conversion."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from serving.batcher import DeepResult, MicroBatcher
from serving.bundle import BundleError, DeepModel, _find_bundle, fingerprint, parse_source
from serving.cascade import ALLOW, BLOCK, DEEP, deep_decision, route
from serving.errors import ApiError, Overloaded
from serving.gate import TextGate
from serving.metrics import ServingMetrics
from serving.store import (
    PredictionStore,
    decode_features,
    encode_features,
    new_id,
    read_feedback,
    read_predictions,
    stack_features,
    utcnow,
)

# --------------------------------------------------------------------------- cascade


def test_route_follows_the_documented_rules() -> None:
    p = np.array([0.05, 0.95, 0.5, 0.05, 0.95, 0.0, 0.2, 0.8])
    has_text = np.array([True, True, True, True, True, False, True, True])
    has_image = np.array([False, False, False, True, True, True, False, False])
    got = route(p, has_text, has_image, low=0.2, high=0.8)
    # The thresholds are inclusive (p <= low allows, p >= high blocks); image and no-text posts
    # always go to the deep model, even with a confident gate.
    assert got == [ALLOW, BLOCK, DEEP, DEEP, DEEP, DEEP, ALLOW, BLOCK]


def test_route_with_never_thresholds_defers_everything() -> None:
    p = np.linspace(0, 1, 11)
    got = route(p, np.ones(11, bool), np.zeros(11, bool), low=-1.0, high=2.0)
    assert set(got) == {DEEP}


def test_route_rejects_misaligned_inputs() -> None:
    with pytest.raises(ValueError, match="one value per post"):
        route(np.zeros(3), np.ones(2, bool), np.zeros(3, bool), 0.1, 0.9)


def test_deep_decision_blocks_strictly_above_the_threshold() -> None:
    assert deep_decision(0.85, 0.85) == ALLOW
    assert deep_decision(0.8501, 0.85) == BLOCK
    assert deep_decision(0.1, 0.85) == ALLOW


# --------------------------------------------------------------------------- gate


ADS = ["WIN a FREE prize now, call 0800 123 4567", "Claim your cash reward: txt WIN to 80082",
       "URGENT! You have won a holiday, call now", "Add me on WeChat xyz_88 for cheap watches"]
CLEAN = ["are we still meeting for lunch tomorrow?", "sorry, I'll call you later tonight",
         "mum says dinner is at 7", "the bus was late again this morning"]


@pytest.fixture(scope="module")
def gate_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from adfilter.config import GateParams
    from models.gate import FastTextGate

    params = GateParams(epoch=15, lr=0.5, word_ngrams=2, minn=2, maxn=4, dim=8, bucket=5000,
                        min_count=1, thread=1, seed=0, max_recall_loss=0.002, block=True, safety_logit=0.0)
    texts = (ADS + CLEAN) * 6
    labels = np.array(([1] * len(ADS) + [0] * len(CLEAN)) * 6)
    gate = FastTextGate.train(texts, labels, params)
    gate.low, gate.high = 0.25, 0.75
    return gate.save(tmp_path_factory.mktemp("gate"))


def test_text_gate_matches_the_training_gate(gate_dir: Path) -> None:
    from adfilter.features import normalize_text
    from models.gate import FastTextGate

    trained = FastTextGate.load(gate_dir)
    served = TextGate.load(gate_dir)
    texts = ADS + CLEAN + ["a brand new text the gate never saw", "call 0800 now to WIN"]
    expected = trained.predict_proba(texts)
    got = served.p_ad([normalize_text(t) for t in texts])
    np.testing.assert_allclose(got, expected, atol=1e-7)
    assert (served.low, served.high) == (0.25, 0.75)
    # It learnt something: every training ad scores above every training clean text.
    assert got[: len(ADS)].min() > got[len(ADS): len(ADS) + len(CLEAN)].max()


def test_text_gate_load_names_what_is_missing(tmp_path: Path, gate_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="gate.bin"):
        TextGate.load(tmp_path)
    (tmp_path / "gate.bin").write_bytes((gate_dir / "gate.bin").read_bytes())
    (tmp_path / "gate.json").write_text(json.dumps({"low": "x", "high": 0.9}))
    with pytest.raises(ValueError, match="low"):
        TextGate.load(tmp_path)
    (tmp_path / "gate.json").write_text(json.dumps({"low": 0.9, "high": 0.1}))
    with pytest.raises(ValueError, match="low < high"):
        TextGate.load(tmp_path)


def test_text_gate_handles_newlines_and_empty_batches(gate_dir: Path) -> None:
    gate = TextGate.load(gate_dir)
    assert gate.p_ad([]).shape == (0,)
    p = gate.p_ad(["win a free\nprize\r\nnow", "win a free prize now"])
    assert p[0] == pytest.approx(p[1])


# --------------------------------------------------------------------------- bundle sources


def test_parse_source() -> None:
    s = parse_source("models:/ad-filter@champion")
    assert (s.name, s.alias, s.version, s.is_registry) == ("ad-filter", "champion", None, True)
    s = parse_source("models:/ad-filter/7")
    assert (s.name, s.alias, s.version) == ("ad-filter", None, "7")
    s = parse_source("artifacts/export")
    assert s.path == Path("artifacts/export") and not s.is_registry
    for bad in ("models:/ad-filter", "models:/a@b/c", "s3://bucket/bundle", "https://x/y"):
        with pytest.raises(BundleError):
            parse_source(bad)


def _fake_bundle(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("model.pt", "gate.bin", "gate.json"):
        (folder / name).write_text(name)
    return folder


def test_find_bundle_reads_the_pyfunc_layout_and_searches_otherwise(tmp_path: Path) -> None:
    root = tmp_path / "download"
    _fake_bundle(root / "artifacts" / "bundle")
    _fake_bundle(root / "artifacts" / "zz" / "deeper" / "other")
    (root / "MLmodel").write_text(
        "flavors:\n  python_function:\n    artifacts:\n      bundle:\n        path: artifacts/bundle\n"
    )
    assert _find_bundle(root) == root / "artifacts" / "bundle"
    (root / "MLmodel").unlink()
    assert _find_bundle(root) == root / "artifacts" / "bundle"  # the shallowest
    assert _find_bundle(tmp_path / "nothing") is None


def test_fingerprint_changes_when_a_file_is_rewritten(tmp_path: Path) -> None:
    folder = _fake_bundle(tmp_path / "b")
    before = fingerprint(folder)
    assert fingerprint(folder) == before
    time.sleep(0.01)
    (folder / "model.pt").write_text("another model")
    assert fingerprint(folder) != before


# --------------------------------------------------------------------------- TorchScript inputs


class _Echo(torch.nn.Module):
    def forward(self, token_ids, image, tfidf, sent_emb, sift_bow, hsv, qr, has_text, has_image):  # noqa: ANN001
        ad_logit = tfidf.sum(1) + image.mean((1, 2, 3)) + token_ids.sum(1).float()
        sensitivity = torch.sigmoid(hsv.sum(1)) * has_text.float()
        score = torch.where(has_image, torch.ones_like(ad_logit), torch.zeros_like(ad_logit))
        return ad_logit, sensitivity, score


def test_deep_model_builds_the_inputs_the_net_expects(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    config = {"inputs": [{"name": n, "dtype": d} for n, d in (
        ("token_ids", "int64"), ("image", "float32"), ("tfidf", "float32"),
        ("sent_emb", "float32"), ("sift_bow", "float32"), ("hsv", "float32"), ("qr", "float32"),
        ("has_text", "bool"), ("has_image", "bool"))]}
    torch.jit.save(torch.jit.script(_Echo()), str(path),
                   _extra_files={"config.json": json.dumps(config)})
    model = DeepModel.load(path, "cpu")
    n, s = 3, 4
    image_small = np.zeros((n, s, s, 3), np.uint8)
    image_small[1] = 255
    arrays = {
        "token_ids": np.array([[1, 2, 0], [0, 0, 0], [5, 0, 0]], np.int32),
        "image_small": image_small,
        "tfidf": np.ones((n, 2), np.float32), "sent_emb": np.zeros((n, 3), np.float32),
        "sift_bow": np.zeros((n, 2), np.float32), "hsv": np.zeros((n, 2), np.float32),
        "qr": np.zeros((n, 1), np.float32),
        "has_text": np.array([True, False, True]), "has_image": np.array([False, True, False]),
    }
    tensors = model.tensors(arrays)
    assert tensors[0].dtype == torch.int64
    assert tuple(tensors[1].shape) == (n, 3, s, s) and tensors[1].dtype == torch.float32
    assert float(tensors[1][1].max()) == 1.0  # uint8 255 -> 1.0
    assert tensors[7].dtype == torch.bool
    out = model.predict(arrays)
    logit = np.array([2 + 3, 2 + 1, 2 + 5], np.float32)
    np.testing.assert_allclose(out["p_ad"], 1 / (1 + np.exp(-logit)), rtol=1e-6)
    np.testing.assert_allclose(out["sensitivity"], [0.5, 0.0, 0.5])
    np.testing.assert_allclose(out["score"], [0.0, 1.0, 0.0])
    del arrays["hsv"]
    with pytest.raises(BundleError, match="hsv"):
        model.predict(arrays)


def test_deep_model_load_refuses_a_file_that_is_not_torchscript(tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(b"not a model")
    with pytest.raises(BundleError, match="TorchScript"):
        DeepModel.load(tmp_path / "model.pt", "cpu")


# --------------------------------------------------------------------------- micro-batcher


def _recording_batcher(max_size: int, max_wait_s: float, max_queue: int = 1000,
                       delay: float = 0.0) -> tuple[MicroBatcher, list[tuple[int, bool, int]]]:
    batches: list[tuple[int, bool, int]] = []

    def run_batch(bundle, jobs):  # noqa: ANN001
        time.sleep(delay)
        batches.append((len(jobs), jobs[0].predict, id(bundle)))
        return [DeepResult(float(len(j.text)), 0.0, float(len(j.text)) / 100, {"n": np.array(1)},
                           0.0, 0.0, 0) for j in jobs]

    return MicroBatcher(run_batch, max_size, max_wait_s, max_queue), batches


def test_batcher_groups_up_to_max_size_and_answers_each_post() -> None:
    batcher, batches = _recording_batcher(max_size=4, max_wait_s=0.05)
    batcher.start()
    try:
        texts = ["x" * i for i in range(1, 11)]
        results = batcher.run_sync(object(), texts, [None] * len(texts))
    finally:
        batcher.stop()
    assert [r.p_ad for r in results] == [float(len(t)) for t in texts]
    assert sum(b[0] for b in batches) == 10
    assert max(b[0] for b in batches) <= 4
    assert len(batches) <= 4  # 10 posts submitted at once fill batches, not one call each
    assert all(r.batch_size >= 1 for r in results)


def test_batcher_waits_at_most_max_wait_for_a_lonely_post() -> None:
    batcher, batches = _recording_batcher(max_size=64, max_wait_s=0.03)
    batcher.start()
    try:
        t0 = time.perf_counter()
        (result,) = batcher.run_sync(object(), ["alone"], [None])
        elapsed = time.perf_counter() - t0
    finally:
        batcher.stop()
    assert batches == [(1, True, batches[0][2])]
    assert 0.025 <= result.queued_s <= elapsed
    assert elapsed < 2.0


def test_batcher_never_mixes_bundles_in_one_batch() -> None:
    batcher, batches = _recording_batcher(max_size=16, max_wait_s=0.05)
    old, new = object(), object()
    batcher.start()
    try:
        threads = [
            threading.Thread(target=batcher.run_sync, args=(old if i % 2 else new, ["p"], [None]))
            for i in range(12)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        batcher.stop()
    assert {b[2] for b in batches} == {id(old), id(new)}
    assert sum(b[0] for b in batches) == 12


def test_batcher_refuses_beyond_max_queue_and_drains_on_stop() -> None:
    batcher, batches = _recording_batcher(max_size=2, max_wait_s=0.0, max_queue=3, delay=0.2)
    from serving.batcher import Job

    answered: list[object] = []
    batcher.start()
    jobs = [Job(object(), "t", None, True, answered.append) for _ in range(6)]
    batcher.submit(jobs[0])
    time.sleep(0.05)  # the worker is now busy with the first job
    for job in jobs[1:4]:
        batcher.submit(job)
    with pytest.raises(Overloaded) as info:
        batcher.submit(jobs[4])
    assert info.value.status == 503 and "max_queue" in info.value.message
    batcher.stop()
    assert len(answered) == 4  # everything accepted was answered before stop returned


def test_background_jobs_run_only_when_no_request_waits_and_are_bounded() -> None:
    batcher, batches = _recording_batcher(max_size=4, max_wait_s=0.0, delay=0.02)
    from serving.batcher import Job

    batcher._background_limit = 3
    got: list[object] = []
    assert not batcher.submit_background(Job(object(), "b", None, False, got.append))  # not started
    batcher.start()
    accepted = [batcher.submit_background(Job(object(), "b", None, False, got.append))
                for _ in range(10)]
    batcher.run_sync(object(), ["r"], [None])
    batcher.stop()
    assert sum(accepted) >= 3 and not all(accepted)
    assert len(got) == sum(accepted)  # every accepted background job was featurized
    assert all(isinstance(r, DeepResult) for r in got)
    assert any(not predict for _, predict, _ in batches) and any(p for _, p, _ in batches)
    # Drift samples are featurized one post at a time, so a request never waits behind a
    # whole batch of them.
    assert all(size == 1 for size, predict, _ in batches if not predict)


# --------------------------------------------------------------------------- store


def _arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "tfidf": rng.normal(size=16).astype(np.float32),
        "sent_emb": rng.normal(size=384).astype(np.float32),
        "sift_bow": rng.random(8).astype(np.float32),
        "hsv": rng.random(12).astype(np.float32),
        "qr": np.array([1.0], np.float32),
        "token_ids": rng.integers(0, 30522, 32).astype(np.int32),
        "has_text": np.bool_(True),
        "has_image": np.bool_(False),
        "image_small": rng.integers(0, 256, (8, 8, 3)).astype(np.uint8),
    }


def test_feature_blob_round_trip() -> None:
    rng = np.random.default_rng(0)
    arrays = _arrays(rng)
    blob = encode_features(arrays)
    back = decode_features(blob)
    assert "image_small" not in back
    for name in ("tfidf", "sent_emb", "sift_bow", "hsv", "qr"):
        assert back[name].dtype == np.float32
        np.testing.assert_allclose(back[name], arrays[name], rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(back["token_ids"], arrays["token_ids"])
    assert bool(back["has_text"]) and not bool(back["has_image"])
    assert decode_features(blob, float32=False)["tfidf"].dtype == np.float16
    with_image = decode_features(encode_features(arrays, include_image=True))
    np.testing.assert_array_equal(with_image["image_small"], arrays["image_small"])


def _row(request_id: str, post_id: str, when, features=None) -> dict:  # noqa: ANN001
    return {"id": new_id(), "request_id": request_id, "post_id": post_id, "created_at": when,
            "model_version": "v1", "stage": "deep" if features is not None else "gate",
            "decision": "allow", "score": 0.1, "p_ad": 0.1, "p_gate": 0.05, "sensitivity": None,
            "has_text": True, "has_image": False, "text_chars": 5, "latency_ms": 1.0,
            "features_kind": "model" if features is not None else "none", "features": features}


def test_store_writes_every_row_and_reads_back(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sub' / 'p.db'}"
    rng = np.random.default_rng(1)
    store = PredictionStore(url, queue_size=1000, write_batch=7, flush_interval_s=0.01)
    writes: list[int] = []
    store.on_write = lambda table, rows, s: writes.append(rows)
    store.start()
    t0 = utcnow()
    for i in range(50):
        feats = _arrays(rng) if i % 2 else None
        store.put_prediction(_row(f"r{i}", f"p{i}", t0 + timedelta(seconds=i), feats))
    store.put_feedback({"request_id": "r3", "post_id": "p3", "created_at": t0, "label": 1,
                        "moderator": "m", "note": None})
    store.close()
    assert store.written == {"predictions": 50, "feedback": 1} and store.failed == 0
    assert max(writes) <= 7

    df = read_predictions(url)
    assert len(df) == 50 and df["post_id"].tolist() == [f"p{i}" for i in range(50)]
    assert df["features"].isna().sum() == 25
    recent = read_predictions(url, limit=5)
    assert recent["post_id"].tolist() == [f"p{i}" for i in range(45, 50)]
    since = read_predictions(url, since=(t0 + timedelta(seconds=40)).isoformat())
    assert since["post_id"].tolist() == [f"p{i}" for i in range(40, 50)]
    stacked = stack_features(df["features"])
    assert stacked["sent_emb"].shape == (25, 384) and stacked["token_ids"].shape == (25, 32)
    assert stacked["row"].tolist() == list(range(1, 50, 2))
    fb = read_feedback(url)
    assert fb[["request_id", "post_id", "label"]].values.tolist() == [["r3", "p3", 1]]


def test_store_readers_on_an_empty_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    assert read_predictions(url).empty and "features" in read_predictions(url).columns
    assert read_feedback(url).empty


def test_store_refuses_a_bad_url() -> None:
    from serving.store import StoreError

    with pytest.raises(StoreError, match="serve.store.url"):
        PredictionStore("not a url at all")


# --------------------------------------------------------------------------- metrics, errors


def test_metrics_render_the_documented_names() -> None:
    m = ServingMetrics()
    m.posts.labels("gate", "allow").inc(3)
    m.stage_latency.labels("gate").observe(0.0001)
    m.on_batch(4, 0.01, background=False)
    m.set_model("v1", "/b")
    m.set_model("v2", "/b")
    text = m.render().decode()
    assert 'adfilter_posts_total{decision="allow",stage="gate"} 3.0' in text
    assert 'adfilter_deep_batch_size_count{kind="request"} 1.0' in text
    assert 'adfilter_model_info{model_version="v2",source="/b"} 1.0' in text
    assert 'model_version="v1"' not in text  # only the model being served is reported
    assert "adfilter_stage_latency_seconds_bucket" in text


def test_gpu_collector_reports_only_with_cuda() -> None:
    from serving.metrics import GpuCollector

    families = list(GpuCollector().collect())
    if not torch.cuda.is_available():
        assert families == []
    else:
        names = {f.name for f in families}
        assert {"adfilter_gpu_memory_allocated_bytes", "adfilter_gpu_memory_reserved_bytes"} <= names


def test_error_body_shape() -> None:
    err = ApiError(422, "text_too_long", "too long", field="posts[1].text")
    assert err.body("rid") == {"error": {"code": "text_too_long", "message": "too long",
                                         "field": "posts[1].text"}, "request_id": "rid"}
