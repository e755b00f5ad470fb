"""The validate stage on tiny raw snapshots with every kind of bad row."""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from adfilter.config import Params, load_params
from adfilter.schema import COLUMNS
from tasks.validate import (
    QUARANTINE_COLUMNS,
    RejectThresholdExceeded,
    ValidationError,
    validate,
)

RAW = Path("data/raw")
IMAGES = RAW / "images"


@pytest.fixture
def params(repo_root: Path) -> Params:
    base = load_params(repo_root / "params.yaml", profile="ci")
    # Tiny limits so that an "oversized" file stays small in the test.
    vp = dataclasses.replace(base.validate, max_image_bytes=60_000, max_reject_fraction=1.0)
    return dataclasses.replace(base, validate=vp)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    IMAGES.mkdir(parents=True)
    (RAW / "manifest.json").write_text(json.dumps({"data_version": "sha256:00112233aabbccdd"}))
    return tmp_path


def noise_image(seed: int, size: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def save(name: str, rgb: np.ndarray, fmt: str = "PNG", **kw: Any) -> str:
    path = IMAGES / name
    Image.fromarray(rgb).save(path, format=fmt, **kw)
    return path.as_posix()


def write_bytes(name: str, data: bytes) -> str:
    path = IMAGES / name
    path.write_bytes(data)
    return path.as_posix()


def bomb_png(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header declares width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))  # fmt: skip


def post(id: Any, text: Any = "hello there", image: Any = "", label: Any = 0,
         sensitivity: Any = 0.0, slice: Any = None) -> dict[str, Any]:  # fmt: skip
    if slice is None:
        has_text = isinstance(text, str) and bool(text.strip())
        has_image = bool(image)
        slice = "text_image" if has_text and has_image else "image_only" if has_image else "text_only"
    return {"id": id, "text": text, "image": image, "label": label, "sensitivity": sensitivity, "slice": slice}


def write_posts(rows: list[dict[str, Any]], types: dict[str, pa.DataType] | None = None) -> None:
    """Write posts.parquet; `types` forces a column type (e.g. a string label column from a CSV)."""
    types = types or {}
    default = {"id": pa.string(), "text": pa.string(), "image": pa.string(), "label": pa.int64(),
               "sensitivity": pa.float64(), "slice": pa.string()}  # fmt: skip
    schema = pa.schema([(c, types.get(c, default[c])) for c in COLUMNS])
    def cell(value: Any, kind: pa.DataType) -> Any:
        return str(value) if kind == pa.string() and value is not None else value

    table = pa.table({f.name: [cell(r[f.name], f.type) for r in rows] for f in schema}, schema=schema)
    pq.write_table(table, RAW / "posts.parquet")


def run(params: Params) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    report = validate(params)
    clean = pd.read_parquet("data/clean/posts.parquet")
    rejected = pd.read_parquet("data/quarantine/rejected.parquet")
    return report, clean, rejected


def reason_of(rejected: pd.DataFrame, id: str) -> str:
    found = rejected.loc[rejected["id"] == id, "reason"].tolist()
    assert len(found) == 1, (id, found)
    return found[0]


