"""`FeaturePipeline`: every feature of a post, fitted on train only, identical in batch and online.

`transform` (a table of posts, images read from disk) and `featurize_posts` (texts and
decoded images, the serving path) run the same private `_featurize`; the batch path only adds
reading the images and the id/label/sensitivity/slice columns.

Saved layout (`save(dir)` / `load(dir)`):

    dir/meta.json      params, seed, embedder (params value + resolved folder), feature_dims,
                       library versions, and whatever the caller adds (data version, ...)
    dir/text.joblib    fitted TF-IDF vectorisers + TruncatedSVD (absent: no training text)
    dir/image.joblib   fitted k-means visual vocabulary (absent: no training image)

The sentence model is not copied: it is reloaded from its recorded place (`bundled` resolves
again on the loading machine, so a moved virtualenv still works).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final

import joblib
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from adfilter.config import FeaturizeParams, ImageFeatureParams, TextFeatureParams
from adfilter.features.image import ImageFeaturizer
from adfilter.features.text import (
    BUNDLED,
    SentenceEncoder,
    TextFeaturizer,
    normalize_text,
    tfidf_width,
)
from adfilter.imageio import ImageError, ImageLimits, read_image
from adfilter.schema import COLUMNS, HIDDEN_IMAGE_AD

log = logging.getLogger(__name__)

FORMAT_VERSION: Final = 2  # 2: margin columns in the tfidf block
META_FILE: Final = "meta.json"
TEXT_FILE: Final = "text.joblib"
IMAGE_FILE: Final = "image.joblib"
DEFAULT_LIMITS: Final = ImageLimits()

# The arrays `featurize_posts` returns, and (plus ROW_ARRAYS) what `transform` returns.
FEATURE_ARRAYS: Final = (
    "has_text",
    "has_image",
    "tfidf",
    "sent_emb",
    "sift_bow",
    "hsv",
    "qr",
    "token_ids",
    "image_small",
)
ROW_ARRAYS: Final = ("id", "label", "sensitivity", "slice")
# Dense float blocks, each of shape (N, feature_dims[name]): what the net projects.
VECTOR_FEATURES: Final = ("tfidf", "sent_emb", "sift_bow", "hsv", "qr")


class FeatureError(RuntimeError):
    """A post that cannot be featurized (for example an image that no longer reads)."""


class FeaturePipeline:
    """Text + image features of posts. Build with `FeaturePipeline.fit(train_df, params)`
    (a classmethod), or `FeaturePipeline.load(dir)`; never fitted on anything but train."""

    def __init__(
        self,
        params: FeaturizeParams,
        seed: int,
        text: TextFeaturizer | None,
        image: ImageFeaturizer,
        encoder: SentenceEncoder,
        embedding_dim: int,
        token_vocab_size: int,
    ) -> None:
        self.params = params
        self.seed = seed
        self.text = text
        self.image = image
        self.encoder = encoder
        self.embedding_dim = embedding_dim
        self.token_vocab_size = token_vocab_size

    # ------------------------------------------------------------------ fitting

    @classmethod
    def fit(
        cls,
        train_df: pd.DataFrame,
        params: FeaturizeParams,
        seed: int = 0,
        image_root: str | Path = ".",
        limits: ImageLimits = DEFAULT_LIMITS,
    ) -> FeaturePipeline:
        """Fit the TF-IDF/SVD on the training texts and the visual vocabulary on the training
        images. `train_df` has the post columns; image paths are relative to `image_root`."""
        _check_columns(train_df, "train")
        norm = [normalize_text(t) for t in _texts(train_df)]
        with_text = [i for i, t in enumerate(norm) if t]
        train_texts = [norm[i] for i in with_text]
        if train_texts:
            text = TextFeaturizer.fit(train_texts, params.text, seed,
                                      labels=_text_labels(train_df, with_text))
        else:
            text = None
            log.warning("no training post has text: the tfidf block will be zeros for every post")

        with_image = train_df[train_df["image"].fillna("").astype(str) != ""]
        # Seeded random order: the codebook stops reading once it has enough descriptors.
        with_image = with_image.sample(frac=1.0, random_state=seed)
        if len(with_image):
            images = (
                rgb
                for _, rgb in _read_images(
                    with_image, Path(image_root), limits, progress=True, desc="visual vocabulary"
                )
            )
            image = ImageFeaturizer.fit(images, params.image, seed)
        else:
            image = ImageFeaturizer(params.image, codebook=None)
            log.warning("no training post has an image: the sift_bow block will be zeros")

        encoder = SentenceEncoder(
            params.text.embedder, params.text.embed_batch_size, params.text.max_seq_tokens
        )
        log.info("sentence model: %s (%s)", params.text.embedder, encoder.location)
        return cls(params, seed, text, image, encoder, encoder.dim, encoder.vocab_size)

    # ------------------------------------------------------------------ features

    @property
    def feature_dims(self) -> dict[str, int]:
        """Width of every array per post: the VECTOR_FEATURES blocks are (N, width);
        `token_ids` is (N, max_seq_tokens) and `image_small` is (N, S, S, 3) with S the value
        given here; `has_text`/`has_image` are (N,) flags."""
        return {
            "tfidf": tfidf_width(self.params.text),
            "sent_emb": self.embedding_dim,
            **self.image.feature_dims,
            "token_ids": self.params.text.max_seq_tokens,
            "image_small": self.params.image.net_image_size,
        }

    def featurize_posts(
        self,
        texts: Sequence[str],
        images: Sequence[np.ndarray | None],
        *,
        timings: dict[str, float] | None = None,
    ) -> dict[str, np.ndarray]:
        """The FEATURE_ARRAYS of posts given as raw texts ('' for none) and decoded RGB uint8
        images (None for none), e.g. from `adfilter.imageio.read_image` in the server."""
        if len(texts) != len(images):
            raise ValueError(
                f"featurize_posts: {len(texts)} texts but {len(images)} images; pass one of "
                f"each per post ('' and None where a post has none)"
            )
        return self._featurize(list(texts), images, timings, progress=False)

    def transform(
        self,
        df: pd.DataFrame,
        image_root: str | Path = ".",
        limits: ImageLimits = DEFAULT_LIMITS,
        *,
        timings: dict[str, float] | None = None,
        progress: bool = True,
    ) -> dict[str, np.ndarray]:
        """FEATURE_ARRAYS + ROW_ARRAYS (id, label, sensitivity, slice) for a table of posts,
        row by row; image paths are relative to `image_root`. An image that does not read
        raises FeatureError naming the post and the path."""
        _check_columns(df, "posts")
        texts = _texts(df)
        has_image = (df["image"].fillna("").astype(str) != "").to_numpy()
        reader = _read_images(
            df[has_image], Path(image_root), limits, progress=False, desc="images", timings=timings
        )
        images = _aligned(has_image, (rgb for _, rgb in reader))
        out = self._featurize(texts, images, timings, progress=progress)
        out["id"] = df["id"].astype(str).to_numpy().astype(str)
        out["label"] = df["label"].to_numpy().astype(np.int64)
        out["sensitivity"] = df["sensitivity"].to_numpy().astype(np.float32)
        out["slice"] = df["slice"].astype(str).to_numpy().astype(str)
        return out

    def _featurize(
        self,
        texts: list[str],
        images: Iterable[np.ndarray | None],
        timings: dict[str, float] | None,
        progress: bool,
    ) -> dict[str, np.ndarray]:
        n = len(texts)
        timings = timings if timings is not None else {}
        with _timed(timings, "normalize"):
            norm = [normalize_text(t) for t in texts]
            has_text = np.array([bool(t) for t in norm], dtype=bool).reshape(n)
        with _timed(timings, "tfidf"):
            if self.text is not None:
                tfidf = self.text.transform(norm)
            else:
                tfidf = np.zeros((n, tfidf_width(self.params.text)), np.float32)
        with _timed(timings, "embedding"):
            sent_emb = self.encoder.embed(norm, has_text, progress=progress)
        with _timed(timings, "tokenize"):
            token_ids = self.encoder.token_ids(norm)

        image_arrays = self.image.transform(images, n, progress=progress, timings=timings)

        return {
            "has_text": has_text,
            "tfidf": tfidf,
            "sent_emb": sent_emb,
            "token_ids": token_ids,
            **image_arrays,
        }

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | Path, extra_meta: dict[str, Any] | None = None) -> Path:
        """Write the fitted parts and meta.json to `directory` (created; old parts replaced)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in (TEXT_FILE, IMAGE_FILE):
            (directory / name).unlink(missing_ok=True)
        if self.text is not None:
            joblib.dump(self.text.state(), directory / TEXT_FILE)
        if self.image.codebook is not None:
            joblib.dump({"codebook": self.image.codebook}, directory / IMAGE_FILE)
        meta = {
            "format_version": FORMAT_VERSION,
            "params": asdict(self.params),
            "seed": self.seed,
            "embedder": {
                "spec": self.encoder.spec,
                "location": self.encoder.location,
                "dim": self.embedding_dim,
                "token_vocab_size": self.token_vocab_size,
            },
            "feature_dims": self.feature_dims,
            "versions": _library_versions(),
            **(extra_meta or {}),
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> FeaturePipeline:
        """The pipeline `save` wrote to `directory`; the sentence model is loaded on first use."""
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{meta_path} not found: {directory} holds no saved FeaturePipeline; run the "
                f"featurize stage first (dvc repro featurize)"
            )
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{meta_path}: format_version {meta.get('format_version')!r}, this code reads "
                f"{FORMAT_VERSION}; re-run the featurize stage with this code"
            )
        raw = meta["params"]
        params = FeaturizeParams(
            text=TextFeatureParams(**raw["text"]), image=ImageFeatureParams(**raw["image"])
        )
        text_path = directory / TEXT_FILE
        text = (
            TextFeaturizer.from_state(params.text, joblib.load(text_path))
            if text_path.is_file()
            else None
        )
        image_path = directory / IMAGE_FILE
        codebook = joblib.load(image_path)["codebook"] if image_path.is_file() else None
        image = ImageFeaturizer(params.image, codebook)

        emb = meta["embedder"]
        spec = emb["spec"]
        encoder = SentenceEncoder(
            spec,
            params.text.embed_batch_size,
            params.text.max_seq_tokens,
            # `bundled` resolves afresh here; anything else loads from where it was found.
            location=None if spec == BUNDLED else emb["location"],
        )
        return cls(
            params,
            int(meta["seed"]),
            text,
            image,
            encoder,
            int(emb["dim"]),
            int(emb["token_vocab_size"]),
        )


