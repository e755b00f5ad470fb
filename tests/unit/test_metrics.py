from __future__ import annotations

import json
import math

import numpy as np
import pytest

from adfilter.schema import SLICES
from models.metrics import (
    REPORT_SLICES,
    TEXT_POSTS,
    binary_metrics,
    format_table,
    json_safe,
    metrics_report,
    operating_point,
    per_slice,
)

# Four clean posts, three ads; one clean post (0.9) outscores two ads.
Y = np.array([0, 0, 0, 0, 1, 1, 1])
S = np.array([0.1, 0.2, 0.3, 0.9, 0.4, 0.8, 0.95])


def _brute_force_recall_at_fpr(y: np.ndarray, s: np.ndarray, max_fpr: float) -> float:
    best = 0.0
    for t in np.concatenate([[np.inf], np.unique(s)]):
        pred = s >= t
        fpr = (pred & (y == 0)).sum() / (y == 0).sum()
        if fpr <= max_fpr:
            best = max(best, (pred & (y == 1)).sum() / (y == 1).sum())
    return best


def test_perfect_scores() -> None:
    y = np.array([0, 0, 0, 1, 1])
    m = binary_metrics(y, np.array([0.0, 0.1, 0.2, 0.9, 1.0]), threshold=0.5)
    for key in (
        "accuracy",
        "precision",
        "recall",
        "f1",
        "mcc",
        "pr_auc",
        "roc_auc",
        "recall_at_fpr",
    ):
        assert m[key] == pytest.approx(1.0), key
    assert m["false_kill_rate"] == 0.0
    assert (m["n"], m["n_pos"], m["tp"], m["fp"], m["tn"], m["fn"]) == (5, 2, 2, 0, 3, 0)


def test_inverted_scores() -> None:
    y = np.array([0, 0, 0, 1, 1])
    m = binary_metrics(y, np.array([1.0, 0.9, 0.8, 0.1, 0.0]), threshold=0.5)
    assert m["roc_auc"] == pytest.approx(0.0)
    assert m["recall_at_fpr"] == 0.0
    assert m["mcc"] == pytest.approx(-1.0)
    assert m["accuracy"] == 0.0
    assert m["false_kill_rate"] == 1.0
    # Average precision of a ranking with every ad last: mean of 1/4 and 2/5.
    assert m["pr_auc"] == pytest.approx((1 / 4 + 2 / 5) / 2)


def test_hand_computed_threshold_metrics() -> None:
    m = binary_metrics(Y, S, threshold=0.5)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 3, 1)
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["false_kill_rate"] == pytest.approx(1 / 4)
    assert m["mcc"] == pytest.approx((2 * 3 - 1 * 1) / math.sqrt(3 * 3 * 4 * 4))
    # 12 (ad, clean) pairs; the ad ranked above the clean post in 10 of them.
    assert m["roc_auc"] == pytest.approx(10 / 12)


def test_threshold_is_strict_like_the_product_rule() -> None:
    # A post is blocked when score > threshold: a score equal to the threshold is allowed.
    m = binary_metrics(np.array([0, 1]), np.array([0.85, 0.86]), threshold=0.85)
    assert (m["tp"], m["fp"]) == (1, 0)


