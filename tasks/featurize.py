"""featurize: fit the FeaturePipeline on train, write the features of every split.

Reads `data/split/{train,val,test}.parquet`; writes `data/features/{split}.npz` (arrays aligned
row by row with the split's parquet, see `adfilter.features.pipeline`), the fitted pipeline in
`artifacts/featurizer/` (with `meta.json`: params, data version, feature widths) and
`reports/featurize.json` (counts, timings and throughput per feature family).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from adfilter.config import Params, load_params
from adfilter.features.pipeline import FeaturePipeline, train_margins
from adfilter.imageio import ImageLimits
from adfilter.logs import setup_logging
from adfilter.versioning import provenance

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def featurize(
    params: Params,
    split_dir: Path = Path("data/split"),
    out_dir: Path = Path("data/features"),
    artifact_dir: Path = Path("artifacts/featurizer"),
    report_path: Path = Path("reports/featurize.json"),
    image_root: Path = Path("."),
    raw_dir: Path = Path("data/raw"),
) -> dict[str, Any]:
    """Fit on `split_dir/train.parquet`, featurize every split, save all; returns the report.

    Image paths in the split tables are relative to `image_root` (the repository root).
    """
    frames = {name: _read_split(Path(split_dir), name) for name in SPLITS}
    # Read images with the limits validate checked them against, so an image that passed
    # validation is never refused here.
    v = params.validate
    limits = ImageLimits(
        max_bytes=v.max_image_bytes,
        max_pixels=v.max_image_pixels,
        min_side=v.min_image_side,
        formats=tuple(f.upper() for f in v.allowed_image_formats),
    )

    start = time.perf_counter()
    pipeline = FeaturePipeline.fit(
        frames["train"], params.featurize, seed=params.seed, image_root=image_root, limits=limits
    )
    fit_s = time.perf_counter() - start
    log.info(
        "fitted the feature pipeline on %d training posts in %.1f s", len(frames["train"]), fit_s
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_split: dict[str, dict[str, Any]] = {}
    totals: dict[str, float] = {}
    for name, df in frames.items():
        timings: dict[str, float] = {}
        start = time.perf_counter()
        arrays = pipeline.transform(df, image_root=image_root, limits=limits, timings=timings)
        if name == "train":
            _use_out_of_fold_margins(pipeline, arrays)
        timings["total"] = time.perf_counter() - start
        np.savez_compressed(out_dir / f"{name}.npz", **arrays)
        per_split[name] = _split_summary(arrays, timings)
        for key in ("n_posts", "n_with_text", "n_with_image"):
            totals[key] = totals.get(key, 0) + per_split[name][key]
        for key, seconds in timings.items():
            totals[f"{key}_s"] = totals.get(f"{key}_s", 0.0) + seconds
        log.info(
            "%s: %d posts (%d with text, %d with an image, %d QR codes) in %.1f s -> %s",
            name,
            per_split[name]["n_posts"],
            per_split[name]["n_with_text"],
            per_split[name]["n_with_image"],
            per_split[name]["n_qr"],
            timings["total"],
            out_dir / f"{name}.npz",
        )

    prov = provenance(raw_dir)
    pipeline.save(
        artifact_dir,
        extra_meta={
            "provenance": prov,
            "data_version": prov["data_version"],
            "fitted_on": {
                "split": "train",
                "n_posts": per_split["train"]["n_posts"],
                "n_with_text": per_split["train"]["n_with_text"],
                "n_with_image": per_split["train"]["n_with_image"],
            },
        },
    )

    report = {
        "feature_dims": pipeline.feature_dims,
        "fit_s": round(fit_s, 3),
        "throughput_posts_per_s": {
            "tfidf": _rate(totals["n_with_text"], totals.get("tfidf_s", 0.0)),
            "embedding": _rate(totals["n_with_text"], totals.get("embedding_s", 0.0)),
            "tokenize": _rate(totals["n_with_text"], totals.get("tokenize_s", 0.0)),
            "image_sift_hsv_qr": _rate(totals["n_with_image"], totals.get("image_s", 0.0)),
            "image_read": _rate(totals["n_with_image"], totals.get("image_read_s", 0.0)),
            "all": _rate(totals["n_posts"], totals.get("total_s", 0.0)),
        },
        "splits": per_split,
        "provenance": prov,
    }
    report_path = Path(report_path)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    log.info("throughput (posts/s): %s", report["throughput_posts_per_s"])
    return report


def _use_out_of_fold_margins(pipeline: FeaturePipeline, arrays: dict[str, np.ndarray]) -> None:
    """Train rows get the margin models' out-of-fold margins, not the in-sample ones."""
    oof = train_margins(pipeline)
    if oof is None:
        return
    rows = np.flatnonzero(arrays["has_text"])
    if len(rows) != len(oof):
        raise RuntimeError(
            f"featurize: {len(rows)} train posts have text but the margin models were fitted on "
            f"{len(oof)}; the normalisation differs between fit and transform"
        )
    start = pipeline.params.text.svd_dim
    in_sample = arrays["tfidf"][rows, start:]
    arrays["tfidf"][rows, start:] = oof
    log.info("train split: out-of-fold margins for %d posts (mean |in-sample - out-of-fold| "
             "= %.3f)", len(rows), float(np.abs(in_sample - oof).mean()) if len(rows) else 0.0)


def _read_split(split_dir: Path, name: str) -> pd.DataFrame:
    path = split_dir / f"{name}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the split stage first (dvc repro split)")
    return pd.read_parquet(path)


def _split_summary(arrays: dict[str, np.ndarray], timings: dict[str, float]) -> dict[str, Any]:
    has_image = arrays["has_image"]
    no_keypoints = has_image & ~arrays["sift_bow"].any(axis=1)
    return {
        "n_posts": int(len(arrays["id"])),
        "n_with_text": int(arrays["has_text"].sum()),
        "n_with_image": int(has_image.sum()),
        "n_qr": int(arrays["qr"][:, 0].sum()),
        "n_images_without_sift_keypoints": int(no_keypoints.sum()),
        # A text that fills every position was most likely cut at max_seq_tokens.
        "n_texts_at_max_seq_tokens": int((arrays["token_ids"][:, -1] != 0).sum()),
        "timings_s": {k: round(v, 3) for k, v in sorted(timings.items())},
    }


def _rate(count: float, seconds: float) -> float | None:
    return round(count / seconds, 1) if seconds > 0 and count else None


def main() -> None:
    setup_logging()
    featurize(load_params("params.yaml"))


if __name__ == "__main__":
    main()
