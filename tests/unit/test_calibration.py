"""Platt scaling of the ad head: the fit, its guards, and the net carrying it end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import expit

from models.calibration import (
    IDENTITY,
    CalibrationError,
    calibration_report,
    expected_calibration_error,
    fit_platt,
)
from models.net import net_inputs
from models.registry import create_model
from tests.model_fixtures import SMALL_DIMS, synthetic_arrays


def _sample(scale: float, bias: float, n: int = 20000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits z whose true P(ad | z) is sigmoid(scale * z + bias)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, n)
    y = rng.random(n) < expit(scale * z + bias)
    return z, y


def test_recovers_the_scale_and_bias_that_generated_the_labels() -> None:
    z, y = _sample(scale=3.0, bias=-1.0)
    platt = fit_platt(z, y)
    assert platt.scale == pytest.approx(3.0, rel=0.1)
    assert platt.bias == pytest.approx(-1.0, abs=0.15)


def test_under_confident_logits_are_sharpened_and_log_loss_falls() -> None:
    z, y = _sample(scale=4.0, bias=0.0)
    platt = fit_platt(z, y)
    report = calibration_report(z, y, platt)
    assert platt.scale > 2.0
    assert report["log_loss_after"] < report["log_loss_before"]
    assert report["ece_after"] < report["ece_before"]
    assert report["posts"] == z.size and report["ads"] == int(y.sum())


def test_separable_data_gives_a_finite_fit_that_keeps_the_ranking() -> None:
    z = np.concatenate([np.linspace(-3, -1, 50), np.linspace(1, 3, 10)])
    y = np.r_[np.zeros(50, bool), np.ones(10, bool)]
    platt = fit_platt(z, y)
    assert np.isfinite([platt.scale, platt.bias]).all() and platt.scale > 0
    p = expit(platt.apply(z))
    # Smoothed targets: the most confident clean post is not pushed to exactly 0.
    assert p[:50].max() < 0.5 < p[50:].min()
    assert (np.argsort(platt.apply(z)) == np.argsort(z)).all()


@pytest.mark.parametrize(("labels", "message"), [
    (np.zeros(10, bool), "both classes"),
    (np.ones(10, bool), "both classes"),
])
def test_one_class_is_refused(labels: np.ndarray, message: str) -> None:
    with pytest.raises(CalibrationError, match=message):
        fit_platt(np.linspace(-1, 1, 10), labels)


def test_bad_logits_are_refused() -> None:
    with pytest.raises(CalibrationError, match="NaN"):
        fit_platt(np.array([0.0, np.nan, 1.0]), np.array([0, 1, 1]))
    with pytest.raises(CalibrationError, match="3 logits but 2 labels"):
        fit_platt(np.zeros(3), np.array([0, 1]))


def test_ece_is_zero_for_perfectly_calibrated_bins() -> None:
    p = np.r_[np.full(10, 0.05), np.full(10, 0.95)]
    y = np.r_[np.zeros(10), np.ones(10)]
    assert expected_calibration_error(p, y) == pytest.approx(0.05)
    assert expected_calibration_error(np.r_[np.zeros(5), np.ones(5)], np.r_[np.zeros(5), np.ones(5)]) == 0.0


def test_the_net_applies_its_calibration_in_eager_state_dict_and_torchscript() -> None:
    torch.manual_seed(0)
    net = create_model(
        "multimodal", feature_dims=SMALL_DIMS, image_size=32, max_seq_tokens=12, feature_dim=16,
        num_heads=2, dropout=0.0, vision_backbone="test_efficientnet", text_embedding_size=16,
        text_hidden_size=32, text_num_layers=1, text_num_heads=2, text_intermediate_size=64,
    ).eval()
    inputs = net_inputs(synthetic_arrays(6, seed=1, image_size=32, seq_len=12))
    with torch.inference_mode():
        raw, _, raw_score = net(*inputs)
    assert float(net.ad_logit_scale) == IDENTITY.scale and float(net.ad_logit_bias) == IDENTITY.bias

    net.set_calibration(2.5, -0.5)
    with torch.inference_mode():
        logit, sensitivity, score = net(*inputs)
        traced = torch.jit.trace(net, inputs, check_trace=False)
        t_logit, _, t_score = traced(*inputs)
    torch.testing.assert_close(logit, 2.5 * raw - 0.5)
    expected = (net.score_weight_ad * torch.sigmoid(logit)
                + net.score_weight_sensitivity * sensitivity).clamp(0, 1)
    torch.testing.assert_close(score, expected)
    assert not torch.allclose(score, raw_score)
    torch.testing.assert_close(t_logit, logit)
    torch.testing.assert_close(t_score, score)

    state = net.state_dict()
    assert {"ad_logit_scale", "ad_logit_bias"} <= set(state)
    torch.manual_seed(1)
    fresh = create_model(
        "multimodal", feature_dims=SMALL_DIMS, image_size=32, max_seq_tokens=12, feature_dim=16,
        num_heads=2, dropout=0.0, vision_backbone="test_efficientnet", text_embedding_size=16,
        text_hidden_size=32, text_num_layers=1, text_num_heads=2, text_intermediate_size=64,
    ).eval()
    fresh.load_state_dict(state)
    assert float(fresh.ad_logit_scale) == pytest.approx(2.5)
    assert float(fresh.ad_logit_bias) == pytest.approx(-0.5)