# --------------------------------------------------------------------------- helpers


def _text_labels(df: pd.DataFrame, rows: list[int]) -> np.ndarray | None:
    """The label of each post's text for the margin models: the post's label, except -1
    (left out) for a hidden image ad, whose label comes from its image, not its clean text."""
    if "label" not in df.columns:
        return None
    labels = df["label"].to_numpy().astype(int)[rows]
    if "slice" in df.columns:
        hidden = (df["slice"].astype(str).to_numpy() == HIDDEN_IMAGE_AD)[rows]
        labels = np.where(hidden, -1, labels)
    return labels


def train_margins(pipeline: FeaturePipeline) -> np.ndarray | None:
    """Out-of-fold margins for the training posts with text (in row order) of the table the
    pipeline was fitted on; None when there are no margin columns."""
    text = pipeline.text
    if text is None or not pipeline.params.text.margins or text.oof_margins is None:
        return None
    return text.oof_margins


def _check_columns(df: pd.DataFrame, what: str) -> None:
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise FeatureError(
            f"{what} table lacks the post column(s) {', '.join(missing)}; expected at least "
            f"{', '.join(COLUMNS)} (see adfilter.schema)"
        )


def _texts(df: pd.DataFrame) -> list[str]:
    return df["text"].fillna("").astype(str).tolist()


