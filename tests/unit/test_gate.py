from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from adfilter.config import GateParams
from models.gate import (
    GATE_ALLOW,
    GATE_BLOCK,
    GATE_DEFER,
    NEVER_ALLOW,
    NEVER_BLOCK,
    FastTextGate,
    calibrate,
    cascade_blocks,
    cascade_report,
    route,
)

PARAMS = GateParams(
    epoch=10,
    lr=0.1,
    word_ngrams=2,
    minn=2,
    maxn=5,
    dim=16,
    bucket=20000,
    min_count=1,
    thread=1,
    seed=0,
    max_recall_loss=0.002, block=True, safety_logit=0.0
)

ADS = [
    "WIN a FREE prize now, call 0800 123 4567",
    "Claim your cash reward: txt WIN to 80082",
    "URGENT! You have won a holiday, call now",
    "Add me on WeChat xyz_88 for cheap watches",
    "Free entry to win tickets, text GO to 87121",
    "Cheap loans approved today, visit www.loans-now.biz",
]
CLEAN = [
    "are we still meeting for lunch tomorrow?",
    "sorry, I'll call you later tonight",
    "mum says dinner is at 7",
    "the bus was late again this morning",
    "can you send me the notes from class",
    "happy birthday! see you at home",
]


def corpus(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    texts = []
    for label in y:
        pool = ADS if label else CLEAN
        a, b = rng.choice(len(pool), 2, replace=False)
        texts.append(f"{pool[a]} {pool[b].split()[-1]}")
    return texts, y


@pytest.fixture(scope="module")
def gate() -> FastTextGate:
    texts, y = corpus(400, seed=0)
    return FastTextGate.train(texts, y, PARAMS)


def test_probabilities_are_in_range_and_rank_ads_first(gate: FastTextGate) -> None:
    texts, y = corpus(200, seed=1)
    p = gate.predict_proba(texts)
    assert p.shape == (200,) and p.dtype == np.float64
    assert (p >= 0).all() and (p <= 1).all()
    assert roc_auc_score(y, p) > 0.95
    assert gate.predict_proba([]).shape == (0,)
    # Multi-line posts are one post to the gate, not an error.
    assert gate.predict_proba(["free prize\ncall now"]).shape == (1,)


def test_gate_sees_normalised_text(gate: FastTextGate) -> None:
    # Full-width letters and case are folded before fastText sees the text.
    p = gate.predict_proba(["WIN a FREE prize now", "ｗｉｎ ａ ｆｒｅｅ ｐｒｉｚｅ ｎｏｗ"])
    assert p[0] == pytest.approx(p[1])


def test_save_load_round_trip(gate: FastTextGate, tmp_path: Path) -> None:
    gate.low, gate.high = 0.1, 0.9
    folder = gate.save(tmp_path / "gate")
    assert {p.name for p in folder.iterdir()} == {"gate.bin", "gate.json"}
    meta = json.loads((folder / "gate.json").read_text())
    assert meta["params"]["word_ngrams"] == 2 and meta["low"] == 0.1
    loaded = FastTextGate.load(folder)
    texts, _ = corpus(50, seed=2)
    np.testing.assert_array_equal(loaded.predict_proba(texts), gate.predict_proba(texts))
    assert (loaded.low, loaded.high, loaded.params) == (0.1, 0.9, PARAMS)
    np.testing.assert_array_equal(loaded.route(texts), route(gate.predict_proba(texts), 0.1, 0.9))


def test_load_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="gate.bin not found"):
        FastTextGate.load(tmp_path)


def test_training_with_one_thread_is_deterministic() -> None:
    texts, y = corpus(200, seed=3)
    a = FastTextGate.train(texts, y, PARAMS).predict_proba(texts)
    b = FastTextGate.train(texts, y, PARAMS).predict_proba(texts)
    np.testing.assert_array_equal(a, b)


def test_route() -> None:
    p = np.array([0.0, 0.1, 0.5, 0.9, 1.0])
    np.testing.assert_array_equal(
        route(p, 0.1, 0.9), [GATE_ALLOW, GATE_ALLOW, GATE_DEFER, GATE_BLOCK, GATE_BLOCK]
    )
    with pytest.raises(ValueError, match="low < high"):
        route(p, 0.9, 0.1)


