"""The `validate` stage: every raw post is either accepted into data/clean or quarantined.

A missing column or an unreadable file stops the stage at once: nothing row by row can be
trusted then. Every other problem belongs to one row, which goes to
`data/quarantine/rejected.parquet` with a short `reason` code and a `detail` sentence; the
report counts each reason, so nothing is dropped silently. Reason codes (first failing check
wins, in this order):

    missing_id, duplicate_id            id empty, or seen in an earlier row
    bad_text, bad_image_ref             text / image not a string (absent = '' or null)
    bad_label                           label not 0 or 1 (2, "yes", NaN, ...)
    bad_sensitivity                     not a number, NaN, or outside [0, 1]
    bad_slice, slice_mismatch           unknown slice, or one that contradicts text/image presence
    empty_post                          no text (after normalisation) and no image
    text_too_long                       more than validate.max_text_chars characters
    image_missing, image_empty, image_too_large, image_format, image_bomb, image_too_small,
    image_corrupt                       from adfilter.imageio.read_image with the params' limits
    duplicate                           same text and image as an earlier post (exactly, or after
                                        normalize_text and decoding); the earlier one is kept
    conflicting_labels                  duplicates that disagree on the label: all of them go

The quarantine and `reports/validation.json` are always written; then the stage fails when the
rejected share exceeds validate.max_reject_fraction. `data/clean/manifest.json` carries the raw
snapshot's data version on, so later stages know it from their own inputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from adfilter.config import Params, ValidateParams, load_params
from adfilter.features.textnorm import normalize_text, text_fingerprint
from adfilter.imageio import ImageError, ImageLimits, read_image
from adfilter.logs import setup_logging
from adfilter.schema import COLUMNS, IMAGE_ONLY, SLICES, TEXT_ONLY
from adfilter.versioning import MANIFEST, data_version

log = logging.getLogger("tasks.validate")

POSTS_FILE = "posts.parquet"
REJECTED_FILE = "rejected.parquet"
QUARANTINE_COLUMNS = (*COLUMNS, "reason", "detail")


class ValidationError(RuntimeError):
    """The raw snapshot cannot be validated at all (missing file or column)."""


class RejectThresholdExceeded(ValidationError):
    """Too many rows were rejected; the report and the quarantine are written already."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


def image_limits(params: ValidateParams) -> ImageLimits:
    """The limits every image in the system is read with (validation, features, serving)."""
    return ImageLimits(
        max_bytes=params.max_image_bytes,
        max_pixels=params.max_image_pixels,
        min_side=params.min_image_side,
        formats=tuple(f.upper() for f in params.allowed_image_formats),
    )