def _read_images(
    df: pd.DataFrame,
    root: Path,
    limits: ImageLimits,
    progress: bool,
    desc: str,
    timings: dict[str, float] | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """(post id, RGB image) for each row, read lazily so only one image is in memory at a time."""
    rows = zip(df["id"].astype(str), df["image"].astype(str), strict=True)
    for post_id, rel in tqdm(rows, total=len(df), desc=desc, unit="image", disable=not progress):
        path = root / rel
        start = time.perf_counter()
        try:
            rgb = read_image(path, limits)
        except ImageError as exc:
            raise FeatureError(
                f"post {post_id}: image {path} cannot be read ({exc}); the validate stage "
                f"should have quarantined it: re-run `dvc repro validate split featurize`, or "
                f"fix the file"
            ) from exc
        if timings is not None:
            timings["image_read"] = timings.get("image_read", 0.0) + time.perf_counter() - start
        yield post_id, rgb


def _aligned(mask: np.ndarray, present: Iterator[np.ndarray]) -> Iterator[np.ndarray | None]:
    """One item per row: the next image where `mask` is True, None elsewhere."""
    for has in mask:
        yield next(present) if has else None


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def _library_versions() -> dict[str, str]:
    import cv2
    import sklearn

    return {"scikit-learn": sklearn.__version__, "opencv": cv2.__version__}