def test_calibrate_on_a_crafted_set() -> None:
    #              clean posts ...............   ads ..................
    y = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    p_gate = np.array([0.01, 0.02, 0.05, 0.3, 0.6, 0.97, 0.04, 0.5, 0.8, 0.95, 0.99])
    p_deep = np.array([0.0, 0.1, 0.0, 0.2, 0.1, 0.95, 0.9, 0.9, 0.9, 0.95, 0.99])
    # The clean post at gate 0.97 is one the deep model also kills: blocking it adds nothing.
    # The clean post at 0.6 is allowed by the deep model, so the gate blocks only above it.
    # The ad at gate 0.04 is caught by the deep model, so the gate allows only below it.
    low, high = calibrate(p_gate, y, p_deep, deep_threshold=0.85, max_recall_loss=0.0)
    assert (low, high) == (0.02, 0.8)
    blocked = cascade_blocks(p_gate, p_deep, 0.85, low, high)
    deep = p_deep > 0.85
    assert not (blocked & (y == 0) & ~deep).any()
    assert blocked[y == 1].mean() >= deep[y == 1].mean()

    # With a budget of one lost ad in five, the gate may allow up to that ad too.
    low, high = calibrate(p_gate, y, p_deep, deep_threshold=0.85, max_recall_loss=0.2)
    assert (low, high) == (0.3, 0.8)
    report = cascade_report(p_gate, y, p_deep, 0.85, low, high)
    assert report["recall_deep"] - report["recall_cascade"] == pytest.approx(0.2)
    assert report["false_kills_cascade"] <= report["false_kills_deep"]


def test_an_allow_only_gate_never_blocks_and_the_margin_moves_low_down() -> None:
    y = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    p_gate = np.array([0.01, 0.02, 0.05, 0.3, 0.6, 0.97, 0.04, 0.5, 0.8, 0.95, 0.99])
    p_deep = np.array([0.0, 0.1, 0.0, 0.2, 0.1, 0.95, 0.9, 0.9, 0.9, 0.95, 0.99])
    low, high = calibrate(p_gate, y, p_deep, 0.85, max_recall_loss=0.0, block=False)
    assert (low, high) == (0.02, NEVER_BLOCK)
    assert not (route(p_gate, low, high) == GATE_BLOCK).any()

    low_m, high_m = calibrate(p_gate, y, p_deep, 0.85, max_recall_loss=0.0, safety_logit=1.0)
    logit = math.log(0.02 / 0.98) - 1.0
    assert low_m == pytest.approx(1 / (1 + math.exp(-logit)))
    assert low_m < 0.02 and 0.8 < high_m < 1.0
    logit_high = math.log(0.8 / 0.2) + 1.0
    assert high_m == pytest.approx(1 / (1 + math.exp(-logit_high)))
    with pytest.raises(ValueError, match="safety_logit must be >= 0"):
        calibrate(p_gate, y, p_deep, 0.85, safety_logit=-1.0)


def test_a_gate_json_without_the_newer_keys_loads_as_a_blocking_gate(
    gate: FastTextGate, tmp_path: Path
) -> None:
    gate.save(tmp_path)
    meta = json.loads((tmp_path / "gate.json").read_text())
    for key in ("block", "safety_logit"):
        meta["params"].pop(key)
    (tmp_path / "gate.json").write_text(json.dumps(meta))
    loaded = FastTextGate.load(tmp_path)
    assert loaded.params.block is True and loaded.params.safety_logit == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_calibration_never_adds_false_kills_and_keeps_recall(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 3000
    y = (rng.random(n) < 0.2).astype(int)
    p_gate = np.clip(np.round(0.5 * y + rng.normal(0.25, 0.2, n), 3), 0, 1)
    p_deep = np.clip(0.7 * y + rng.normal(0.15, 0.12, n), 0, 1)
    low, high = calibrate(p_gate, y, p_deep, 0.85, max_recall_loss=0.002)
    deep = p_deep > 0.85
    blocked = cascade_blocks(p_gate, p_deep, 0.85, low, high)
    assert not (blocked & (y == 0) & ~deep).any()
    budget = math.floor(0.002 * y.sum())
    assert (deep & (y == 1)).sum() - (blocked & (y == 1)).sum() <= budget
    # The search is tight: one step further on either side breaks a constraint.
    higher_low = p_gate[(p_gate > low) & (p_gate < high)]
    if higher_low.size:
        worse = cascade_blocks(p_gate, p_deep, 0.85, higher_low.min(), high)
        assert (deep & (y == 1)).sum() - (worse & (y == 1)).sum() > budget
    lower_high = p_gate[(p_gate < high) & (p_gate > low)]
    if lower_high.size and high <= 1:
        worse = cascade_blocks(p_gate, p_deep, 0.85, low, lower_high.max())
        assert (worse & (y == 0) & ~deep).any()


def test_calibration_falls_back_to_the_deep_model_when_the_gate_knows_nothing() -> None:
    y = np.array([0, 1, 0, 1])
    p_gate = np.array([0.5, 0.5, 0.5, 0.5])
    p_deep = np.array([0.1, 0.9, 0.2, 0.95])
    low, high = calibrate(p_gate, y, p_deep, 0.85, max_recall_loss=0.0)
    assert (low, high) == (NEVER_ALLOW, NEVER_BLOCK)
    np.testing.assert_array_equal(cascade_blocks(p_gate, p_deep, 0.85, low, high), p_deep > 0.85)


def test_calibration_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="no ads"):
        calibrate(np.array([0.1, 0.2]), np.array([0, 0]), np.array([0.1, 0.2]), 0.85)
    with pytest.raises(ValueError, match="no clean posts"):
        calibrate(np.array([0.1, 0.2]), np.array([1, 1]), np.array([0.1, 0.2]), 0.85)
