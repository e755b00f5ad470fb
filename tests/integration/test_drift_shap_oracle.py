"""Our exact group-level Shapley values against shap's own ExactExplainer (the reference
implementation; it compiles numba kernels on first use, so this runs with the integration tests)."""

from __future__ import annotations

import numpy as np
import pytest

from adfilter.monitoring.groups import GROUP_INPUT, GROUPS, GroupExplainer, make_background

WIDTHS = {"tfidf": 6, "sent_emb": 5, "sift_bow": 4, "hsv": 3, "qr": 1}
W = {k: np.random.default_rng(7).normal(0, 1, v) for k, v in WIDTHS.items()}


def _posts(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    kind = np.arange(n) % 3
    has_text, has_image = kind != 1, kind != 0
    out: dict[str, np.ndarray] = {"has_text": has_text, "has_image": has_image}
    for block, width in WIDTHS.items():
        present = has_text if block in ("tfidf", "sent_emb") else has_image
        out[block] = np.where(present[:, None], rng.normal(0, 1, (n, width)), 0).astype(np.float32)
    out["token_ids"] = np.where(has_text[:, None], rng.integers(1, 500, (n, 8)), 0).astype(np.int32)
    out["image_small"] = np.where(has_image[:, None, None, None],
                                  rng.integers(0, 256, (n, 4, 4, 3)), 0).astype(np.uint8)
    return out


def _group_term(arrays: dict[str, np.ndarray], key: str) -> np.ndarray:
    if key == "token_ids":
        return arrays["token_ids"].astype(np.float64).mean(axis=1) / 100.0
    if key == "image_small":
        return arrays["image_small"].astype(np.float64).mean(axis=(1, 2, 3)) / 64.0
    return arrays[key].astype(np.float64) @ W[key]

pytestmark = pytest.mark.integration


def test_agrees_with_shaps_exact_explainer_on_a_nonlinear_model() -> None:
    import shap

    posts = _posts(n=9, seed=3)
    background = make_background(posts, np.array([101, 102]))

    def nonlinear(arrays: dict[str, np.ndarray]) -> np.ndarray:
        terms = {g: np.where(arrays["has_text"] if g in ("text_branch", "tfidf", "sent_emb")
                             else arrays["has_image"], _group_term(arrays, GROUP_INPUT[g]), 0.0)
                 for g in GROUPS}
        return np.tanh(terms["tfidf"] * terms["sift_bow"] + terms["sent_emb"] - terms["hsv"] ** 2
                       + terms["text_branch"] * terms["image_branch"] + 2 * terms["qr"])

    ours = GroupExplainer(nonlinear, background, batch_size=50).explain(posts)
    both = np.flatnonzero(posts["has_text"] & posts["has_image"])
    sub = {k: v[both] for k, v in posts.items()}

    # shap's reference implementation on the same game: a row holds the post's index in every
    # group column, -1 (the background) where a group is hidden.
    def game(z: np.ndarray) -> np.ndarray:
        batch = {}
        for j, group in enumerate(GROUPS):
            key = GROUP_INPUT[group]
            own = (z[:, j] >= 0).reshape((len(z),) + (1,) * background[key].ndim)
            batch[key] = np.where(own, sub[key][np.maximum(z[:, j], 0).astype(int)], background[key][None])
        batch["has_text"] = np.ones(len(z), bool)
        batch["has_image"] = np.ones(len(z), bool)
        return nonlinear(batch)

    explainer = shap.explainers.Exact(game, shap.maskers.Independent(np.full((1, 7), -1.0), max_samples=1))
    theirs = explainer(np.repeat(np.arange(len(both), dtype=float)[:, None], 7, axis=1), silent=True)
    np.testing.assert_allclose(ours.values[both], theirs.values, atol=1e-9)
    np.testing.assert_allclose(ours.base[both], theirs.base_values, atol=1e-9)
