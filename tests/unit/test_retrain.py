"""Merging feedback and new variants into the next snapshot's source (tasks.retrain)."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from adfilter.config import Params, load_params
from adfilter.schema import COLUMNS
from tasks.retrain import merge_feedback, read_feedback_labels

ROOT = Path(__file__).resolve().parents[2]


def _params(tmp: Path, rendered: int = 2) -> Params:
    p = load_params(ROOT / "params.yaml", profile="ci")
    retrain = dataclasses.replace(p.register.retrain, feedback_store=f"sqlite:///{tmp / 'store.db'}",
                                  variants_dir=str(tmp / "variants"), incoming_dir=str(tmp / "incoming"),
                                  rendered_variants=rendered)
    sample = dataclasses.replace(p.ingest.sample, image_size=64)
    return dataclasses.replace(p, register=dataclasses.replace(p.register, retrain=retrain),
                               ingest=dataclasses.replace(p.ingest, sample=sample))


@pytest.fixture
def snapshot(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(raw / "images" / "p2.png")
    pd.DataFrame({
        "id": ["p0", "p1", "p2"], "text": ["hello there", "WIN cash now, call 0800", ""],
        "image": ["", "", str(raw / "images" / "p2.png")], "label": [0, 1, 0],
        "sensitivity": [0.0, 0.9, 0.0], "slice": ["text_only", "text_only", "image_only"],
    }).to_parquet(raw / "posts.parquet", index=False)
    return raw


def _store(tmp: Path, rows: list[tuple[str, int, int]]) -> None:
    from serving.store import create_tables, feedback, make_engine

    engine = make_engine(f"sqlite:///{tmp / 'store.db'}")
    create_tables(engine)
    t0 = datetime(2026, 12, 1)
    with engine.begin() as conn:
        conn.execute(feedback.insert(), [
            {"request_id": f"r{i}", "post_id": pid, "label": label,
             "created_at": t0 + timedelta(minutes=minute), "moderator": "m"}
            for i, (pid, label, minute) in enumerate(rows)
        ])
    engine.dispose()


def test_latest_label_per_post_wins(tmp_path: Path) -> None:
    _store(tmp_path, [("p0", 1, 1), ("p0", 0, 5), ("p9", 1, 2)])
    labels = read_feedback_labels(f"sqlite:///{tmp_path / 'store.db'}")
    assert dict(zip(labels["post_id"], labels["label"], strict=True)) == {"p0": 0, "p9": 1}
    assert read_feedback_labels(f"sqlite:///{tmp_path / 'absent.db'}").empty


def test_merge_relabels_adds_variants_and_renders_new_ads(tmp_path: Path, snapshot: Path) -> None:
    _store(tmp_path, [("p0", 1, 1), ("v-new", 1, 2), ("ghost", 0, 3)])
    variants = tmp_path / "variants"
    (variants / "img").mkdir(parents=True)
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(variants / "img" / "a.png")
    pd.DataFrame({"id": ["v-lab", "v-new", "v-none"], "text": ["add me on wechat xy_88", "", "??"],
                  "image": ["", "img/a.png", ""], "label": [1, None, None]}).to_csv(
        variants / "batch.csv", index=False)

    report = merge_feedback(_params(tmp_path), raw_dir=snapshot, seed=7)

    merged = pd.read_parquet(tmp_path / "incoming" / "posts.parquet")
    assert list(merged.columns) == list(COLUMNS)
    by_id = merged.set_index("id")
    assert by_id.loc["p0", "label"] == 1 and by_id.loc["p0", "sensitivity"] == 0.5  # relabelled
    assert by_id.loc["p1", "label"] == 1                                              # unchanged
    assert by_id.loc["v-lab", "label"] == 1 and by_id.loc["v-new", "label"] == 1      # from feedback
    assert "v-none" not in by_id.index
    assert by_id.loc["v-new", "slice"] == "image_only"
    rendered = [i for i in merged["id"] if i.startswith("v7_")]
    assert len(rendered) == 2 and (by_id.loc[rendered, "label"] == 1).all()
    for image in merged["image"]:
        if image:
            assert not Path(image).is_absolute() and (tmp_path / "incoming" / image).is_file()
    assert report == {**report, "posts": 7, "from_snapshot": 3, "feedback_labels": 3, "relabelled": 1,
                      "unmatched_feedback": 1, "new_labelled_posts": 2, "unlabelled_variants_skipped": 1,
                      "rendered_variants": 2}


def test_merged_file_is_an_ingest_source(tmp_path: Path, snapshot: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.ingest import ingest

    params = _params(tmp_path, rendered=1)
    merge_feedback(params, raw_dir=snapshot, seed=3)
    path = dataclasses.replace(params.ingest.path, file=str(tmp_path / "incoming" / "posts.parquet"),
                               format="parquet", columns={c: c for c in COLUMNS})
    params = dataclasses.replace(params, ingest=dataclasses.replace(params.ingest, source="path", path=path))
    monkeypatch.chdir(tmp_path)
    posts = ingest(params, out_dir=tmp_path / "data" / "raw")
    assert len(posts) == 4 and set(posts["id"]) == {"p0", "p1", "p2", "v3_0000"}
    assert all((tmp_path / p).is_file() for p in posts["image"] if p)
