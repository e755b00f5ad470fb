"""Baselines the multimodal net is measured against, all fitted and scored on the same split.

The three text baselines are what an engineer builds in an afternoon on the raw text (no
normalisation, library defaults apart from the n-gram ranges): TF-IDF char 2-5 grams with a
linear SVM, TF-IDF word 1-2 grams with logistic regression, and fastText. The image baseline is
logistic regression on the handcrafted image features of `data/features/*.npz`.

Every baseline has `fit(train_df, train_arrays)` and `score(df, arrays)`; a higher score means
more likely an ad. Scores are on each model's own scale (SVM margins, probabilities), so
`tasks.evaluate` gives each baseline its deployed threshold from the validation split (the
threshold that keeps FPR <= `evaluate.baseline_val_fpr` there), not the net's `model.threshold`.
Posts without text get the text baselines' score of the empty string; posts without an image
get the image baseline's training prior.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from models.gate import fasttext_p_ad, train_fasttext

log = logging.getLogger(__name__)

Arrays = Mapping[str, np.ndarray]

IMAGE_FEATURES = ("hsv", "sift_bow", "qr")


class Baseline(abc.ABC):
    """`fit` on the train split, then `score` any split; a higher score = more likely an ad."""

    name: ClassVar[str]

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    @abc.abstractmethod
    def fit(self, train_df: pd.DataFrame, train_arrays: Arrays | None = None) -> Baseline: ...

    @abc.abstractmethod
    def score(self, df: pd.DataFrame, arrays: Arrays | None = None) -> np.ndarray: ...


def _texts(df: pd.DataFrame, who: str) -> list[str]:
    if "text" not in df.columns:
        raise ValueError(
            f"{who}: the posts table has no 'text' column (columns: {list(df.columns)})"
        )
    return df["text"].fillna("").astype(str).tolist()


def _labels(df: pd.DataFrame, who: str) -> np.ndarray:
    if "label" not in df.columns:
        raise ValueError(f"{who}: the train table has no 'label' column")
    y = df["label"].to_numpy().astype(int)
    if np.unique(y).size < 2:
        raise ValueError(
            f"{who}: the train split holds only label {int(y[0]) if y.size else 'none'}; "
            "a baseline needs both ads and clean posts to fit"
        )
    return y


class _SklearnTextBaseline(Baseline):
    @abc.abstractmethod
    def _pipeline(self) -> Pipeline: ...

    def fit(self, train_df: pd.DataFrame, train_arrays: Arrays | None = None) -> Baseline:
        self.model = self._pipeline().fit(_texts(train_df, self.name), _labels(train_df, self.name))
        return self

    def score(self, df: pd.DataFrame, arrays: Arrays | None = None) -> np.ndarray:
        return np.asarray(self.model.decision_function(_texts(df, self.name)), dtype=np.float64)


class TfidfCharSvm(_SklearnTextBaseline):
    """TF-IDF over character 2-5 grams + LinearSVC; the score is the SVM margin."""

    name = "tfidf_char_svm"

    def _pipeline(self) -> Pipeline:
        return make_pipeline(
            TfidfVectorizer(analyzer="char", ngram_range=(2, 5)),
            LinearSVC(random_state=self.seed),
        )


class TfidfWordLr(_SklearnTextBaseline):
    """TF-IDF over word 1-2 grams + logistic regression; the score is the log-odds.

    C=10 and sublinear tf: the first settings anyone tries when sklearn's C=1 underfits short
    texts (C=1 blocks few ads at p > 0.5); they give the reference figures on the SMS corpus.
    liblinear, because lbfgs takes ~25x longer here for the same model.
    """

    name = "tfidf_word_lr"

    def _pipeline(self) -> Pipeline:
        return make_pipeline(
            TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
            LogisticRegression(C=10.0, solver="liblinear", random_state=self.seed),
        )


class FastTextBaseline(Baseline):
    """fastText supervised (wordNgrams=2, minn=2, maxn=5, 25 epochs); the score is P(ad).

    One thread, so that a rerun on the same split gives the same figures. 200k hash buckets
    instead of fastText's 2M: the model is trained in a child process and read back from disk
    (see `models.gate.train_fasttext`), and 2M x 100 floats is an 800 MB file, for
    figures within a point on the SMS corpus.
    """

    name = "fasttext"
    options: ClassVar[dict[str, Any]] = {
        "wordNgrams": 2,
        "minn": 2,
        "maxn": 5,
        "epoch": 25,
        "bucket": 200_000,
    }

    def fit(self, train_df: pd.DataFrame, train_arrays: Arrays | None = None) -> Baseline:
        self.model = train_fasttext(
            _texts(train_df, self.name),
            _labels(train_df, self.name),
            thread=1,
            seed=self.seed,
            **self.options,
        )
        return self

    def score(self, df: pd.DataFrame, arrays: Arrays | None = None) -> np.ndarray:
        return fasttext_p_ad(self.model, _texts(df, self.name))


class ImageHsvSiftLr(Baseline):
    """Logistic regression on the npz `hsv` + `sift_bow` + `qr` image features; the score is P(ad)."""

    name = "image_hsv_sift_lr"

    def _features(self, df: pd.DataFrame, arrays: Arrays | None) -> tuple[np.ndarray, np.ndarray]:
        if arrays is None:
            raise ValueError(
                f"{self.name}: needs the featurized arrays (data/features/<split>.npz)"
            )
        missing = [k for k in (*IMAGE_FEATURES, "has_image") if k not in arrays]
        if missing:
            raise ValueError(
                f"{self.name}: the feature arrays lack {missing}; rerun the featurize stage "
                "(dvc repro featurize)"
            )
        has_image = np.asarray(arrays["has_image"], dtype=bool)
        if has_image.shape[0] != len(df):
            raise ValueError(
                f"{self.name}: the feature arrays have {has_image.shape[0]} rows but the posts "
                f"table has {len(df)}; they must be the same split, row by row"
            )
        if "id" in arrays and "id" in df.columns:
            ids = np.asarray(arrays["id"]).astype(str)
            if not np.array_equal(ids, df["id"].astype(str).to_numpy()):
                raise ValueError(
                    f"{self.name}: the feature arrays' ids differ from the posts table's; "
                    "rerun the featurize stage on this split"
                )
        x = np.hstack(
            [np.asarray(arrays[k], dtype=np.float64).reshape(len(df), -1) for k in IMAGE_FEATURES]
        )
        return x, has_image

    def fit(self, train_df: pd.DataFrame, train_arrays: Arrays | None = None) -> Baseline:
        x, has_image = self._features(train_df, train_arrays)
        y = train_df["label"].to_numpy().astype(int)
        self.prior = float(y.mean()) if y.size else 0.0
        if np.unique(y[has_image]).size < 2:
            raise ValueError(
                f"{self.name}: the train posts with an image hold a single class "
                f"({int(has_image.sum())} posts); an image baseline needs both"
            )
        self.model = make_pipeline(
            StandardScaler(), LogisticRegression(max_iter=2000, random_state=self.seed)
        ).fit(x[has_image], y[has_image])
        return self

    def score(self, df: pd.DataFrame, arrays: Arrays | None = None) -> np.ndarray:
        x, has_image = self._features(df, arrays)
        out = np.full(len(df), self.prior, dtype=np.float64)
        if has_image.any():
            out[has_image] = self.model.predict_proba(x[has_image])[:, 1]
        return out


BASELINES: dict[str, type[Baseline]] = {
    cls.name: cls for cls in (TfidfCharSvm, TfidfWordLr, FastTextBaseline, ImageHsvSiftLr)
}


def create_baseline(name: str, seed: int = 0) -> Baseline:
    """The baseline registered as `name`; an unknown name fails with the known ones."""
    try:
        cls = BASELINES[name]
    except KeyError:
        raise ValueError(
            f"unknown baseline '{name}' (params.yaml evaluate.baselines); "
            f"known baselines: {', '.join(BASELINES)}"
        ) from None
    return cls(seed=seed)
