"""The drift job's window, its too-few-posts path and `adfilter drift --json`, on a real SQLite
prediction store (no model is loaded on these paths)."""

from __future__ import annotations

import dataclasses
import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from adfilter.cli import main as cli_main
from adfilter.config import Params, load_params
from serving.store import PredictionStore, new_id, utcnow
from tasks.drift import drift, read_window, window_weights

ROOT = Path(__file__).resolve().parents[2]


def _params(tmp_path: Path, **drift_overrides: object) -> Params:
    params = load_params(ROOT / "params.yaml", profile="ci")
    return dataclasses.replace(params, drift=dataclasses.replace(
        params.drift, reference=str(tmp_path / "reference"), log_mlflow=False, **drift_overrides))


def _fill(url: str, n_model: int, n_none: int, hours_ago: float = 0.0) -> None:
    store = PredictionStore(url, write_batch=64)
    store.start()
    when = utcnow() - timedelta(hours=hours_ago)
    features = {"tfidf": np.zeros(4, np.float32), "sent_emb": np.zeros(8, np.float32),
                "sift_bow": np.zeros(3, np.float32), "hsv": np.zeros(2, np.float32),
                "qr": np.zeros(1, np.float32), "token_ids": np.zeros(6, np.int32),
                "has_text": np.bool_(True), "has_image": np.bool_(False)}
    for i in range(n_model + n_none):
        kind = "model" if i < n_model else "none"
        store.put_prediction({
            "id": new_id(), "request_id": f"r{i}", "post_id": f"p{i}", "created_at": when,
            "model_version": "test", "stage": "deep" if kind == "model" else "gate",
            "decision": "allow", "score": 0.1, "p_ad": 0.1, "p_gate": 0.1, "sensitivity": 0.0,
            "has_text": True, "has_image": False, "text_chars": 10, "latency_ms": 1.0,
            "features_kind": kind, "features": features if kind == "model" else None,
        })
    store.close()


def test_too_few_posts_are_reported_and_trigger_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    _fill(url, n_model=5, n_none=30)
    params = _params(tmp_path)
    result = drift(params, url, out_dir=tmp_path / "drift", progress=False)
    assert result["shift"] is None
    assert result["retrain"] is False
    assert result["threshold"] == 0.15
    assert result["n_window"] == 35 and result["n_features"] == 5
    assert "too few posts" in result["reason"] and str(params.drift.min_posts) in result["reason"]
    assert result["window"]["start"] and result["window"]["end"]
    written = json.loads((tmp_path / "drift.json").read_text())
    assert written["retrain"] is False and written["n_window"] == 35


def test_an_empty_store_is_a_window_of_nothing(tmp_path: Path) -> None:
    result = drift(_params(tmp_path), f"sqlite:///{tmp_path / 'empty.db'}",
                   out_dir=tmp_path / "drift", progress=False)
    assert result["n_window"] == 0 and result["retrain"] is False and result["shift"] is None
    assert result["window"]["start"] is None


def test_the_window_is_recent_posts_only_and_at_most_window_posts(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    _fill(url, n_model=7, n_none=0, hours_ago=48)
    _fill(url, n_model=3, n_none=4)
    df, window = read_window(_params(tmp_path, window_hours=24.0, window_posts=100), url)
    assert len(df) == 7  # the two-day-old posts are outside the last 24 h
    assert window["since"] is not None and window["limit"] == 100
    df, _ = read_window(_params(tmp_path, window_hours=0.0, window_posts=5), url)
    assert len(df) == 5  # the most recent five
    df, _ = read_window(_params(tmp_path, window_hours=0.0, window_posts=0), url)
    assert len(df) == 14


def test_gate_posts_sampled_for_drift_stand_for_the_others() -> None:
    import pandas as pd

    df = pd.DataFrame({"features_kind": ["model", "sampled", "model"]})
    assert window_weights(df, 0.05).tolist() == pytest.approx([1.0, 20.0, 1.0])
    assert window_weights(df, 0.0).tolist() == [1.0, 1.0, 1.0]


def test_cli_prints_the_decision_as_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    _fill(url, n_model=3, n_none=3)
    code = cli_main(["--params", str(ROOT / "params.yaml"), "drift", "--profile", "ci",
                     "--store", url, "--json", "--no-mlflow", "--out", str(tmp_path / "out"),
                     "--report", str(tmp_path / "out.json")])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert {"shift", "threshold", "retrain", "n_window", "reason", "window"} <= set(out)
    assert out["threshold"] == 0.15 and out["retrain"] is False and out["n_window"] == 6
    assert json.loads((tmp_path / "out.json").read_text())["n_window"] == 6


def test_a_shift_only_triggers_above_the_threshold_and_above_sampling_noise() -> None:
    from tasks.drift import decide

    assert decide(0.30, 0.05, 0.15)[:2] == (True, False)
    assert decide(0.10, 0.05, 0.15)[:2] == (False, False)
    retrain, noisy, verdict = decide(0.18, 0.22, 0.15)  # a window too small to tell
    assert (retrain, noisy) == (False, True) and "sampling alone" in verdict
    assert decide(0.15, 0.01, 0.15)[0] is False  # "above", strictly
