"""Platt scaling of the ad head: `p_ad = sigmoid(scale * raw_logit + bias)`, fitted on val.

Focal loss trains the ad head to stop pushing posts it already gets right, so its
probabilities come out under-confident: an ad the net ranks far above every clean post may
still sit at p_ad = 0.8, below what the deployed score threshold needs. Platt scaling fits the
two numbers that make p_ad a calibrated probability on held-out data, without changing the
ranking (scale > 0). Platt's smoothed targets, `(N+ + 1) / (N+ + 2)` for ads and
`1 / (N- + 2)` for clean posts, keep the fit finite when val is perfectly separated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, log_expit

MIN_SCALE = 1e-3
MAX_SCALE = 100.0


class CalibrationError(ValueError):
    """Data on which Platt scaling cannot be fitted."""


@dataclass(frozen=True)
class Platt:
    scale: float
    bias: float

    def apply(self, logits: np.ndarray) -> np.ndarray:
        return self.scale * np.asarray(logits, dtype=np.float64) + self.bias

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


IDENTITY = Platt(1.0, 0.0)


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    return float(-np.mean(targets * log_expit(logits) + (1 - targets) * log_expit(-logits)))


def fit_platt(logits: np.ndarray, labels: np.ndarray) -> Platt:
    """Scale and bias minimising the log loss against Platt's smoothed targets."""
    z = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if z.size != y.size:
        raise CalibrationError(f"fit_platt: {z.size} logits but {y.size} labels")
    if not np.isfinite(z).all():
        raise CalibrationError("fit_platt: the logits hold NaN or infinity")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise CalibrationError(
            f"fit_platt needs both classes; val holds {n_pos} ads and {n_neg} clean posts"
        )
    t = np.where(y, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = theta
        s = a * z + b
        p = expit(s)
        g = p - t
        return _nll(s, t), np.array([np.mean(g * z), np.mean(g)])

    result = minimize(loss, x0=np.array([1.0, 0.0]), jac=True, method="L-BFGS-B",
                      bounds=[(MIN_SCALE, MAX_SCALE), (None, None)])
    scale, bias = (float(v) for v in result.x)
    return Platt(scale, bias)


def expected_calibration_error(p: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Mean |accuracy - confidence| over equal-width probability bins, weighted by count."""
    p = np.asarray(p, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for k in range(bins):
        mask = which == k
        if mask.any():
            total += mask.sum() * abs(y[mask].mean() - p[mask].mean())
    return float(total / max(p.size, 1))


def calibration_report(logits: np.ndarray, labels: np.ndarray, platt: Platt) -> dict[str, Any]:
    """Log loss and ECE of p_ad before and after scaling, on the data it was fitted on."""
    z = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(np.float64)
    after = platt.apply(z)
    return {
        **platt.to_dict(),
        "posts": int(z.size),
        "ads": int(y.sum()),
        "log_loss_before": round(_nll(z, y), 5),
        "log_loss_after": round(_nll(after, y), 5),
        "ece_before": round(expected_calibration_error(expit(z), y), 5),
        "ece_after": round(expected_calibration_error(expit(after), y), 5),
    }
