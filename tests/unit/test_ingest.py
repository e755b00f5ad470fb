"""The ingest stage: the sample snapshot and the user's own CSV, JSONL or Parquet posts."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from adfilter.config import Params, PathSourceParams, load_params
from adfilter.imageio import read_image
from adfilter.schema import COLUMNS, IMAGE_ONLY, SLICES, TEXT_IMAGE, TEXT_ONLY
from adfilter.versioning import content_hash, data_version
from tasks.ingest import IngestError, ingest


@pytest.fixture(scope="module")
def ci_params(repo_root: Path) -> Params:
    params = load_params(repo_root / "params.yaml", profile="ci")
    tiny = dataclasses.replace(
        params.ingest.sample, n_text_only=20, n_text_image=16, n_image_only=12, image_size=48
    )
    return dataclasses.replace(
        params, ingest=dataclasses.replace(params.ingest, source="sample", sample=tiny)
    )


def with_path_source(
    params: Params, file: Path, columns: dict[str, str], fmt: str = "auto"
) -> Params:
    source = PathSourceParams(file=str(file), format=fmt, columns=columns)
    return dataclasses.replace(
        params, ingest=dataclasses.replace(params.ingest, source="path", path=source)
    )


# --------------------------------------------------------------------------- sample


def test_sample_snapshot_is_reproducible_and_versioned(
    ci_params: Params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    out = Path("data/raw")
    posts = ingest(ci_params, out)
    first_bytes = (out / "posts.parquet").read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())

    table = pd.read_parquet(out / "posts.parquet")
    assert list(table.columns) == list(COLUMNS)
    pd.testing.assert_frame_equal(table, posts)
    assert table["label"].dtype == np.int64 and table["sensitivity"].dtype == np.float64
    assert table["image"].str.startswith("data/raw/images/").sum() == 16 + 12
    for ref in table.loc[table["image"] != "", "image"]:
        read_image(ref)  # relative to the repository root (here: the working directory)

    files = [out / "posts.parquet", *sorted((out / "images").iterdir())]
    assert manifest["data_version"] == "sha256:" + content_hash(files, out)[:16]
    assert data_version(out) == manifest["data_version"]
    assert manifest["source"] == "sample" and manifest["seed"] == ci_params.seed
    assert manifest["counts"]["posts"] == len(table) == 48
    for name in SLICES:
        in_slice = table[table["slice"] == name]
        assert manifest["counts"]["by_slice"][name]["total"] == len(in_slice)
        assert manifest["counts"]["by_slice"][name].get("1", 0) == int(in_slice["label"].sum())

    (out / "images" / "stale.png").write_bytes(b"left over from an older run")
    ingest(ci_params, out)
    assert not (out / "images" / "stale.png").exists()
    assert (out / "posts.parquet").read_bytes() == first_bytes
    # The whole manifest too (no timings in it), so a rebuild keeps the snapshot's DVC hash.
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_refuses_to_clear_the_project(
    ci_params: Params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "params.yaml").write_text("profile: default\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(IngestError, match="refusing to clear"):
        ingest(ci_params, Path("."))
    assert (tmp_path / "params.yaml").exists()


def test_main_builds_data_raw_from_params_yaml(repo_root: Path, tmp_path: Path) -> None:
    text = (repo_root / "params.yaml").read_text().replace("profile: default", "profile: ci", 1)
    (tmp_path / "params.yaml").write_text(text)
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    result = subprocess.run(
        [sys.executable, "-m", "tasks.ingest"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "data/raw/manifest.json").read_text())
    ci = load_params(tmp_path / "params.yaml").ingest.sample
    assert manifest["counts"]["posts"] == ci.n_text_only + ci.n_text_image + ci.n_image_only
    assert "hidden_image_ad" in result.stderr  # counts by slice are logged


# --------------------------------------------------------------------------- source: path


def _user_data(folder: Path) -> pd.DataFrame:
    """Posts the way a user might keep them: their own column names, images in a subfolder."""
    (folder / "pics").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg"):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
            folder / "pics" / name
        )
    return pd.DataFrame(
        {
            "post": ["u1", "u2", "u3", "u4"],
            "message": ["Call 0800 123 4567 to WIN", "see you at 6", "", "lunch?"],
            "picture": ["pics/a.png", "", "pics/b.jpg", "pics/missing.png"],
            "spam": [1, 0, 1, 0],
        }
    )


def _write(table: pd.DataFrame, path: Path) -> None:
    if path.suffix == ".csv":
        table.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        table.to_json(path, orient="records", lines=True)
    else:
        table.to_parquet(path, index=False)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_path_source_maps_columns_and_copies_images(
    ci_params: Params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    monkeypatch.chdir(tmp_path)
    user = tmp_path / "mine"
    table = _user_data(user)
    _write(table, user / f"posts{suffix}")
    params = with_path_source(
        ci_params,
        Path("mine") / f"posts{suffix}",
        {"text": "message", "image": "picture", "label": "spam"},
    )

    posts = ingest(params, Path("data/raw"))

    stored = pd.read_parquet("data/raw/posts.parquet")
    pd.testing.assert_frame_equal(stored, posts)
    assert list(stored.columns) == list(COLUMNS)
    assert stored["id"].tolist() == ["p000000", "p000001", "p000002", "p000003"]
    assert stored["text"].tolist() == table["message"].tolist()
    assert stored["label"].tolist() == [1, 0, 1, 0] and stored["label"].dtype == np.int64
    assert stored["sensitivity"].tolist() == [0.5, 0.0, 0.5, 0.0]
    assert stored["slice"].tolist() == [TEXT_IMAGE, TEXT_ONLY, IMAGE_ONLY, TEXT_IMAGE]
    assert stored["image"].tolist()[:3] == [
        "data/raw/images/p000000.png",
        "",
        "data/raw/images/p000002.jpg",
    ]
    assert Path(stored["image"][0]).read_bytes() == (user / "pics/a.png").read_bytes()
    read_image(stored["image"][2])
    # A missing image keeps the path as written: validate quarantines it as image_missing.
    assert stored["image"][3] == "pics/missing.png"
    manifest = json.loads(Path("data/raw/manifest.json").read_text())
    assert manifest["path"]["images_copied"] == 2 and manifest["path"]["images_missing"] == 1
    assert manifest["counts"]["images"] == 3
    assert sorted(p.name for p in Path("data/raw/images").iterdir()) == [
        "p000000.png",
        "p000002.jpg",
    ]


def test_optional_columns_and_text_only_files(
    ci_params: Params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    pd.DataFrame(
        {
            "key": [10, 11],
            "body": ["hi", "WIN cash"],
            "y": [0, 1],
            "risk": [0.0, 0.9],
            "s": ["text_only", "text_only"],
        }
    ).to_json(tmp_path / "texts.jsonl", orient="records", lines=True)
    columns = {"id": "key", "text": "body", "label": "y", "sensitivity": "risk", "slice": "s"}
    posts = ingest(with_path_source(ci_params, tmp_path / "texts.jsonl", columns), tmp_path / "raw")
    assert posts["id"].tolist() == ["10", "11"]
    assert posts["sensitivity"].tolist() == [0.0, 0.9]
    assert (posts["image"] == "").all() and (posts["slice"] == TEXT_ONLY).all()


def test_wrong_typed_label_is_kept_as_written(ci_params: Params, tmp_path: Path) -> None:
    pd.DataFrame({"text": ["a", "b", "c"], "label": ["1", "yes", "0"]}).to_csv(
        tmp_path / "p.csv", index=False
    )
    posts = ingest(
        with_path_source(ci_params, tmp_path / "p.csv", {"text": "text", "label": "label"}),
        tmp_path / "raw",
    )
    stored = pd.read_parquet(tmp_path / "raw/posts.parquet")
    assert stored["label"].tolist() == ["1", "yes", "0"] == posts["label"].tolist()
    assert stored["sensitivity"].tolist() == [0.5, 0.0, 0.0]


def test_missing_mapped_column_fails_naming_file_and_column(
    ci_params: Params, tmp_path: Path
) -> None:
    pd.DataFrame({"text": ["a"], "label": [0]}).to_csv(tmp_path / "p.csv", index=False)
    params = with_path_source(
        ci_params, tmp_path / "p.csv", {"text": "text", "image": "photo", "label": "label"}
    )
    with pytest.raises(
        IngestError, match=r"p\.csv: no column 'photo' \(ingest\.path\.columns\.image\)"
    ):
        ingest(params, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"text": "text"}, "'label' must name"),
        ({"label": "label"}, "at least one of 'text' and 'image'"),
        ({"text": "text", "label": "label", "txt": "x"}, "unknown name 'txt'"),
    ],
)
def test_bad_mapping_fails(
    ci_params: Params, tmp_path: Path, columns: dict[str, str], message: str
) -> None:
    pd.DataFrame({"text": ["a"], "label": [0]}).to_csv(tmp_path / "p.csv", index=False)
    with pytest.raises(IngestError, match=message):
        ingest(with_path_source(ci_params, tmp_path / "p.csv", columns), tmp_path / "raw")


def test_missing_or_unreadable_file_fails_naming_it(ci_params: Params, tmp_path: Path) -> None:
    columns = {"text": "text", "label": "label"}
    with pytest.raises(IngestError, match=r"nope\.csv does not exist"):
        ingest(with_path_source(ci_params, tmp_path / "nope.csv", columns), tmp_path / "raw")
    (tmp_path / "broken.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(IngestError, match=r"cannot read .*broken\.parquet as PARQUET"):
        ingest(with_path_source(ci_params, tmp_path / "broken.parquet", columns), tmp_path / "raw")
    (tmp_path / "posts.xlsx").write_bytes(b"")
    with pytest.raises(IngestError, match="cannot tell the format"):
        ingest(with_path_source(ci_params, tmp_path / "posts.xlsx", columns), tmp_path / "raw")


def test_data_inside_the_snapshot_folder_is_refused(ci_params: Params, tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    pd.DataFrame({"text": ["a"], "label": [0]}).to_csv(tmp_path / "raw" / "p.csv", index=False)
    with pytest.raises(IngestError, match="which ingest rebuilds"):
        ingest(
            with_path_source(
                ci_params, tmp_path / "raw" / "p.csv", {"text": "text", "label": "label"}
            ),
            tmp_path / "raw",
        )
    assert (tmp_path / "raw" / "p.csv").exists()
    shutil.rmtree(tmp_path / "raw")


def test_images_inside_the_snapshot_folder_are_refused(ci_params: Params, tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "raw" / "old.png")
    pd.DataFrame({"image": ["raw/old.png"], "label": [1]}).to_csv(tmp_path / "p.csv", index=False)
    params = with_path_source(ci_params, tmp_path / "p.csv", {"image": "image", "label": "label"})
    with pytest.raises(IngestError, match=r"row 0: image raw/old\.png lies inside"):
        ingest(params, tmp_path / "raw")
    assert (tmp_path / "raw" / "old.png").exists()
