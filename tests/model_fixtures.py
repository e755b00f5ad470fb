"""Synthetic featurize outputs with exactly the data contract's arrays, for the model tests.

Labels are learnable from every modality (ad texts use their own token ids and a shifted
TF-IDF block, ad images are reddish with a QR flag), so a short fit has something to find.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SMALL_DIMS = {"tfidf": 16, "sent_emb": 384, "sift_bow": 8, "hsv": 12, "qr": 1}


def synthetic_arrays(
    n: int,
    seed: int = 0,
    dims: dict[str, int] | None = None,
    image_size: int = 32,
    seq_len: int = 16,
    positive_share: float = 0.3,
) -> dict[str, np.ndarray]:
    """`n` posts: a third text-only, a third image-only, a third with both."""
    dims = dims or SMALL_DIMS
    rng = np.random.default_rng(seed)
    label = (rng.random(n) < positive_share).astype(np.int64)
    kind = np.arange(n) % 3  # 0 text only, 1 image only, 2 both
    has_text = kind != 1
    has_image = kind != 0
    sensitivity = np.where(label == 1, rng.uniform(0.3, 1.0, n), rng.uniform(0.0, 0.1, n))

    token_ids = np.zeros((n, seq_len), dtype=np.int32)
    lengths = rng.integers(3, seq_len + 1, n)
    for i in np.flatnonzero(has_text):
        low, high = (2000, 2100) if label[i] else (1000, 1100)
        token_ids[i, : lengths[i]] = rng.integers(low, high, lengths[i])

    def block(width: int, present: np.ndarray) -> np.ndarray:
        x = rng.normal(0.0, 1.0, (n, width)) + 1.5 * label[:, None]
        return np.where(present[:, None], x, 0.0).astype(np.float32)

    image_small = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    noise = rng.integers(0, 80, (n, image_size, image_size, 3))
    base = np.where(label[:, None, None, None] == 1, [200, 40, 40], [40, 40, 200])
    image_small[has_image] = np.clip(base + noise, 0, 255)[has_image].astype(np.uint8)

    slices = np.array(["text_only", "image_only", "text_image"])[kind]
    return {
        "id": np.array([f"s{seed}_{i:05d}" for i in range(n)]),
        "label": label,
        "sensitivity": sensitivity.astype(np.float32),
        "slice": slices,
        "has_text": has_text,
        "has_image": has_image,
        "tfidf": block(dims["tfidf"], has_text),
        "sent_emb": block(dims["sent_emb"], has_text),
        "sift_bow": np.abs(block(dims["sift_bow"], has_image)),
        "hsv": np.abs(block(dims["hsv"], has_image)),
        "qr": (has_image & (label == 1) & (rng.random(n) < 0.5)).astype(np.float32)[:, None],
        "token_ids": token_ids,
        "image_small": image_small,
    }


def write_features(
    root: Path,
    sizes: dict[str, int] | None = None,
    dims: dict[str, int] | None = None,
    image_size: int = 32,
    seq_len: int = 16,
) -> tuple[Path, Path]:
    """`root/data/features/{train,val,test}.npz` and `root/artifacts/featurizer/meta.json`."""
    sizes = sizes or {"train": 96, "val": 48, "test": 48}
    dims = dims or SMALL_DIMS
    features = root / "data" / "features"
    featurizer = root / "artifacts" / "featurizer"
    features.mkdir(parents=True, exist_ok=True)
    featurizer.mkdir(parents=True, exist_ok=True)
    for i, (split, n) in enumerate(sizes.items()):
        arrays = synthetic_arrays(n, seed=i, dims=dims, image_size=image_size, seq_len=seq_len)
        np.savez(features / f"{split}.npz", **arrays)
    meta = {"feature_dims": {**dims, "token_ids": seq_len, "image_small": image_size}}
    (featurizer / "meta.json").write_text(json.dumps(meta))
    return features, featurizer
