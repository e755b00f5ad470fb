"""The split stage: duplicate groups never cross splits, strata follow the ratios, seeds repeat."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance

from adfilter.config import Params, load_params
from adfilter.schema import COLUMNS
from tasks.split import (
    SplitError,
    assign_splits,
    duplicate_groups,
    folds_for,
    near_duplicate_pairs,
    split,
)

CLEAN = Path("data/clean")
IMAGES = Path("data/raw/images")


@pytest.fixture
def params(repo_root: Path) -> Params:
    return load_params(repo_root / "params.yaml", profile="ci")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    IMAGES.mkdir(parents=True)
    CLEAN.mkdir(parents=True)
    (CLEAN / "manifest.json").write_text(json.dumps({"data_version": "sha256:feedfacecafebeef"}))
    return tmp_path


def smooth_image(seed: int, size: int = 64) -> Image.Image:
    """A random but photo-like (smooth) image: distinct seeds give distant perceptual hashes."""
    coarse = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)


def save(img: Image.Image, name: str, fmt: str = "PNG", **kw: Any) -> str:
    path = IMAGES / name
    img.save(path, format=fmt, **kw)
    return path.as_posix()


def recompressed(img: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=40)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def brightened(img: Image.Image) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(1.2)


def write_clean(rows: list[dict[str, Any]]) -> None:
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    frame["label"] = frame["label"].astype("int64")
    frame["sensitivity"] = frame["sensitivity"].astype("float64")
    frame.to_parquet(CLEAN / "posts.parquet", index=False)


def post(id: str, text: str = "", image: str = "", label: int = 0) -> dict[str, Any]:
    slice_ = "text_image" if text and image else "image_only" if image else "text_only"
    return {"id": id, "text": text, "image": image, "label": label,
            "sensitivity": 0.5 * label, "slice": slice_}  # fmt: skip


def read_splits() -> pd.DataFrame:
    parts = [pd.read_parquet(f"data/split/{s}.parquet").assign(split=s) for s in ("train", "val", "test")]
    return pd.concat(parts, ignore_index=True)


def mixed_posts(n_text: int = 240, n_image: int = 120, n_both: int = 60) -> list[dict[str, Any]]:
    rows = []
    for i in range(n_text):
        rows.append(post(f"t{i}", f"message {i} about topic {i % 7}", label=int(i % 4 == 0)))
    for i in range(n_image):
        rows.append(post(f"i{i}", image=save(smooth_image(1000 + i), f"i{i}.png"), label=int(i % 3 == 0)))
    for i in range(n_both):
        rows.append(post(f"b{i}", f"look at picture {i}", save(smooth_image(5000 + i), f"b{i}.png"),
                         label=int(i % 2 == 0)))  # fmt: skip
    return rows


def test_near_duplicate_images_and_repeated_texts_stay_together(workdir: Path, params: Params) -> None:
    rows = mixed_posts()
    base = smooth_image(42)
    variants = {"orig": base, "jpeg": recompressed(base), "bright": brightened(base),
                "small": base.resize((48, 48))}  # fmt: skip
    # The test only means something if the variants are near in pHash and far from the others.
    ref = imagehash.phash(base)
    assert all(ref - imagehash.phash(v) <= params.split.phash_max_distance for v in variants.values())
    assert ref - imagehash.phash(smooth_image(1000)) > params.split.phash_max_distance
    for name, img in variants.items():
        rows.append(post(f"near_{name}", image=save(img, f"near_{name}.png"), label=1))
    rows.append(post("near_text", "a caption", save(variants["jpeg"], "near_text.jpg", fmt="JPEG"), label=1))
    for i, text in enumerate(["ok", "OK", "ok!!", "Ok.", "ｏｋ", "ok 👍"]):
        rows.append(post(f"ok{i}", text))
    for i, text in enumerate(["Sorry, I'll call later", "sorry i'll call later", "SORRY I'LL CALL LATER!"]):
        rows.append(post(f"sorry{i}", text))
    write_clean(rows)

    report = split(params)
    out = read_splits()

    assert len(out) == len(rows) and set(out["id"]) == {r["id"] for r in rows}
    assert list(out.columns[:-1]) == [*COLUMNS, "group"]
    for prefix, size in (("near_", 5), ("ok", 6), ("sorry", 3)):
        members = out[out["id"].str.startswith(prefix)]
        assert len(members) == size
        assert members["group"].nunique() == 1, members[["id", "group"]]
        assert members["split"].nunique() == 1, members[["id", "split"]]
    assert (out.groupby("group")["split"].nunique() == 1).all()
    assert report["no_group_crosses_splits"] is True and report["groups_crossing_splits"] == 0
    groups = report["groups"]
    assert groups["largest"] == 6
    assert groups["multi_member_groups"] == 3 and groups["posts_in_multi_member_groups"] == 14
    assert groups["count"] == len(rows) - 14 + 3
    assert groups["text_links"] == 5 + 2
    assert 4 <= groups["image_links"] <= 10  # five images joined: a tree at least, all pairs at most


def test_stratified_by_label_and_slice(workdir: Path, params: Params) -> None:
    write_clean(mixed_posts())
    report = split(params)
    out = read_splits()

    n = len(out)
    for name, ratio in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        assert abs(report["sizes"][name] / n - ratio) < 0.02, report["sizes"]
    for (slice_, label), part in out.groupby(["slice", "label"]):
        shares = part["split"].value_counts(normalize=True)
        assert abs(shares.get("train", 0) - 0.7) < 0.06, (slice_, label, shares)
        assert abs(shares.get("test", 0) - 0.15) < 0.06, (slice_, label, shares)
    assert report["stratification"]["max_abs_deviation"] < 0.06
    assert sum(report["sizes"].values()) == n == report["posts"]
    assert sum(report["labels"]["train"].values()) == report["sizes"]["train"]
    assert report["slices"]["val"] == out[out["split"] == "val"]["slice"].value_counts().sort_index().to_dict()
    assert report["data_version"] == "sha256:feedfacecafebeef"
    assert json.loads(Path("data/split/manifest.json").read_text())["data_version"] == "sha256:feedfacecafebeef"
    assert json.loads(Path("reports/split.json").read_text()) == report


def test_same_seed_same_split_other_seed_other_split(workdir: Path, params: Params) -> None:
    write_clean(mixed_posts(n_image=30, n_both=10))
    split(params)
    first = read_splits().sort_values("id").reset_index(drop=True)
    split(params)
    again = read_splits().sort_values("id").reset_index(drop=True)
    pd.testing.assert_frame_equal(first, again)
    split(dataclasses.replace(params, seed=params.seed + 1))
    other = read_splits().sort_values("id").reset_index(drop=True)
    assert (first["split"] != other["split"]).mean() > 0.1


def test_banding_finds_exactly_the_pairs_brute_force_finds() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 300, dtype=np.int64).astype(np.uint64)
    # Plant neighbours at distances 1..6 so that pairs exist on both sides of the threshold.
    extra = []
    for k, h in enumerate(base[:60]):
        bits = rng.choice(64, size=1 + k % 6, replace=False)
        extra.append(int(h) ^ int(sum(1 << int(b) for b in bits)))
    hashes = np.concatenate([base, np.array(extra, dtype=np.uint64)])
    for d in (0, 2, 4, 7):
        dist = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
        ii, jj = np.nonzero(np.triu(dist <= d, k=1))
        expected = set(zip(ii.tolist(), jj.tolist(), strict=True))
        got = set(map(tuple, near_duplicate_pairs(hashes, d).tolist()))
        assert got == expected, d
        assert d < 2 or len(expected) > 0


def test_groups_are_connected_components_in_order_of_appearance() -> None:
    fps = ["a", "", "b", "a", "", "c"]
    hashes = np.array([0, 0b1, 0, 0, 0b111 << 20, 0b11], dtype=np.uint64)
    has_image = np.array([False, True, False, False, True, True])
    groups, links = duplicate_groups(fps, hashes, has_image, max_distance=1)
    # post 1 (hash 1) and post 5 (hash 3) are 1 bit apart; post 4 is far from both
    assert groups.tolist() == [0, 1, 2, 0, 3, 1]
    assert links == {"text": 1, "image": 1}


def test_a_big_group_goes_whole_and_is_warned_about(
    workdir: Path, params: Params, caplog: pytest.LogCaptureFixture
) -> None:
    rows = mixed_posts(n_image=0, n_both=0) + [post(f"k{i}", "ok") for i in range(30)]
    write_clean(rows)
    with caplog.at_level(logging.WARNING, logger="tasks.split"):
        report = split(params)
    assert report["groups"]["largest"] == 30 and report["groups"]["largest_group_warning"] is True
    assert "largest duplicate group holds 30 posts" in caplog.text
    assert read_splits().query("id.str.startswith('k')", engine="python")["split"].nunique() == 1


def test_folds_and_bad_ratios(params: Params) -> None:
    assert folds_for({"train": 0.7, "val": 0.15, "test": 0.15}) == 20
    assert folds_for({"train": 0.8, "val": 0.1, "test": 0.1}) == 10
    assert folds_for({"train": 0.6, "val": 0.2, "test": 0.2}) == 5
    bad = dataclasses.replace(params, split=dataclasses.replace(params.split, train=0.8))
    with pytest.raises(SplitError, match="add up to 1"):
        split(bad, clean_dir=Path("/nonexistent"))


def test_too_few_groups_fails_clearly() -> None:
    strata = np.array(["text_only|0"] * 10)
    with pytest.raises(SplitError, match="fewer than the 20 folds"):
        assign_splits(strata, np.arange(10) % 5, {"train": 0.7, "val": 0.15, "test": 0.15}, 20, 0)


def test_missing_clean_file_names_the_stage(workdir: Path, params: Params) -> None:
    with pytest.raises(SplitError, match="run the validate stage first"):
        split(params)
