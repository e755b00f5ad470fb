"""The shift measure: total variation distance between importance distributions, its bootstrap
noise, and the samples that stand for all traffic."""

from __future__ import annotations

import numpy as np
import pytest

from adfilter.monitoring.shift import (
    bootstrap_shift,
    bootstrap_shift_by_kind,
    importance_distribution,
    post_kinds,
    representative_sample,
    stratified_sample,
    total_variation,
)


def _shap(n: int, scale: np.ndarray, seed: int) -> np.ndarray:
    """SHAP-like values: signed, heavy-ish tailed, mean |value| proportional to `scale`."""
    rng = np.random.default_rng(seed)
    return rng.laplace(0.0, 1.0, (n, len(scale))) * scale


def test_identical_distributions_have_no_shift() -> None:
    p = np.array([0.5, 0.3, 0.2])
    assert total_variation(p, p) == 0.0
    assert total_variation(p, p.copy()) == pytest.approx(0.0, abs=1e-12)


def test_disjoint_distributions_have_shift_one() -> None:
    assert total_variation(np.array([0.6, 0.4, 0.0, 0.0]), np.array([0.0, 0.0, 0.3, 0.7])) == pytest.approx(1.0)


def test_total_variation_is_half_the_l1_distance_and_symmetric() -> None:
    p, q = np.array([0.7, 0.2, 0.1]), np.array([0.4, 0.4, 0.2])
    assert total_variation(p, q) == pytest.approx(0.3)
    assert total_variation(q, p) == total_variation(p, q)
    with pytest.raises(ValueError, match="different groups"):
        total_variation(p, q[:2])


def test_importance_distribution_is_normalised_mean_abs_shap() -> None:
    values = np.array([[1.0, -3.0], [-1.0, 1.0]])
    assert importance_distribution(values).tolist() == pytest.approx([1 / 3, 2 / 3])
    # Weights count a row several times.
    assert importance_distribution(values, np.array([3.0, 1.0])).tolist() == pytest.approx([2 / 7, 5 / 7])
    # No attribution at all: uniform, never a division by zero.
    assert importance_distribution(np.zeros((4, 4))).tolist() == [0.25] * 4


def test_bootstrap_on_the_same_distribution_stays_below_the_threshold() -> None:
    scale = np.array([0.4, 0.25, 0.2, 0.1, 0.05])
    est = bootstrap_shift(_shap(300, scale, 1), _shap(800, scale, 2), resamples=200, seed=0)
    assert est.shift < 0.05
    assert 0.0 < est.noise < 0.05
    assert est.low <= est.shift + est.noise
    # The null (reference against itself at the window's size) is of the same order.
    assert est.null_p95 < 0.08
    assert est.window_posts == 300 and est.reference_posts == 800


def test_bootstrap_separates_a_real_shift_from_noise() -> None:
    before = np.array([0.4, 0.25, 0.2, 0.1, 0.05])
    after = np.array([0.15, 0.25, 0.2, 0.3, 0.1])  # expected TVD: 0.25 + 0.05 = 0.3
    est = bootstrap_shift(_shap(300, after, 3), _shap(800, before, 4), resamples=200, seed=0)
    expected = total_variation(after / after.sum(), before / before.sum())
    assert est.shift == pytest.approx(expected, abs=0.05)
    assert est.low > est.null_p95
    assert est.shift > 0.15


def test_bootstrap_noise_shrinks_with_the_window() -> None:
    scale = np.array([0.5, 0.3, 0.2])
    ref = _shap(1000, scale, 9)
    small = bootstrap_shift(_shap(50, scale, 5), ref, resamples=150, seed=0)
    large = bootstrap_shift(_shap(1000, scale, 6), ref, resamples=150, seed=0)
    assert large.noise < small.noise
    assert large.null_p95 < small.null_p95


def test_stratified_sample_stands_for_all_traffic() -> None:
    # 1000 posts the deep model scored (weight 1) and 50 gate posts sampled at 5% (weight 20):
    # together they stand for 2000 posts, half of them gate posts.
    weights = np.r_[np.ones(1000), np.full(50, 20.0)]
    rows, w, strata = stratified_sample(weights, 200, seed=0)
    assert len(rows) == 200 and len(np.unique(rows)) == 200
    assert w.sum() == pytest.approx(2000.0)
    gate = rows >= 1000
    assert gate.sum() == 50  # the scarce stratum gives all it has ...
    assert w[gate].sum() == pytest.approx(1000.0)  # ... and keeps its true weight
    # A weighted mean over the drawn rows estimates the mean over all traffic.
    value = np.r_[np.zeros(1000), np.ones(50)]
    assert float((w * value[rows]).sum() / w.sum()) == pytest.approx(0.5)
    assert set(strata.tolist()) == {0, 1}


def test_stratified_sample_takes_everything_when_the_budget_is_large() -> None:
    rows, w, _ = stratified_sample(np.ones(30), 100, seed=0)
    assert sorted(rows.tolist()) == list(range(30))
    assert w.tolist() == [1.0] * 30


def test_representative_sample_keeps_the_mix_without_duplicates() -> None:
    weights = np.r_[np.ones(1000), np.full(50, 20.0)]
    rows = representative_sample(weights, seed=0)
    assert len(np.unique(rows)) == len(rows)
    gate = (rows >= 1000).sum()
    assert gate == 50 and (len(rows) - gate) == 50  # half the traffic each, as the weights say


