"""Binary metrics for the ad filter, overall and per slice, on sklearn's implementations.

Conventions every report shares:

- A post is predicted an ad (blocked) when `score > threshold`, the product's rule
  (`score > model.threshold`). `threshold_at_fpr` is given in the same `>` convention, so a
  threshold read from one split can be applied to another unchanged.
- `recall_at_fpr` is the best recall on the ROC curve whose false-positive rate is at most
  `max_fpr` (0.3% by default): the figure a moderator cares about, since every false positive
  is a user's clean post removed. `false_kill_rate` is the FPR at the deployed threshold.
- A metric that is undefined on the given rows is NaN: ROC AUC, `recall_at_fpr`,
  `threshold_at_fpr` and MCC need both classes, PR AUC and recall need a positive,
  `false_kill_rate` needs a negative, precision needs a predicted positive. `json_safe` turns
  NaN into `null` for `reports/metrics.json`, so one-class slices never break the report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    matthews_corrcoef,
    mean_absolute_error,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from adfilter.schema import SLICES

DEFAULT_MAX_FPR = 0.003
TEXT_POSTS = "text_posts"
REPORT_SLICES = (*SLICES, TEXT_POSTS)

METRIC_KEYS = (
    "accuracy",
    "precision",
    "recall",
    "f1",
    "mcc",
    "pr_auc",
    "roc_auc",
    "recall_at_fpr",
    "threshold_at_fpr",
    "false_kill_rate",
    "sensitivity_mae",
    "n",
    "n_pos",
    "tp",
    "fp",
    "tn",
    "fn",
)

NAN = float("nan")


def operating_point(
    y_true: np.ndarray, score: np.ndarray, max_fpr: float = DEFAULT_MAX_FPR
) -> tuple[float, float]:
    """`(recall, threshold)`: the best recall with FPR <= `max_fpr`, and the threshold giving it.

    Blocking `score > threshold` reproduces that ROC point on these rows. NaN for both when
    `y_true` lacks either class.
    """
    y = np.asarray(y_true).astype(int).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    if y.size == 0 or y.min() == y.max():
        return NAN, NAN
    # Every point, not only the corners: the best admissible point must not be pruned away.
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    admissible = np.flatnonzero(fpr <= max_fpr)
    # roc_curve starts at (0, 0) with threshold inf, so at least one point is admissible.
    best = admissible[np.argmax(tpr[admissible])]
    return float(tpr[best]), _strict_threshold(float(thresholds[best]), s)


def _strict_threshold(roc_threshold: float, score: np.ndarray) -> float:
    # roc_curve's points block `score >= t`; convert to the product's `score > t`, halfway to
    # the next lower score so that a threshold carried to another split is not on a knife edge.
    if not math.isfinite(roc_threshold):
        return float(score.max())
    lower = score[score < roc_threshold]
    if lower.size == 0:
        return float(np.nextafter(roc_threshold, -np.inf))
    below = float(lower.max())
    mid = (below + roc_threshold) / 2.0
    return mid if below <= mid < roc_threshold else below


def binary_metrics(
    y_true: np.ndarray,
    score: np.ndarray,
    threshold: float,
    sens_true: np.ndarray | None = None,
    sens_pred: np.ndarray | None = None,
    max_fpr: float = DEFAULT_MAX_FPR,
) -> dict[str, Any]:
    """Threshold metrics at `score > threshold`, ranking metrics of `score`, and the
    sensitivity MAE when both sensitivity arrays are given (NaN otherwise; see module doc)."""
    y = np.asarray(y_true).astype(int).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"binary_metrics: y_true has {y.size} rows but score has {s.size}")
    if np.isnan(s).any():
        raise ValueError(
            f"binary_metrics: score has {int(np.isnan(s).sum())} NaN values; "
            "a scorer must give every post a number"
        )
    n, n_pos = int(y.size), int(y.sum())
    out: dict[str, Any] = dict.fromkeys(METRIC_KEYS, NAN)
    out.update(n=n, n_pos=n_pos, tp=0, fp=0, tn=0, fn=0)
    if n == 0:
        return out
    pred = (s > threshold).astype(int)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, pred, labels=[0, 1]).ravel())
    two_classes = 0 < n_pos < n
    out.update(
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        accuracy=float(accuracy_score(y, pred)),
        precision=float(precision_score(y, pred, zero_division=np.nan)),
        recall=float(recall_score(y, pred, zero_division=np.nan)),
        f1=float(f1_score(y, pred, zero_division=np.nan)),
        # sklearn answers 0.0 for one class; undefined is the honest figure there.
        mcc=float(matthews_corrcoef(y, pred)) if two_classes else NAN,
        pr_auc=float(average_precision_score(y, s)) if n_pos > 0 else NAN,
        roc_auc=float(roc_auc_score(y, s)) if two_classes else NAN,
        false_kill_rate=fp / (fp + tn) if (fp + tn) > 0 else NAN,
    )
    out["recall_at_fpr"], out["threshold_at_fpr"] = operating_point(y, s, max_fpr)
    if sens_true is not None and sens_pred is not None:
        st = np.asarray(sens_true, dtype=np.float64).ravel()
        sp = np.asarray(sens_pred, dtype=np.float64).ravel()
        if st.shape != y.shape or sp.shape != y.shape:
            raise ValueError(
                f"binary_metrics: sensitivity arrays have {st.size} and {sp.size} rows, "
                f"expected {n}"
            )
        out["sensitivity_mae"] = float(mean_absolute_error(st, sp))
    return out


def slice_masks(slices: Sequence[str] | np.ndarray, has_text: np.ndarray) -> dict[str, np.ndarray]:
    """Row masks of every report slice: the four post slices plus every post with text."""
    sl = np.asarray(slices).astype(str)
    masks = {name: sl == name for name in SLICES}
    masks[TEXT_POSTS] = np.asarray(has_text, dtype=bool)
    return masks


def per_slice(
    y_true: np.ndarray,
    score: np.ndarray,
    threshold: float,
    slices: Sequence[str] | np.ndarray,
    has_text: np.ndarray,
    sens_true: np.ndarray | None = None,
    sens_pred: np.ndarray | None = None,
    max_fpr: float = DEFAULT_MAX_FPR,
) -> dict[str, dict[str, Any]]:
    """`binary_metrics` on each of `REPORT_SLICES`; an empty slice gives n = 0 and NaNs."""
    y = np.asarray(y_true)
    s = np.asarray(score)
    out = {}
    for name, mask in slice_masks(slices, has_text).items():
        if mask.shape != y.shape:
            raise ValueError(f"per_slice: slice mask has {mask.size} rows, labels have {y.size}")
        out[name] = binary_metrics(
            y[mask],
            s[mask],
            threshold,
            None if sens_true is None else np.asarray(sens_true)[mask],
            None if sens_pred is None else np.asarray(sens_pred)[mask],
            max_fpr=max_fpr,
        )
    return out


def metrics_report(
    y_true: np.ndarray,
    score: np.ndarray,
    threshold: float,
    slices: Sequence[str] | np.ndarray,
    has_text: np.ndarray,
    sens_true: np.ndarray | None = None,
    sens_pred: np.ndarray | None = None,
    max_fpr: float = DEFAULT_MAX_FPR,
) -> dict[str, Any]:
    """`{"threshold", "overall", "slices"}`: one scorer's block in `reports/metrics.json`."""
    return {
        "threshold": float(threshold),
        "overall": binary_metrics(y_true, score, threshold, sens_true, sens_pred, max_fpr),
        "slices": per_slice(
            y_true, score, threshold, slices, has_text, sens_true, sens_pred, max_fpr
        ),
    }


def json_safe(value: Any) -> Any:
    """Plain JSON data: NaN and infinities become None, numpy scalars and arrays Python ones."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return [json_safe(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def format_table(
    rows: Mapping[str, Mapping[str, Any]],
    columns: Sequence[tuple[str, str]],
) -> str:
    """A fixed-width text table: one row per name, `columns` = (header, dotted key into the row).

    A key like `slices.text_posts.recall_at_fpr` walks nested dicts; missing or NaN shows `-`.
    """
    headers = ["model", *(h for h, _ in columns)]
    body = []
    for name, row in rows.items():
        cells = [name]
        for _, key in columns:
            value: Any = row
            for part in key.split("."):
                value = value.get(part) if isinstance(value, Mapping) else None
            cells.append(_cell(value))
        body.append(cells)
    widths = [max(len(r[i]) for r in [headers, *body]) for i in range(len(headers))]
    lines = [
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(headers, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for cells in body:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
        )
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{value:.4f}"
    return str(value)
