"""The reference set a model's live feature importance is compared with.

A reference folder holds

    reference.npz      the feature arrays of `n` held-out posts (the store's blob arrays:
                       has_text, has_image, tfidf, sent_emb, sift_bow, hsv, qr, token_ids,
                       image_small; plus id, label, slice where the source had them)
    background.npz     one mean row per input (`groups.make_background`): "absent" with
                       `drift.background: mean`, and the stand-in for an input the store did not
                       keep (image_small with `serve.store.store_image_small` off)
    reference.json     where it came from, when, how many posts, the feature widths
    explained-<key>.npz  SHAP values of all reference posts for one model and explainer setting
                       (`key`), with the model's score on them: computed once per model

The handcrafted blocks are kept as float16 and read back as float32, exactly as the
prediction store keeps a live post's blocks (`serving.store.encode_features`), so the two sides
of a comparison carry the same rounding.

The reference belongs with the model it was drawn for: the registration can store the folder
inside the bundle as `reference/`; without one the drift job builds it from the held-out
splits (`drift.reference_splits`: featurize outputs, which the model never trained on).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np

from adfilter.monitoring.groups import DENSE_BLOCKS, make_background

log = logging.getLogger(__name__)

REFERENCE_FILE: Final = "reference.npz"
BACKGROUND_FILE: Final = "background.npz"
META_FILE: Final = "reference.json"
FEATURE_KEYS: Final = (
    "has_text", "has_image", "tfidf", "sent_emb", "sift_bow", "hsv", "qr", "token_ids", "image_small",
)
ROW_KEYS: Final = ("id", "label", "slice")


class ReferenceError(FileNotFoundError):
    """A reference folder that is missing or cannot serve as one."""


@dataclass
class Reference:
    directory: Path
    arrays: dict[str, np.ndarray]
    background: dict[str, np.ndarray]
    meta: dict[str, Any]

    @property
    def n(self) -> int:
        return len(self.arrays["has_text"])

    def cached(self, key: str) -> dict[str, np.ndarray] | None:
        path = self.directory / f"explained-{key}.npz"
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}

    def save_cached(self, key: str, arrays: Mapping[str, np.ndarray]) -> Path:
        path = self.directory / f"explained-{key}.npz"
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)
        return path


def as_stored(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feature arrays with the handcrafted blocks rounded through float16 as the store keeps them."""
    out = dict(arrays)
    for block in DENSE_BLOCKS:
        if block in out:
            out[block] = np.asarray(out[block], dtype=np.float16).astype(np.float32)
    return out


def build_reference(
    sources: Sequence[str | Path],
    out_dir: str | Path,
    n_posts: int,
    seed: int = 0,
    empty_token_ids: np.ndarray | None = None,
    extra_meta: Mapping[str, Any] | None = None,
) -> Reference:
    """Draw `n_posts` posts (all when there are fewer) from featurize outputs `sources` (npz files
    with the data contract's arrays) into a reference folder `out_dir`."""
    parts: list[dict[str, np.ndarray]] = []
    for src in sources:
        path = Path(src)
        if not path.is_file():
            raise ReferenceError(
                f"{path} not found: the drift reference is drawn from the featurize stage's "
                f"held-out splits (drift.reference_splits); run `dvc repro featurize`, or pass a "
                f"reference folder (drift.reference / --reference)"
            )
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in FEATURE_KEYS if k not in npz.files]
            if missing:
                raise ReferenceError(f"{path} lacks {missing}: not a featurize output")
            parts.append({k: npz[k] for k in (*FEATURE_KEYS, *ROW_KEYS) if k in npz.files})
    if not parts:
        raise ReferenceError("build_reference needs at least one source (drift.reference_splits)")
    keys = [k for k in parts[0] if all(k in p for p in parts)]
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in keys}
    total = len(arrays["has_text"])
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(total, size=min(n_posts, total), replace=False))
    arrays = as_stored({k: v[rows] for k, v in arrays.items()})
    background = make_background(arrays, empty_token_ids)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("explained-*.npz"):
        old.unlink()  # explanations of an older reference would be wrong for this one
    np.savez_compressed(out / REFERENCE_FILE, **arrays)
    np.savez_compressed(out / BACKGROUND_FILE, **background)
    has_text, has_image = arrays["has_text"].astype(bool), arrays["has_image"].astype(bool)
    meta = {
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "sources": [str(s) for s in sources],
        "sources_sha256": {str(s): _sha256(Path(s)) for s in sources},
        "posts": int(len(rows)),
        "of_posts": int(total),
        "seed": int(seed),
        "counts": {
            "text_only": int((has_text & ~has_image).sum()),
            "image_only": int((~has_text & has_image).sum()),
            "text_image": int((has_text & has_image).sum()),
            **({"ads": int(arrays["label"].sum())} if "label" in arrays else {}),
        },
        "feature_dims": feature_dims(arrays),
        **(extra_meta or {}),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    log.info("drift reference: %d of %d held-out posts from %s -> %s", len(rows), total,
             ", ".join(str(s) for s in sources), out)
    return Reference(out, arrays, background, meta)


def load_reference(directory: str | Path) -> Reference:
    directory = Path(directory)
    for name in (REFERENCE_FILE, BACKGROUND_FILE, META_FILE):
        if not (directory / name).is_file():
            raise ReferenceError(
                f"{directory / name} not found: {directory} is not a drift reference folder "
                f"(build one with `adfilter drift --build-reference`, or let the drift job build "
                f"it from drift.reference_splits)"
            )
    with np.load(directory / REFERENCE_FILE, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    with np.load(directory / BACKGROUND_FILE, allow_pickle=False) as npz:
        background = {k: npz[k] for k in npz.files}
    meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    return Reference(directory, arrays, background, meta)


def is_reference(directory: str | Path) -> bool:
    return all((Path(directory) / n).is_file() for n in (REFERENCE_FILE, BACKGROUND_FILE, META_FILE))


def feature_dims(arrays: Mapping[str, np.ndarray]) -> dict[str, list[int]]:
    """Per-post shape of each feature array: what must match between reference and window."""
    return {k: list(np.asarray(arrays[k]).shape[1:]) for k in FEATURE_KEYS if k in arrays}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]
