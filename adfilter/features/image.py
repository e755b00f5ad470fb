"""Handcrafted image features: SIFT bag of visual words, HSV colour histogram, QR-code flag,
and the small fixed-size copy of the image that the CNN branch reads.

The visual vocabulary is the only fitted part: k-means over SIFT descriptors of the training
images. Everything else is a fixed function of one image, so a post gets the same features in
the batch pipeline and online.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence

import cv2
import numpy as np
from sklearn.cluster import MiniBatchKMeans
from tqdm.auto import tqdm

from adfilter.config import ImageFeatureParams
from adfilter.imageio import resize_square

log = logging.getLogger(__name__)

# OpenCV's hue runs over 0..179 for 8-bit images, saturation and value over 0..255.
_HSV_RANGES = [0, 180, 0, 256, 0, 256]


class CodebookError(ValueError):
    """The training images do not yield enough SIFT descriptors for the visual vocabulary."""


def to_gray(rgb: np.ndarray, size: int) -> np.ndarray:
    """The grayscale, size x size view that SIFT looks at."""
    return cv2.cvtColor(resize_square(rgb, size), cv2.COLOR_RGB2GRAY)


class ImageFeaturizer:
    """SIFT bag of visual words + HSV histogram + QR flag + `image_small` for one image at a time.

    Build it with `ImageFeaturizer.fit(images, params, seed)`; the fitted part is the k-means
    codebook (`codebook`, sift_vocab_size x 128). Without one (no training images at all)
    `sift_bow` is zeros.
    """

    def __init__(self, params: ImageFeatureParams, codebook: MiniBatchKMeans | None) -> None:
        self.params = params
        self.codebook = codebook
        # OpenCV's detectors keep per-call state (not safe across server threads) and cannot
        # be pickled; they are cheap to build, so each thread makes its own on first use.
        self._local = threading.local()
        self._centres: tuple[np.ndarray, np.ndarray] | None = None

    # ------------------------------------------------------------------ fitting

    @classmethod
    def fit(
        cls, images: Iterable[np.ndarray], params: ImageFeatureParams, seed: int = 0
    ) -> ImageFeaturizer:
        """Learn the visual vocabulary from the SIFT descriptors of `images` (training images only).

        `images` is consumed only until it has yielded sift_kmeans_sample descriptors, so pass
        the training images in a seeded random order (as `FeaturePipeline.fit` does): on the
        default sample 507 of the 2,031 training images already give that many, and SIFT on
        the rest would only feed descriptors that the sampling throws away.
        """
        sift = _make_sift(params)
        per_image: list[np.ndarray] = []
        total = 0
        for rgb in images:
            desc = _descriptors(sift, to_gray(rgb, params.image_size))
            if len(desc):
                # SIFT descriptor values are whole numbers in 0..255: uint8 holds them exactly
                # at a quarter of the memory while the training set is gathered.
                per_image.append(desc.astype(np.uint8))
                total += len(desc)
            if total >= params.sift_kmeans_sample:
                break
        if not per_image:
            raise CodebookError(
                "featurize.image: no SIFT keypoints in any training image; the visual vocabulary "
                "needs textured training images (check data/split/train.parquet's image column)"
            )
        pool = np.concatenate(per_image)
        vocab = params.sift_vocab_size
        if len(pool) < vocab:
            raise CodebookError(
                f"featurize.image: the {len(per_image)} training images give {len(pool)} SIFT "
                f"descriptors, fewer than sift_vocab_size={vocab}; lower featurize.image."
                f"sift_vocab_size in params.yaml or train on more images"
            )
        if len(pool) > params.sift_kmeans_sample:
            rng = np.random.default_rng(seed)
            pool = pool[rng.choice(len(pool), size=params.sift_kmeans_sample, replace=False)]
        kmeans = MiniBatchKMeans(
            n_clusters=vocab,
            random_state=seed,
            batch_size=max(1024, 4 * vocab),
            n_init=3,
        )
        kmeans.fit(pool.astype(np.float32))
        log.info(
            "visual vocabulary: %d words from %d SIFT descriptors of %d training images",
            vocab,
            len(pool),
            len(per_image),
        )
        return cls(params, kmeans)

    # ------------------------------------------------------------------ transforming

    @property
    def feature_dims(self) -> dict[str, int]:
        p = self.params
        return {
            "sift_bow": p.sift_vocab_size,
            "hsv": int(np.prod(p.hsv_bins)),
            "qr": 1,
        }

    def empty(self, n: int) -> dict[str, np.ndarray]:
        """The arrays for `n` posts without an image: all zeros."""
        s = self.params.net_image_size
        return {
            "sift_bow": np.zeros((n, self.params.sift_vocab_size), np.float32),
            "hsv": np.zeros((n, int(np.prod(self.params.hsv_bins))), np.float32),
            "qr": np.zeros((n, 1), np.float32),
            "image_small": np.zeros((n, s, s, 3), np.uint8),
        }

    def transform(
        self,
        images: Iterable[np.ndarray | None],
        n: int,
        progress: bool = False,
        timings: dict[str, float] | None = None,
    ) -> dict[str, np.ndarray]:
        """sift_bow, hsv, qr, image_small and has_image for `n` posts.

        `images` yields one RGB uint8 image per post, None for a post without one (zeros);
        it may be a lazy reader, so a large table never sits in memory decoded.
        `timings["image"]` accumulates the seconds spent on features, not on reading.
        """
        out = self.empty(n)
        has_image = np.zeros(n, dtype=bool)
        seen = 0
        spent = 0.0
        stream = tqdm(images, total=n, desc="image features", unit="post", disable=not progress)
        for i, rgb in enumerate(stream):
            seen += 1
            if seen > n:
                break
            if rgb is None:
                continue
            start = time.perf_counter()
            bow, hsv, qr, small = self.one(rgb)
            spent += time.perf_counter() - start
            has_image[i] = True
            out["sift_bow"][i] = bow
            out["hsv"][i] = hsv
            out["qr"][i, 0] = qr
            out["image_small"][i] = small
        if seen != n:
            raise ValueError(f"expected {n} images (None for a post without one), got {seen}")
        if timings is not None:
            timings["image"] = timings.get("image", 0.0) + spent
        out["has_image"] = has_image
        return out

    def one(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
        """(sift_bow, hsv, qr, image_small) of one RGB uint8 image."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(
                f"expected an RGB uint8 image of shape (H, W, 3), got {rgb.dtype} {rgb.shape}; "
                f"decode images with adfilter.imageio.read_image"
            )
        p = self.params
        square = resize_square(rgb, p.image_size)
        return (
            self.bag_of_words(cv2.cvtColor(square, cv2.COLOR_RGB2GRAY)),
            hsv_histogram(square, p.hsv_bins),
            self.qr_present(rgb),
            resize_square(rgb, p.net_image_size),
        )

    def bag_of_words(self, gray: np.ndarray) -> np.ndarray:
        """L1-normalised visual-word counts; zeros for an image without keypoints (a flat colour)."""
        sift = getattr(self._local, "sift", None)
        if sift is None:
            sift = self._local.sift = _make_sift(self.params)
        vocab = self.params.sift_vocab_size
        desc = _descriptors(sift, gray)
        if not len(desc) or self.codebook is None:
            return np.zeros(vocab, np.float32)
        counts = np.bincount(self.visual_words(desc), minlength=vocab).astype(np.float32)
        return counts / counts.sum()

    def visual_words(self, desc: np.ndarray) -> np.ndarray:
        """Index of the nearest codebook centre for each descriptor.

        The same assignment as `MiniBatchKMeans.predict`, computed directly: for a few hundred
        descriptors sklearn's per-call checks and thread-pool setup cost more than the
        distances themselves (about 7 ms against 1 ms per image here).
        """
        if self._centres is None:
            # float32 like the fitted centres and like predict on float32 descriptors.
            centres = self.codebook.cluster_centers_.astype(np.float32)
            self._centres = (centres, (centres**2).sum(axis=1))
        centres, sq_norms = self._centres
        # |d - c|^2 = |d|^2 - 2 d.c + |c|^2; |d|^2 is the same for every centre.
        return np.argmin(sq_norms[None, :] - 2.0 * desc.astype(np.float32) @ centres.T, axis=1)

    def qr_present(self, rgb: np.ndarray) -> float:
        """1.0 when OpenCV's detector finds a QR code and decodes a payload from it.

        Finder patterns alone (`detect`) are not enough: on photo crops they fired on about 5%
        of images without a code (handwriting, tiles), with degenerate corner points, while a
        decoded payload flagged no clean post of the sample, chessboard negatives included.
        A code that decodes is also what makes a QR an ad: a scannable link.
        It runs on the image as posted (shrunk to qr_max_side at most), since a QR code in a
        corner may not survive the resize to image_size.
        """
        detector = getattr(self._local, "qr", None)
        if detector is None:
            detector = self._local.qr = cv2.QRCodeDetector()
        cap = self.params.qr_max_side
        if max(rgb.shape[:2]) > cap:
            h, w = rgb.shape[:2]
            scale = cap / max(h, w)
            rgb = cv2.resize(
                rgb,
                (max(1, round(w * scale)), max(1, round(h * scale))),
                interpolation=cv2.INTER_AREA,
            )
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        try:
            payload, _, _ = detector.detectAndDecode(gray)
        except cv2.error:
            # OpenCV raises on some degenerate candidate quadrilaterals instead of returning "".
            payload = ""
        return 1.0 if payload else 0.0

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_local"]
        state["_centres"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()


def hsv_histogram(rgb: np.ndarray, bins: Sequence[int]) -> np.ndarray:
    """Joint HSV histogram, flattened and normalised to sum to 1."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    hist = cv2.calcHist([hsv], [0, 1, 2], None, list(bins), _HSV_RANGES).ravel()
    total = float(hist.sum())
    return (hist / total if total > 0 else hist).astype(np.float32)


def _make_sift(params: ImageFeatureParams) -> cv2.SIFT:
    return cv2.SIFT_create(nfeatures=params.sift_max_keypoints)


def _descriptors(sift: cv2.SIFT, gray: np.ndarray) -> np.ndarray:
    _, desc = sift.detectAndCompute(gray, None)
    # Older OpenCV builds return None instead of an empty array when nothing is found.
    return desc if desc is not None else np.zeros((0, 128), np.float32)