@dataclass
class _Row:
    index: int
    raw: dict[str, Any]
    id: str = ""
    text: str = ""
    image: str = ""
    label: int = -1
    sensitivity: float = math.nan
    slice: str = ""
    reason: str = ""
    detail: str = ""
    file_hash: str = ""
    pixel_hash: str = ""

    def reject(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail


def validate(
    params: Params,
    raw_dir: Path = Path("data/raw"),
    clean_dir: Path = Path("data/clean"),
    quarantine_dir: Path = Path("data/quarantine"),
    report_path: Path = Path("reports/validation.json"),
    root: Path = Path("."),
) -> dict[str, Any]:
    """Split `raw_dir/posts.parquet` into clean and quarantined rows; return the report.

    Image paths in the table are relative to `root` (the repository root, where DVC runs) and
    must lie inside `raw_dir`, so that the snapshot's data version covers them.
    """
    started = time.perf_counter()
    vp = params.validate
    frame = _read_posts(Path(raw_dir) / POSTS_FILE)
    rows = [_Row(index=i, raw=rec) for i, rec in enumerate(frame.to_dict(orient="records"))]
    log.info("validating %d posts from %s", len(rows), Path(raw_dir) / POSTS_FILE)

    _check_ids(rows)
    for row in rows:
        if not row.reason:
            _check_fields(row, vp)
    _check_images(rows, image_limits(vp), Path(root), Path(raw_dir))
    duplicates = _check_duplicates(rows)

    accepted = [r for r in rows if not r.reason]
    rejected = [r for r in rows if r.reason]
    version = _data_version(Path(raw_dir))
    _write_clean(accepted, Path(clean_dir), version)
    quarantine_path = Path(quarantine_dir) / REJECTED_FILE
    _write_quarantine(rejected, quarantine_path)

    total = len(rows)
    fraction = len(rejected) / total if total else 0.0
    by_reason = Counter(r.reason for r in rejected)
    by_slice_label: dict[str, dict[str, int]] = {s: {"0": 0, "1": 0} for s in SLICES}
    for r in accepted:
        by_slice_label[r.slice][str(r.label)] += 1
    report: dict[str, Any] = {
        "total": total,
        "accepted": len(accepted),
        "rejected": len(rejected),
        "rejected_fraction": round(fraction, 6),
        "threshold": vp.max_reject_fraction,
        "rejected_by_reason": dict(by_reason.most_common()),
        "duplicates": duplicates,
        "accepted_by_slice_label": by_slice_label,
        "accepted_by_label": {
            "0": sum(1 for r in accepted if r.label == 0),
            "1": sum(1 for r in accepted if r.label == 1),
        },
        "quarantine": str(quarantine_path),
        "data_version": version,
        "seconds": round(time.perf_counter() - started, 3),
    }
    report_path = Path(report_path)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    log.info(
        "accepted %d of %d posts, rejected %d (%.2f%%): %s; report %s",
        len(accepted), total, len(rejected), 100 * fraction,
        ", ".join(f"{k} {v}" for k, v in by_reason.most_common()) or "none", report_path,
    )  # fmt: skip

    if total == 0:
        raise ValidationError(
            f"{Path(raw_dir) / POSTS_FILE} has no rows: nothing to validate (rerun ingest)"
        )
    if fraction > vp.max_reject_fraction:
        top = ", ".join(f"{k} ({v})" for k, v in by_reason.most_common(3))
        raise RejectThresholdExceeded(
            f"validate: {len(rejected)} of {total} posts rejected ({fraction:.2%}), above the "
            f"threshold validate.max_reject_fraction = {vp.max_reject_fraction:.2%}; top reasons: "
            f"{top}. The rows and their reasons are in {quarantine_path}: fix the source data, or "
            f"raise the threshold in params.yaml if this share is expected.",
            report,
        )
    return report


# --------------------------------------------------------------------------- reading


def _read_posts(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise ValidationError(f"{path} not found: run the ingest stage first (dvc repro ingest)")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a damaged file
        raise ValidationError(
            f"{path} is not a readable Parquet file ({type(exc).__name__}: {exc}); rerun ingest"
        ) from exc
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValidationError(
            f"{path} lacks the column(s) {', '.join(missing)}; expected exactly "
            f"{', '.join(COLUMNS)} (see adfilter/schema.py); found {', '.join(map(str, frame.columns))}"
        )
    extra = [c for c in frame.columns if c not in COLUMNS]
    if extra:
        log.warning("%s: ignoring extra column(s) %s", path, ", ".join(map(str, extra)))
    return frame[list(COLUMNS)]


def _is_null(value: Any) -> bool:
    if value is None or value is pd.NA:
        return True
    return isinstance(value, float) and math.isnan(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _as_number(value: Any) -> float | None:
    """A finite number, from a number or a numeric string (a CSV source gives strings); else None."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if not _is_number(value) or not math.isfinite(float(value)):
        return None
    return float(value)


# --------------------------------------------------------------------------- row checks


def _check_ids(rows: list[_Row]) -> None:
    first_seen: dict[str, str] = {}
    for row in rows:
        value = row.raw["id"]
        if _is_null(value) or (isinstance(value, str) and not value.strip()):
            row.reject("missing_id", f"row {row.index} has no id")
            continue
        if _is_number(value) and float(value).is_integer():
            value = str(int(value))
        row.id = str(value).strip()
        if row.id in first_seen:
            row.reject("duplicate_id", f"id {row.id!r} (row {row.index}) was already used by row {first_seen[row.id]}")
        else:
            first_seen[row.id] = str(row.index)


def _check_fields(row: _Row, vp: ValidateParams) -> None:
    raw = row.raw
    text, image = raw["text"], raw["image"]
    if _is_null(text):
        text = ""
    if not isinstance(text, str):
        return row.reject("bad_text", f"post {row.id}: text is {type(text).__name__} {text!r}, not a string")
    if _is_null(image):
        image = ""
    if not isinstance(image, str):
        return row.reject("bad_image_ref", f"post {row.id}: image is {type(image).__name__} {image!r}, not a path string")
    row.text, row.image = text, image.strip()

    label = _as_number(raw["label"])
    if label not in (0.0, 1.0):
        return row.reject("bad_label", f"post {row.id}: label is {raw['label']!r}; it must be 0 (clean) or 1 (ad)")
    row.label = int(label)

    sens = _as_number(raw["sensitivity"])
    if sens is None or not 0.0 <= sens <= 1.0:
        return row.reject(
            "bad_sensitivity", f"post {row.id}: sensitivity is {raw['sensitivity']!r}; it must be a number in [0, 1]"
        )
    row.sensitivity = sens

    slice_ = raw["slice"]
    if slice_ not in SLICES:
        return row.reject("bad_slice", f"post {row.id}: slice is {slice_!r}; known slices: {', '.join(SLICES)}")
    row.slice = slice_

    has_image = bool(row.image)
    if not has_image and not normalize_text(text):
        # Zero-width characters or combining marks alone are no text either.
        return row.reject("empty_post", f"post {row.id} has neither text nor an image")
    has_text = bool(text.strip())  # as adfilter.schema.Post.has_text, which gave the slice
    expected = {TEXT_ONLY: (True, False), IMAGE_ONLY: (False, True)}.get(slice_, (True, True))
    if (has_text, has_image) != expected:
        return row.reject(
            "slice_mismatch",
            f"post {row.id} is in slice {slice_} but has {'text' if has_text else 'no text'} and "
            f"{'an image' if has_image else 'no image'}",
        )
    if len(text) > vp.max_text_chars:
        return row.reject(
            "text_too_long", f"post {row.id}: text is {len(text)} characters; the limit is {vp.max_text_chars}"
        )
    return None


def _check_images(rows: list[_Row], limits: ImageLimits, root: Path, raw_dir: Path) -> None:
    todo = [r for r in rows if not r.reason and r.image]
    if not todo:
        return
    snapshot = (root / raw_dir).resolve() if not raw_dir.is_absolute() else raw_dir.resolve()
    # Decoding is C code that releases the GIL, so threads overlap reads and decodes.
    with ThreadPoolExecutor() as pool:
        results = pool.map(lambda r: _check_image(r, limits, root, snapshot), todo)
        for row, (reason, detail, file_hash, pixel_hash) in tqdm(
            zip(todo, results, strict=True), total=len(todo), desc="validate images", unit="img"
        ):
            if reason:
                row.reject(reason, detail)
            row.file_hash, row.pixel_hash = file_hash, pixel_hash


def _check_image(row: _Row, limits: ImageLimits, root: Path, snapshot: Path) -> tuple[str, str, str, str]:
    path = Path(row.image)
    path = path if path.is_absolute() else root / path
    if path.is_file() and not path.resolve().is_relative_to(snapshot):
        return ("bad_image_ref", f"post {row.id}: image {row.image} lies outside the raw snapshot {snapshot}; "
                "ingest copies every image into it", "", "")  # fmt: skip
    try:
        rgb = read_image(path, limits)
    except ImageError as exc:
        return exc.reason, f"post {row.id}: {exc.detail}", "", ""
    file_hash = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
    pixels = hashlib.blake2b(str(rgb.shape).encode(), digest_size=16)
    pixels.update(rgb.tobytes())
    return "", "", file_hash, pixels.hexdigest()


def _check_duplicates(rows: list[_Row]) -> dict[str, int]:
    """Mark duplicates of an earlier post, or all members of a group that disagrees on labels."""
    groups: dict[tuple[str, str], list[_Row]] = defaultdict(list)
    for row in rows:
        if row.reason:
            continue
        # An all-emoji text has an empty fingerprint; its normalised text is the key instead.
        text_key = text_fingerprint(row.text) or "=" + normalize_text(row.text)
        groups[(text_key, row.pixel_hash)].append(row)
    counts = {"exact": 0, "normalised": 0, "conflicting_groups": 0, "conflicting_posts": 0}
    for members in groups.values():
        if len(members) < 2:
            continue
        labels = {m.label for m in members}
        if len(labels) > 1:
            listing = ", ".join(f"{m.id} (label {m.label})" for m in members)
            for m in members:
                m.reject("conflicting_labels", f"post {m.id}: the same post appears with different labels: {listing}")
            counts["conflicting_groups"] += 1
            counts["conflicting_posts"] += len(members)
            continue
        kept = members[0]
        for m in members[1:]:
            if m.text == kept.text and m.file_hash == kept.file_hash:
                counts["exact"] += 1
                m.reject("duplicate", f"post {m.id} is an exact duplicate of {kept.id}, which is kept")
            else:
                counts["normalised"] += 1
                m.reject(
                    "duplicate",
                    f"post {m.id} has the same text after normalisation and the same image "
                    f"content as {kept.id}, which is kept",
                )
    return counts


# --------------------------------------------------------------------------- writing


def _data_version(raw_dir: Path) -> str | None:
    try:
        return data_version(raw_dir)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        log.warning("no data version for %s (%s); the report records null", raw_dir, exc)
        return None


CLEAN_SCHEMA = pa.schema(
    [("id", pa.string()), ("text", pa.string()), ("image", pa.string()), ("label", pa.int64()),
     ("sensitivity", pa.float64()), ("slice", pa.string())]
)  # fmt: skip
QUARANTINE_SCHEMA = pa.schema([(c, pa.string()) for c in QUARANTINE_COLUMNS])


def _write_clean(rows: Sequence[_Row], clean_dir: Path, version: str | None) -> None:
    clean_dir.mkdir(parents=True, exist_ok=True)
    columns = {
        "id": [r.id for r in rows],
        "text": [r.text for r in rows],
        "image": [r.image for r in rows],
        "label": [r.label for r in rows],
        "sensitivity": [r.sensitivity for r in rows],
        "slice": [r.slice for r in rows],
    }
    pq.write_table(pa.table(columns, schema=CLEAN_SCHEMA), clean_dir / POSTS_FILE)
    manifest = {"data_version": version, "stage": "validate", "posts": len(rows)}
    (clean_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _as_string(value: Any) -> str | None:
    if value is None or value is pd.NA:
        return None
    return value if isinstance(value, str) else str(value)


def _write_quarantine(rows: Sequence[_Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Every column as strings: a rejected value may be of any type, and is kept as it came.
    data = {c: [_as_string(r.raw[c]) for r in rows] for c in COLUMNS}
    data["reason"] = [r.reason for r in rows]
    data["detail"] = [r.detail for r in rows]
    pq.write_table(pa.table(data, schema=QUARANTINE_SCHEMA), path)


def main() -> None:
    setup_logging()
    params = load_params("params.yaml")
    try:
        validate(params)
    except ValidationError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from exc


if __name__ == "__main__":
    main()