def test_every_bad_image_gets_its_reason(workdir: Path, params: Params) -> None:
    good = save("good.png", noise_image(0))
    jpeg = io.BytesIO()
    Image.fromarray(noise_image(1, 64)).save(jpeg, format="JPEG", quality=90)
    truncated = write_bytes("truncated.jpg", jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    random_png = write_bytes("random.png", np.random.default_rng(2).bytes(3000))
    bomb = write_bytes("bomb.png", bomb_png(20000, 20000))  # over Pillow's own bomb limit too
    bomb2 = write_bytes("bomb2.png", bomb_png(6000, 6000))  # only over max_image_pixels
    big = save("big.png", noise_image(3, 200))  # ~120 kB of noise, over the 60 kB limit
    tiff = save("photo.tiff", noise_image(4), fmt="TIFF")
    ico = save("icon.ico", noise_image(5, 32), fmt="ICO")
    tiny = save("tiny.png", noise_image(6, 8))
    empty = write_bytes("empty.png", b"")
    outside = "elsewhere.png"  # a readable image, but not inside the raw snapshot
    Image.fromarray(noise_image(9)).save(outside)
    write_posts([
        post("ok", "look at this", good),
        post("trunc", "x", truncated), post("rand", "x", random_png), post("bomb", "x", bomb),
        post("bomb2", "x", bomb2),
        post("big", "x", big), post("tiff", "x", tiff), post("ico", "x", ico),
        post("tiny", "x", tiny), post("gone", "x", "data/raw/images/nothing.png"),
        post("empty", "x", empty), post("outside", "x", outside),
        post("outside_gone", "x", "../nothing_there.png"),
    ])  # fmt: skip
    assert Path(bomb).stat().st_size < 200

    report, clean, rejected = run(params)

    assert clean["id"].tolist() == ["ok"]
    expected = {
        "trunc": "image_corrupt", "rand": "image_corrupt", "bomb": "image_bomb", "bomb2": "image_bomb",
        "big": "image_too_large", "tiff": "image_format", "ico": "image_format",
        "tiny": "image_too_small", "gone": "image_missing", "empty": "image_empty",
        "outside": "bad_image_ref", "outside_gone": "image_missing",
    }  # fmt: skip
    assert {i: reason_of(rejected, i) for i in expected} == expected
    assert "6000x6000" in rejected.set_index("id").loc["bomb2", "detail"]
    assert report["rejected_by_reason"]["image_corrupt"] == 2
    assert report["rejected_by_reason"]["image_bomb"] == 2
    assert report["rejected_by_reason"]["image_format"] == 2
    assert sum(report["rejected_by_reason"].values()) == report["rejected"] == 12


def test_field_problems(workdir: Path, params: Params) -> None:
    img = save("a.png", noise_image(0))
    write_posts(
        [
            post("ok1", "fine text", label="1", sensitivity="0.4"),
            post("ok2", "", img, label="0"),
            post(None, "no id"),
            post("  ", "blank id"),
            post("dup", "first"),
            post("dup", "second with the same id"),
            post("l2", "label two", label="2"),
            post("lyes", "label yes", label="yes"),
            post("lnan", "label missing", label=None),
            post("s15", "too sensitive", sensitivity="1.5"),
            post("snan", "sensitivity nan", sensitivity="nan"),
            post("sword", "sensitivity word", sensitivity="high"),
            post("empty", "", ""),
            post("invisible", "\u200b \u200c", ""),
            post("long", "spam " * 2000),
            post("slice", "some text", slice="video"),
            post("mismatch", "some text", slice="image_only"),
        ],
        types={"label": pa.string(), "sensitivity": pa.string()},
    )
    report, clean, rejected = run(params)

    assert sorted(clean["id"]) == ["dup", "ok1", "ok2"]
    assert clean.set_index("id").loc["dup", "text"] == "first"
    assert clean["label"].dtype == np.int64 and clean["sensitivity"].dtype == np.float64
    assert clean.set_index("id").loc["ok1", "sensitivity"] == pytest.approx(0.4)
    by_id = dict(zip(rejected["id"], rejected["reason"], strict=True))
    assert by_id == {
        None: "missing_id", "  ": "missing_id", "dup": "duplicate_id",
        "l2": "bad_label", "lyes": "bad_label", "lnan": "bad_label",
        "s15": "bad_sensitivity", "snan": "bad_sensitivity", "sword": "bad_sensitivity",
        "empty": "empty_post", "invisible": "empty_post", "long": "text_too_long",
        "slice": "bad_slice", "mismatch": "slice_mismatch",
    }  # fmt: skip
    # Values are kept as they came, as strings, next to a sentence that names the post.
    row = rejected.set_index("id").loc["lyes"]
    assert row["label"] == "yes" and "lyes" in row["detail"] and "0 (clean) or 1 (ad)" in row["detail"]
    assert rejected.set_index("id").loc["long", "detail"].startswith("post long: text is 10000 characters")
    assert list(rejected.columns) == list(QUARANTINE_COLUMNS)
    assert report["total"] == 17 and report["accepted"] == 3 and report["rejected"] == 14
    assert report["rejected_fraction"] == pytest.approx(14 / 17, abs=1e-6)
    assert report["rejected_by_reason"]["missing_id"] == 2
    assert report["rejected_by_reason"]["bad_label"] == 3


def test_text_that_is_not_a_string(workdir: Path, params: Params) -> None:
    write_posts([post("n", 12345), post("m", 678)], types={"text": pa.int64()})
    _, clean, rejected = run(params)
    assert clean.empty
    assert rejected["reason"].tolist() == ["bad_text", "bad_text"]
    assert rejected["text"].tolist() == ["12345", "678"]


def test_label_nan_in_a_float_column(workdir: Path, params: Params) -> None:
    write_posts([post("a", "x", label=1.0), post("b", "y", label=float("nan"))], types={"label": pa.float64()})
    _, clean, rejected = run(params)
    assert clean["id"].tolist() == ["a"] and clean["label"].tolist() == [1]
    assert rejected["reason"].tolist() == ["bad_label"] and rejected["label"].tolist() == ["nan"]


def test_duplicates_exact_normalised_and_conflicting(workdir: Path, params: Params) -> None:
    img = noise_image(7)
    a = save("a.png", img)
    a_copy = save("a_copy.png", img)  # other file, same bytes
    a_meta = save("a_meta.png", img, pnginfo=_png_text("comment", "re-saved"))  # same pixels, other bytes
    other = save("other.png", noise_image(8))
    write_posts([
        post("t1", "WIN a prize", label=1, sensitivity=0.5),
        post("t2", "WIN a prize", label=1, sensitivity=0.5),      # exact duplicate of t1
        post("t3", "ＷＩＮ  а prize!", label=1, sensitivity=0.5),   # full-width, Cyrillic а
        post("i1", "", a), post("i2", "", a_copy), post("i3", "", a_meta),
        post("i4", "", other),
        post("ti1", "see picture", a), post("ti2", "see picture", other),  # same text, other image
        post("c1", "Sorry, I'll call later", label=0),
        post("c2", "sorry i'll call later", label=1),             # conflicting labels
        post("c3", "SORRY I'LL CALL LATER", label=0),
    ])  # fmt: skip
    report, clean, rejected = run(params)

    assert sorted(clean["id"]) == ["i1", "i4", "t1", "ti1", "ti2"]
    by_id = rejected.set_index("id")
    for dup in ("t2", "t3"):
        assert by_id.loc[dup, "reason"] == "duplicate" and "t1" in by_id.loc[dup, "detail"]
    assert "exact duplicate of t1" in by_id.loc["t2", "detail"]
    assert "after normalisation" in by_id.loc["t3", "detail"]
    for dup in ("i2", "i3"):
        assert by_id.loc[dup, "reason"] == "duplicate" and "i1" in by_id.loc[dup, "detail"]
    for c in ("c1", "c2", "c3"):
        assert by_id.loc[c, "reason"] == "conflicting_labels"
        assert all(x in by_id.loc[c, "detail"] for x in ("c1", "c2", "c3"))
    assert report["duplicates"] == {"exact": 2, "normalised": 2, "conflicting_groups": 1, "conflicting_posts": 3}
    assert report["rejected_by_reason"] == {"duplicate": 4, "conflicting_labels": 3}


def _png_text(key: str, value: str) -> Any:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(key, value)
    return info


def test_report_counts_and_outputs(workdir: Path, params: Params) -> None:
    img = save("a.png", noise_image(0))
    img2 = save("b.png", noise_image(1))
    write_posts([
        post("a", "free money call now", label=1, sensitivity=0.8),
        post("b", "see you at 5", label=0),
        post("c", "", img, label=1, sensitivity=0.3),
        post("d", "nice photo", img2, label=0),
        post("e", "", ""),
    ])  # fmt: skip
    report, clean, rejected = run(params)

    assert report["total"] == 5 and report["accepted"] == 4 and report["rejected"] == 1
    assert report["threshold"] == params.validate.max_reject_fraction
    assert report["accepted_by_label"] == {"0": 2, "1": 2}
    assert report["accepted_by_slice_label"]["text_only"] == {"0": 1, "1": 1}
    assert report["accepted_by_slice_label"]["image_only"] == {"0": 0, "1": 1}
    assert report["accepted_by_slice_label"]["text_image"] == {"0": 1, "1": 0}
    assert report["data_version"] == "sha256:00112233aabbccdd"
    assert report["seconds"] >= 0
    assert json.loads(Path("reports/validation.json").read_text()) == report
    assert list(clean.columns) == list(COLUMNS)
    # The clean folder carries the snapshot's version on for the stages after it.
    from adfilter.versioning import data_version

    assert data_version("data/clean") == "sha256:00112233aabbccdd"


def test_threshold_failure_still_writes_quarantine_and_report(workdir: Path, params: Params) -> None:
    strict = dataclasses.replace(params, validate=dataclasses.replace(params.validate, max_reject_fraction=0.2))
    write_posts([post("a", "ok"), post("b", ""), post("c", "", label=0), post("d", "fine", label=7)])
    with pytest.raises(RejectThresholdExceeded) as info:
        validate(strict)
    message = str(info.value)
    assert "75.00%" in message and "20.00%" in message
    assert "empty_post (2)" in message and "bad_label (1)" in message
    assert "data/quarantine/rejected.parquet" in message
    assert len(pd.read_parquet("data/quarantine/rejected.parquet")) == 3
    saved = json.loads(Path("reports/validation.json").read_text())
    assert saved["rejected_fraction"] == pytest.approx(0.75) and saved["threshold"] == 0.2


def test_at_the_threshold_passes(workdir: Path, params: Params) -> None:
    strict = dataclasses.replace(params, validate=dataclasses.replace(params.validate, max_reject_fraction=0.25))
    write_posts([post("a", "ok"), post("b", ""), post("c", "fine"), post("d", "also fine")])
    assert validate(strict)["rejected_fraction"] == 0.25


def test_missing_column_fails_naming_it(workdir: Path, params: Params) -> None:
    pq.write_table(pa.table({"id": ["a"], "text": ["x"], "image": [""], "label": [0], "slice": ["text_only"]}),
                   RAW / "posts.parquet")  # fmt: skip
    with pytest.raises(ValidationError, match="lacks the column\\(s\\) sensitivity"):
        validate(params)


def test_unreadable_or_missing_file_fails(workdir: Path, params: Params) -> None:
    with pytest.raises(ValidationError, match="posts.parquet not found"):
        validate(params)
    (RAW / "posts.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(ValidationError, match="not a readable Parquet file"):
        validate(params)


def test_main_exits_non_zero_above_threshold(workdir: Path, repo_root: Path) -> None:
    from tasks.validate import main

    Path("params.yaml").write_text((repo_root / "params.yaml").read_text())
    write_posts([post("a", "ok"), post("b", "")])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 1
    assert Path("data/quarantine/rejected.parquet").is_file()
