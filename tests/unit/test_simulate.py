"""Scenario traffic: sizes, determinism, and that each scenario changes what it says it does."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from adfilter.config import load_params
from adfilter.features import normalize_text
from adfilter.simulate import (
    CAMERA,
    OBFUSCATED_TEXT,
    WATERMARK,
    ScenarioError,
    generate_posts,
    obfuscate_ad_text,
)

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = load_params(ROOT / "params.yaml", profile="ci").ingest.sample


@pytest.fixture(scope="module")
def posts() -> dict[str, list]:
    return {s: list(generate_posts(s, 60, seed=3, sample=SAMPLE))
            for s in ("stable", "new-ad-variant", "image-shift")}


def test_each_scenario_gives_n_posts_with_the_training_mix(posts: dict[str, list]) -> None:
    total = SAMPLE.n_text_only + SAMPLE.n_text_image + SAMPLE.n_image_only
    for scenario, items in posts.items():
        assert len(items) == 60, scenario
        assert len({p.id for p in items}) == 60
        image_only = sum(1 for p in items if p.image is not None and not p.text)
        assert image_only == round(60 * SAMPLE.n_image_only / total), scenario
        assert all(p.text or p.image is not None for p in items)
        assert {p.label for p in items} == {0, 1}


def test_the_same_seed_gives_the_same_posts(posts: dict[str, list]) -> None:
    again = list(generate_posts("new-ad-variant", 60, seed=3, sample=SAMPLE))
    assert [p.text for p in again] == [p.text for p in posts["new-ad-variant"]]
    for a, b in zip(again, posts["new-ad-variant"], strict=True):
        assert (a.image is None) == (b.image is None)
        if a.image is not None:
            assert np.array_equal(a.image, b.image)
    other = list(generate_posts("stable", 60, seed=4, sample=SAMPLE))
    assert [p.text for p in other] != [p.text for p in posts["stable"]]


def test_stable_changes_nothing(posts: dict[str, list]) -> None:
    assert {p.variant for p in posts["stable"]} == {""}


def test_new_ad_variant_changes_every_ad_and_nothing_else(posts: dict[str, list]) -> None:
    stable, variant = posts["stable"], posts["new-ad-variant"]
    for s, v in zip(stable, variant, strict=True):
        assert s.label == v.label and s.slice == v.slice  # the same plan, drawn the same way
        if v.label == 0:
            assert v.variant == "" and v.text == s.text
        else:
            assert v.variant, v
    assert any(OBFUSCATED_TEXT in p.variant for p in variant)
    assert any(WATERMARK in p.variant for p in variant)


def test_the_new_script_survives_the_normaliser() -> None:
    rng = random.Random(0)
    text = "FREE entry! Call 07781482378 now to claim your prize, txt WIN to 85069"
    obfuscated = obfuscate_ad_text(text, rng)
    norm = normalize_text(obfuscated)
    assert norm != normalize_text(text)
    # The number is neither a digit run nor a <phone> any more, so the old cue is gone.
    assert "<phone>" in normalize_text(text) and "<phone>" not in norm
    assert "07781482378" not in norm


def test_image_shift_changes_every_image_not_the_labels(posts: dict[str, list]) -> None:
    stable, shifted = posts["stable"], posts["image-shift"]
    for s, v in zip(stable, shifted, strict=True):
        assert s.text == v.text and s.label == v.label
        assert (s.image is None) == (v.image is None)
        if v.image is not None:
            assert v.variant == CAMERA
            assert v.image.shape == s.image.shape
            assert np.abs(v.image.astype(int) - s.image.astype(int)).mean() > 10


def test_unknown_scenario_is_named() -> None:
    with pytest.raises(ScenarioError, match="known scenarios: stable, new-ad-variant, image-shift"):
        next(generate_posts("holiday-rush", 5, seed=0, sample=SAMPLE))


def test_traffic_leaves_out_the_texts_it_is_told_to(posts: dict[str, list], tmp_path: Path) -> None:
    import pandas as pd

    from serving.simulate import unseen_texts

    seen = [p.text for p in posts["stable"] if p.text]
    table = tmp_path / "train.parquet"
    pd.DataFrame({"text": [*seen, None, ""]}).to_parquet(table)
    exclude = unseen_texts(str(table))
    assert exclude == frozenset(seen)
    fresh = list(generate_posts("stable", 60, seed=3, sample=SAMPLE, exclude_texts=exclude))
    assert len(fresh) == 60 and not {p.text for p in fresh if p.text} & exclude
    assert unseen_texts("") == frozenset() == unseen_texts(str(tmp_path / "missing.parquet"))
