"""Exact group-level SHAP values: checked against models whose Shapley values are known."""

from __future__ import annotations

import numpy as np
import pytest

from adfilter.monitoring.groups import (
    GROUP_INPUT,
    GROUPS,
    ExplainError,
    GroupExplainer,
    available_groups,
    make_background,
)

WIDTHS = {"tfidf": 6, "sent_emb": 5, "sift_bow": 4, "hsv": 3, "qr": 1}


def _posts(n: int = 30, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    kind = np.arange(n) % 3
    has_text, has_image = kind != 1, kind != 0
    out: dict[str, np.ndarray] = {"has_text": has_text, "has_image": has_image}
    for block, width in WIDTHS.items():
        present = has_text if block in ("tfidf", "sent_emb") else has_image
        out[block] = np.where(present[:, None], rng.normal(0, 1, (n, width)), 0).astype(np.float32)
    out["qr"] = (out["qr"] > 0.5).astype(np.float32)
    out["token_ids"] = np.where(has_text[:, None], rng.integers(1, 500, (n, 8)), 0).astype(np.int32)
    out["image_small"] = np.where(has_image[:, None, None, None],
                                  rng.integers(0, 256, (n, 4, 4, 3)), 0).astype(np.uint8)
    return out


W = {k: np.random.default_rng(7).normal(0, 1, v) for k, v in WIDTHS.items()}


def _group_term(arrays: dict[str, np.ndarray], key: str) -> np.ndarray:
    if key == "token_ids":
        return arrays["token_ids"].astype(np.float64).mean(axis=1) / 100.0
    if key == "image_small":
        return arrays["image_small"].astype(np.float64).mean(axis=(1, 2, 3)) / 64.0
    return arrays[key].astype(np.float64) @ W[key]


def additive_model(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """A sum of one term per group, each counted only when its modality is there (as the net
    masks a missing modality)."""
    out = np.zeros(len(arrays["has_text"]))
    for group in GROUPS:
        key = GROUP_INPUT[group]
        modality = arrays["has_text"] if group in ("text_branch", "tfidf", "sent_emb") else arrays["has_image"]
        out += np.where(modality, _group_term(arrays, key), 0.0)
    return out


def test_additive_model_gets_each_groups_own_term() -> None:
    posts = _posts()
    background = make_background(posts, np.array([101, 102]))
    exp = GroupExplainer(additive_model, background).explain(posts)
    bg = {k: v[None] for k, v in background.items()}
    for j, group in enumerate(GROUPS):
        key = GROUP_INPUT[group]
        modality = posts["has_text"] if group in ("text_branch", "tfidf", "sent_emb") else posts["has_image"]
        expected = np.where(modality, _group_term(posts, key) - _group_term(bg, key)[0], 0.0)
        np.testing.assert_allclose(exp.values[:, j], expected, atol=1e-9, err_msg=group)
    np.testing.assert_allclose(exp.base + exp.values.sum(axis=1), additive_model(posts), atol=1e-9)
    np.testing.assert_allclose(exp.output, additive_model(posts), atol=1e-9)


def test_groups_of_a_missing_modality_are_exactly_zero() -> None:
    posts = _posts()
    exp = GroupExplainer(additive_model, make_background(posts)).explain(posts)
    image_cols = [GROUPS.index(g) for g in ("image_branch", "sift_bow", "hsv", "qr")]
    text_cols = [GROUPS.index(g) for g in ("text_branch", "tfidf", "sent_emb")]
    assert np.all(exp.values[~posts["has_image"]][:, image_cols] == 0.0)
    assert np.all(exp.values[~posts["has_text"]][:, text_cols] == 0.0)
    # A text-only post costs 2^3 evaluations, not 2^7 (plus shap's few extra rows).
    assert exp.evaluations < 30 * 2**7 / 2


def test_an_interaction_is_shared_equally() -> None:
    posts = _posts()

    def product(arrays: dict[str, np.ndarray]) -> np.ndarray:
        return (arrays["tfidf"][:, 0].astype(np.float64) * arrays["sift_bow"][:, 0]
                * arrays["has_text"] * arrays["has_image"])

    background = make_background(posts)
    background["tfidf"][:] = 0.0
    background["sift_bow"][:] = 0.0
    exp = GroupExplainer(product, background).explain(posts)
    both = posts["has_text"] & posts["has_image"]
    half = 0.5 * posts["tfidf"][both, 0] * posts["sift_bow"][both, 0]
    np.testing.assert_allclose(exp.values[both, GROUPS.index("tfidf")], half, atol=1e-6)
    np.testing.assert_allclose(exp.values[both, GROUPS.index("sift_bow")], half, atol=1e-6)


def test_a_group_left_out_stays_at_its_background() -> None:
    posts = _posts()
    background = make_background(posts)
    groups = [g for g in GROUPS if g != "image_branch"]
    stored = {k: v for k, v in posts.items() if k != "image_small"}  # as with store_image_small off
    assert available_groups(stored) == groups
    exp = GroupExplainer(additive_model, background, groups).explain(stored)
    assert exp.values.shape == (30, len(groups))
    # The image term is fixed at the background image for every coalition, so it cancels.
    with_bg = {**stored, "image_small": np.broadcast_to(background["image_small"], posts["image_small"].shape)}
    np.testing.assert_allclose(exp.output, additive_model(with_bg), atol=1e-9)


def test_background_is_the_reference_mean_and_an_empty_text() -> None:
    posts = _posts()
    bg = make_background(posts, np.array([101, 102]))
    np.testing.assert_allclose(bg["tfidf"], posts["tfidf"][posts["has_text"]].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(bg["hsv"], posts["hsv"][posts["has_image"]].mean(axis=0), rtol=1e-6)
    assert bg["token_ids"].tolist() == [101, 102, 0, 0, 0, 0, 0, 0]
    assert bg["image_small"].dtype == np.uint8 and bg["image_small"].shape == (4, 4, 3)
    assert len(np.unique(bg["image_small"].reshape(-1, 3), axis=0)) == 1  # one plain colour


def test_missing_inputs_are_named() -> None:
    posts = _posts()
    explainer = GroupExplainer(additive_model, make_background(posts))
    with pytest.raises(ExplainError, match="sift_bow"):
        explainer.explain({k: v for k, v in posts.items() if k != "sift_bow"})
    with pytest.raises(ExplainError, match="unknown feature group"):
        GroupExplainer(additive_model, make_background(posts), ["colour"])



def test_reference_baselines_give_interventional_values() -> None:
    posts = _posts(n=30, seed=1)
    reference = _posts(n=60, seed=2)
    background = make_background(reference)
    exp = GroupExplainer(additive_model, background, baselines=reference, draws=3, seed=5).explain(posts)
    assert exp.baselines.shape == (30, 3)
    # Each post is compared with reference posts of its own kind.
    for i, rows in enumerate(exp.baselines):
        assert (reference["has_text"][rows] == posts["has_text"][i]).all()
        assert (reference["has_image"][rows] == posts["has_image"][i]).all()
    # For an additive model each group's value is its own term minus the baselines' mean term.
    for j, group in enumerate(GROUPS):
        key = GROUP_INPUT[group]
        modality = posts["has_text"] if group in ("text_branch", "tfidf", "sent_emb") else posts["has_image"]
        own = _group_term(posts, key)
        drawn = np.stack([_group_term({key: reference[key][exp.baselines[:, d]]}, key) for d in range(3)], axis=1)
        expected = np.where(modality, own - drawn.mean(axis=1), 0.0)
        np.testing.assert_allclose(exp.values[:, j], expected, atol=1e-9, err_msg=group)
    np.testing.assert_allclose(exp.base + exp.values.sum(axis=1), additive_model(posts), atol=1e-9)
    # The base value is the baselines' own output, not the output on an average row.
    baseline_out = additive_model({k: v[exp.baselines[:, 0]] for k, v in reference.items()})
    assert not np.allclose(exp.base, exp.base[0])
    assert np.corrcoef(exp.base, baseline_out)[0, 1] > 0.3


def test_the_same_seed_draws_the_same_baselines() -> None:
    posts, reference = _posts(n=12, seed=1), _posts(n=40, seed=2)
    a = GroupExplainer(additive_model, make_background(reference), baselines=reference, seed=3).explain(posts)
    b = GroupExplainer(additive_model, make_background(reference), baselines=reference, seed=3).explain(posts)
    assert np.array_equal(a.baselines, b.baselines) and np.array_equal(a.values, b.values)


def _interacting(arrays: dict[str, np.ndarray]) -> np.ndarray:
    t = {g: _group_term(arrays, GROUP_INPUT[g]) for g in GROUPS}
    both = arrays["has_text"] & arrays["has_image"]
    return np.tanh(t["tfidf"] * t["sift_bow"] * both + t["sent_emb"] * arrays["has_text"]
                   - (t["hsv"] ** 2 - t["image_branch"] * t["text_branch"]) * both)


def test_permutation_sampling_is_exact_for_an_additive_model_and_cheaper() -> None:
    posts = _posts()
    background = make_background(posts)
    exact = GroupExplainer(additive_model, background).explain(posts)
    sampled = GroupExplainer(additive_model, background, max_exact_groups=4, permutations=4).explain(posts)
    np.testing.assert_allclose(sampled.values, exact.values, atol=1e-9)
    assert sampled.evaluations < exact.evaluations / 2
    both = int((posts["has_text"] & posts["has_image"]).sum())
    assert sampled.evaluations <= exact.evaluations - both * (2**7 - (2 + 4 * 6))


def test_permutation_sampling_converges_and_keeps_additivity() -> None:
    posts = _posts(n=12, seed=4)
    background = make_background(posts)
    exact = GroupExplainer(_interacting, background).explain(posts)
    few = GroupExplainer(_interacting, background, max_exact_groups=4, permutations=4, seed=1).explain(posts)
    many = GroupExplainer(_interacting, background, max_exact_groups=4, permutations=400, seed=1).explain(posts)
    # Every sampled order adds up to output - base, so the estimate does too.
    np.testing.assert_allclose(few.base + few.values.sum(axis=1), _interacting(posts), atol=1e-9)
    err_few = np.abs(few.values - exact.values).mean()
    err_many = np.abs(many.values - exact.values).mean()
    assert err_many < err_few and err_many < 0.01
