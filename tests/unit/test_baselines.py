from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from models.baselines import BASELINES, ImageHsvSiftLr, create_baseline

AD_WORDS = ["free", "win", "prize", "claim", "cash", "call", "txt", "offer", "urgent", "reward"]
CLEAN_WORDS = [
    "lunch",
    "tomorrow",
    "meeting",
    "mum",
    "home",
    "later",
    "sorry",
    "dinner",
    "class",
    "bus",
]
FILLER = ["the", "a", "you", "to", "now", "is", "and", "for", "me", "we"]


def synthetic_posts(n: int, seed: int) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Posts whose text words and image features both carry the label, with overlap and noise."""
    rng = np.random.default_rng(seed)
    label = (rng.random(n) < 0.35).astype(int)
    has_text = rng.random(n) < 0.8
    has_image = ~has_text | (rng.random(n) < 0.4)
    texts = []
    for i in range(n):
        if not has_text[i]:
            texts.append("")
            continue
        own = AD_WORDS if label[i] else CLEAN_WORDS
        other = CLEAN_WORDS if label[i] else AD_WORDS
        words = list(rng.choice(own, 3)) + list(rng.choice(other, 1)) + list(rng.choice(FILLER, 3))
        rng.shuffle(words)
        texts.append(" ".join(words))
    hsv = rng.random((n, 8)).astype(np.float32)
    hsv[:, 0] += 0.8 * label
    sift = rng.random((n, 16)).astype(np.float32)
    sift[:, 3] += 0.6 * label
    qr = ((rng.random(n) < 0.5) & (label == 1)).astype(np.float32)[:, None]
    image = has_image[:, None]
    ids = np.array([f"p{seed}_{i:04d}" for i in range(n)])
    df = pd.DataFrame({"id": ids, "text": texts, "label": label})
    arrays = {
        "id": ids,
        "has_text": has_text,
        "has_image": has_image,
        "hsv": hsv * image,
        "sift_bow": sift * image,
        "qr": qr * image,
    }
    return df, arrays


@pytest.fixture(scope="module")
def data() -> tuple:
    return synthetic_posts(300, seed=1), synthetic_posts(150, seed=2)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_ranks_ads_above_clean_posts(name: str, data: tuple) -> None:
    (train_df, train_arrays), (test_df, test_arrays) = data
    baseline = create_baseline(name, seed=0).fit(train_df, train_arrays)
    score = baseline.score(test_df, test_arrays)
    assert score.shape == (len(test_df),)
    assert np.isfinite(score).all()
    if name.startswith("image"):
        rows = test_arrays["has_image"]
    else:
        rows = test_arrays["has_text"]
    assert roc_auc_score(test_df["label"][rows], score[rows]) > 0.9


@pytest.mark.parametrize("name", ["tfidf_char_svm", "tfidf_word_lr", "fasttext"])
def test_text_baselines_give_posts_without_text_the_empty_string_score(
    name: str, data: tuple
) -> None:
    (train_df, train_arrays), (test_df, test_arrays) = data
    baseline = create_baseline(name).fit(train_df, train_arrays)
    score = baseline.score(test_df, test_arrays)
    empty = baseline.score(pd.DataFrame({"text": [""]}))[0]
    no_text = test_df["text"].eq("").to_numpy()
    assert no_text.any()
    np.testing.assert_allclose(score[no_text], empty)


def test_image_baseline_gives_posts_without_image_the_training_prior(data: tuple) -> None:
    (train_df, train_arrays), (test_df, test_arrays) = data
    baseline = ImageHsvSiftLr().fit(train_df, train_arrays)
    score = baseline.score(test_df, test_arrays)
    no_image = ~test_arrays["has_image"]
    assert no_image.any()
    np.testing.assert_allclose(score[no_image], train_df["label"].mean())
    assert (score[~no_image] >= 0).all() and (score[~no_image] <= 1).all()


def test_fasttext_baseline_is_deterministic(data: tuple) -> None:
    (train_df, _), (test_df, _) = data
    a = create_baseline("fasttext", seed=3).fit(train_df).score(test_df)
    b = create_baseline("fasttext", seed=3).fit(train_df).score(test_df)
    np.testing.assert_array_equal(a, b)


def test_unknown_baseline_names_the_known_ones() -> None:
    with pytest.raises(
        ValueError, match="unknown baseline 'bert'.*tfidf_char_svm.*image_hsv_sift_lr"
    ):
        create_baseline("bert")


def test_image_baseline_rejects_arrays_of_another_split(data: tuple) -> None:
    (train_df, train_arrays), (test_df, test_arrays) = data
    baseline = ImageHsvSiftLr().fit(train_df, train_arrays)
    with pytest.raises(ValueError, match="300 rows but the posts table has 150"):
        baseline.score(test_df, train_arrays)
    shuffled = {**test_arrays, "id": test_arrays["id"][::-1]}
    with pytest.raises(ValueError, match="ids differ"):
        baseline.score(test_df, shuffled)


def test_one_class_train_split_fails_with_a_clear_message(data: tuple) -> None:
    (train_df, _), _ = data
    with pytest.raises(ValueError, match="only label 0"):
        create_baseline("tfidf_word_lr").fit(train_df[train_df["label"] == 0])