def test_recall_at_fpr_on_a_crafted_example() -> None:
    # No false positive allowed: only the 0.95 ad sits above every clean post.
    assert operating_point(Y, S, max_fpr=0.0)[0] == pytest.approx(1 / 3)
    # One false positive of four allowed: everything above 0.3 is blocked, every ad caught.
    recall, threshold = operating_point(Y, S, max_fpr=0.25)
    assert recall == pytest.approx(1.0)
    assert 0.3 <= threshold < 0.4
    # 0.003 of four clean posts is no false positive at all.
    assert binary_metrics(Y, S, 0.5)["recall_at_fpr"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("seed", range(5))
def test_threshold_at_fpr_reproduces_recall_at_fpr(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 400)
    s = np.round(y * 0.8 + rng.normal(0, 0.5, y.size), 2)  # rounded: ties on purpose
    max_fpr = 0.02
    m = binary_metrics(y, s, threshold=0.5, max_fpr=max_fpr)
    assert m["recall_at_fpr"] == pytest.approx(_brute_force_recall_at_fpr(y, s, max_fpr))
    at = binary_metrics(y, s, threshold=m["threshold_at_fpr"], max_fpr=max_fpr)
    assert at["recall"] == pytest.approx(m["recall_at_fpr"])
    assert at["false_kill_rate"] <= max_fpr


def test_one_class_slices_are_nan_and_json_null() -> None:
    only_clean = binary_metrics(np.zeros(3), np.array([0.1, 0.2, 0.9]), threshold=0.5)
    for key in ("recall", "mcc", "pr_auc", "roc_auc", "recall_at_fpr", "threshold_at_fpr"):
        assert math.isnan(only_clean[key]), key
    assert only_clean["false_kill_rate"] == pytest.approx(1 / 3)
    assert only_clean["precision"] == 0.0

    only_ads = binary_metrics(np.ones(4), np.array([0.1, 0.2, 0.9, 0.95]), threshold=0.5)
    assert only_ads["recall"] == pytest.approx(0.5)
    assert only_ads["pr_auc"] == pytest.approx(1.0)
    for key in ("false_kill_rate", "roc_auc", "recall_at_fpr", "mcc"):
        assert math.isnan(only_ads[key]), key

    text = json.dumps(json_safe({"a": only_clean, "b": only_ads}), allow_nan=False)
    assert json.loads(text)["a"]["roc_auc"] is None


def test_empty_input_gives_zero_counts() -> None:
    m = binary_metrics(np.array([], dtype=int), np.array([]), threshold=0.5)
    assert m["n"] == 0 and m["n_pos"] == 0
    assert math.isnan(m["accuracy"])


def test_sensitivity_mae() -> None:
    m = binary_metrics(
        Y,
        S,
        0.5,
        sens_true=np.array([0, 0, 0, 0, 1, 0.5, 1.0]),
        sens_pred=np.array([0.1, 0, 0, 0, 0.5, 0.5, 1.0]),
    )
    assert m["sensitivity_mae"] == pytest.approx(0.6 / 7)
    assert math.isnan(binary_metrics(Y, S, 0.5)["sensitivity_mae"])


def test_mismatched_lengths_and_nan_scores_fail() -> None:
    with pytest.raises(ValueError, match="7 rows but score has 6"):
        binary_metrics(Y, S[:-1], 0.5)
    with pytest.raises(ValueError, match="NaN"):
        binary_metrics(Y, np.where(Y == 1, np.nan, S), 0.5)


def test_per_slice_covers_every_slice_and_text_posts() -> None:
    slices = np.array(
        [
            "text_only",
            "text_only",
            "image_only",
            "text_image",
            "text_only",
            "hidden_image_ad",
            "text_image",
        ]
    )
    has_text = np.array([True, True, False, True, True, True, True])
    out = per_slice(Y, S, 0.5, slices, has_text)
    assert tuple(out) == REPORT_SLICES == (*SLICES, TEXT_POSTS)
    assert out["text_only"]["n"] == 3 and out["text_only"]["n_pos"] == 1
    assert out[TEXT_POSTS]["n"] == 6
    assert out["hidden_image_ad"]["n"] == 1 and out["hidden_image_ad"]["recall"] == 1.0
    # Each slice is exactly binary_metrics on its rows.
    mask = slices == "text_image"
    assert out["text_image"] == binary_metrics(Y[mask], S[mask], 0.5)


def test_empty_slice_is_reported_with_n_zero() -> None:
    out = per_slice(Y, S, 0.5, np.array(["text_only"] * 7), np.ones(7, bool))
    assert out["image_only"]["n"] == 0
    assert math.isnan(out["image_only"]["recall"])


def test_metrics_report_and_table() -> None:
    report = metrics_report(Y, S, 0.5, np.array(["text_only"] * 7), np.ones(7, bool))
    assert set(report) == {"threshold", "overall", "slices"}
    table = format_table(
        {"ours": report}, [("acc", "overall.accuracy"), ("img", "slices.image_only.recall")]
    )
    lines = table.splitlines()
    assert lines[0].split() == ["model", "acc", "img"]
    assert lines[2].split() == ["ours", f"{5 / 7:.4f}", "-"]