def test_signed_cells_keep_the_mass_and_refine_the_groups() -> None:
    from adfilter.monitoring.shift import attribution_cells, cell_names

    values = np.array([[0.3, -0.2], [-0.1, 0.4]])
    cells = attribution_cells(values, "signed")
    assert cells.tolist() == [[0.3, 0.0, 0.0, 0.2], [0.0, 0.4, 0.1, 0.0]]
    assert cells.sum() == pytest.approx(np.abs(values).sum())
    assert cell_names(["tfidf", "qr"]) == ["tfidf:ad", "qr:ad", "tfidf:clean", "qr:clean"]
    assert attribution_cells(values, "abs").tolist() == np.abs(values).tolist()
    with pytest.raises(ValueError, match="known: signed, abs"):
        attribution_cells(values, "squared")


def test_signed_measure_sees_attribution_change_direction() -> None:
    from adfilter.monitoring.shift import attribution_cells

    rng = np.random.default_rng(0)
    # Reference: ads (a quarter) get strong positive evidence from group 0, clean posts weak
    # negative evidence from groups 0 and 1. Window: the ads look clean to the model now.
    ads = np.c_[rng.uniform(0.5, 0.7, 250), rng.uniform(-0.1, 0.1, 250)]
    clean = -np.abs(rng.normal(0.1, 0.02, (750, 2)))
    missed = -np.abs(rng.normal(0.5, 0.05, (250, 2))) * [1.0, 0.2]
    ref, win = np.r_[ads, clean], np.r_[missed, clean]
    abs_shift = bootstrap_shift(attribution_cells(win, "abs"), attribution_cells(ref, "abs"), 50).shift
    signed = bootstrap_shift(attribution_cells(win, "signed"), attribution_cells(ref, "signed"), 50)
    assert signed.shift >= abs_shift  # a refinement never sees less
    assert abs_shift < 0.15 < signed.shift


def _kinds_world(n_text: int, n_image: int, seed: int, image_scale: np.ndarray | None = None):
    """SHAP values of text-only posts (importance on groups 0-1) and image-only posts (groups
    2-3), with their kinds."""
    text = _shap(n_text, np.array([1.0, 0.5, 0.0, 0.0]), seed)
    image = _shap(n_image, image_scale if image_scale is not None else np.array([0.0, 0.0, 0.8, 0.4]),
                  seed + 1)
    kinds = post_kinds(np.r_[np.ones(n_text), np.zeros(n_image)], np.r_[np.zeros(n_text), np.ones(n_image)])
    return np.concatenate([text, image]), kinds


def test_post_kinds_names_the_three_kinds() -> None:
    assert post_kinds(np.array([1, 0, 1]), np.array([0, 1, 1])).tolist() == [1, 2, 3]


def test_by_kind_ignores_a_change_of_traffic_mix_that_moves_the_pooled_distance() -> None:
    ref, ref_kinds = _kinds_world(600, 600, seed=0)
    # Same per-kind behaviour, but three times as many text posts as image posts.
    win, win_kinds = _kinds_world(450, 150, seed=10)
    pooled = bootstrap_shift(win, ref, resamples=100, seed=0)
    by_kind, detail = bootstrap_shift_by_kind(win, ref, win_kinds, ref_kinds, resamples=100, seed=0)
    assert pooled.shift > 0.15 > 0.06 > by_kind.shift
    assert by_kind.shift <= by_kind.null_p95 * 1.5
    assert detail["text_only"]["share"] == pytest.approx(0.75)
    assert detail["image_only"]["reference_posts"] == 600


def test_by_kind_weighs_a_change_in_one_kind_by_its_share() -> None:
    ref, ref_kinds = _kinds_world(800, 800, seed=1)
    # Image posts now lean on group 3 instead of group 2: a large change within that kind.
    win, win_kinds = _kinds_world(300, 300, seed=20, image_scale=np.array([0.0, 0.0, 0.2, 1.0]))
    est, detail = bootstrap_shift_by_kind(win, ref, win_kinds, ref_kinds, resamples=100, seed=0)
    image_tv = detail["image_only"]["shift"]
    assert image_tv > 0.3 and detail["text_only"]["shift"] < 0.1
    assert est.shift == pytest.approx(0.5 * image_tv + 0.5 * detail["text_only"]["shift"], abs=1e-6)
    assert est.low <= est.shift <= est.high and est.null_p95 < est.shift
    # Weights scale a kind's share: the same posts, image posts weighing three times as much.
    weights = np.where(win_kinds == 2, 3.0, 1.0)
    heavy, _ = bootstrap_shift_by_kind(win, ref, win_kinds, ref_kinds, resamples=0,
                                       window_weights=weights)
    assert heavy.shift == pytest.approx(0.75 * image_tv + 0.25 * detail["text_only"]["shift"], abs=1e-6)


def test_by_kind_leaves_out_kinds_the_reference_lacks_and_refuses_no_overlap() -> None:
    ref, ref_kinds = _kinds_world(300, 0, seed=2)
    win, win_kinds = _kinds_world(100, 100, seed=3)
    est, detail = bootstrap_shift_by_kind(win, ref, win_kinds, ref_kinds, resamples=20)
    assert detail["image_only"] == {"window_posts": 100, "reference_posts": 0}
    assert est.window_posts == 100
    with pytest.raises(ValueError, match="no kind of post in common"):
        bootstrap_shift_by_kind(win[100:], ref, win_kinds[100:], ref_kinds, resamples=0)
