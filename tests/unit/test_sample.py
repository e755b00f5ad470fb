"""The embedded sample: determinism, counts, sensitivity rule, images, renderers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import imagehash
import numpy as np
import pandas as pd
import pytest

from adfilter.config import SampleParams
from adfilter.imageio import read_image
from adfilter.sample import (
    AD_STYLES,
    CATEGORIES,
    HARD_NEGATIVE_KINDS,
    SENSITIVITY,
    build_sample,
    load_backgrounds,
    load_sms_corpus,
    make_background,
    render_ad_image,
    render_clean_image,
    sensitivity_of,
    text_category,
)
from adfilter.sample.build import plan_sample
from adfilter.schema import COLUMNS, HIDDEN_IMAGE_AD, IMAGE_ONLY, TEXT_IMAGE, TEXT_ONLY

TINY = SampleParams(
    n_text_only=40,
    n_text_image=30,
    n_image_only=30,
    hidden_image_ad_fraction=0.3,
    spam_text_ad_image_fraction=0.5,
    image_ad_fraction=0.4,
    hard_negative_fraction=0.5,
    image_size=64,
    max_texts=300,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path]:
    out = tmp_path_factory.mktemp("sample")
    return build_sample(TINY, seed=3, out_dir=out), out


@pytest.fixture(scope="module")
def corpus() -> pd.DataFrame:
    return load_sms_corpus()


def test_corpus_is_the_deduplicated_sms_collection(corpus: pd.DataFrame) -> None:
    assert 4400 < len(corpus) < 4600
    assert 540 < int(corpus["label"].sum()) < 580
    assert not corpus["text"].duplicated().any()
    assert set(corpus.loc[corpus["label"] == 0, "category"]) == {"ham"}
    assert set(corpus.loc[corpus["label"] == 1, "category"]) <= set(CATEGORIES)


@pytest.mark.parametrize(
    ("text", "category"),
    [
        ("WINNER!! You have been selected to receive a £900 prize. Claim code KL341", "prize"),
        ("Hot singles in your area want to chat, text SEXY to 69698", "adult"),
        ("Loans for any purpose even if you have Bad Credit! Call 0871", "loan"),
        ("Online casino: 100 free spins for new players", "gambling"),
        ("Get the latest ringtones weekly, txt TONE to 87077", "promotion"),
    ],
)
def test_text_category_keyword_rules(text: str, category: str) -> None:
    assert text_category(text) == category


def test_same_seed_gives_identical_posts_and_image_bytes(
    built: tuple[pd.DataFrame, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, first_dir = built
    again = build_sample(TINY, seed=3, out_dir=tmp_path)

    def strip(df: pd.DataFrame, root: Path) -> pd.DataFrame:
        return df.assign(image=df["image"].str.replace(root.as_posix(), "", regex=False))

    pd.testing.assert_frame_equal(strip(first, first_dir), strip(again, tmp_path))
    names = sorted(p.name for p in (first_dir / "images").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "images").iterdir())
    for name in names:
        assert (first_dir / "images" / name).read_bytes() == (
            tmp_path / "images" / name
        ).read_bytes(), name

    other = plan_sample(TINY, seed=4)
    assert not other["text"].equals(first["text"])


def test_counts_by_slice_and_label_follow_params(
    built: tuple[pd.DataFrame, Path], corpus: pd.DataFrame
) -> None:
    posts, _ = built
    counts = posts["slice"].value_counts()
    n_hidden = round(TINY.hidden_image_ad_fraction * TINY.n_text_image)
    assert counts[TEXT_ONLY] == TINY.n_text_only
    assert counts[IMAGE_ONLY] == TINY.n_image_only
    assert counts[HIDDEN_IMAGE_AD] == n_hidden
    assert counts[TEXT_IMAGE] == TINY.n_text_image - n_hidden
    assert len(posts) == TINY.n_text_only + TINY.n_text_image + TINY.n_image_only
    assert posts["id"].is_unique

    image_only = posts[posts["slice"] == IMAGE_ONLY]
    assert image_only["label"].sum() == round(TINY.image_ad_fraction * TINY.n_image_only)
    assert (image_only["text"] == "").all()
    assert (posts.loc[posts["slice"] == HIDDEN_IMAGE_AD, "label"] == 1).all()

    spam_share = corpus["label"].mean()
    text_only = posts[posts["slice"] == TEXT_ONLY]
    assert abs(text_only["label"].mean() - spam_share) < 0.06
    assert (text_only["image"] == "").all()

    clean = posts[posts["image_category"] == "clean"]
    hard = clean["image_style"].isin(HARD_NEGATIVE_KINDS)
    assert hard.sum() == round(TINY.hard_negative_fraction * len(clean))
    assert set(clean.loc[~hard, "image_style"]) == {"plain"}
    spam_paired = posts[(posts["slice"] == TEXT_IMAGE) & (posts["text_category"] != "ham")]
    assert (spam_paired["image_category"] != "clean").sum() == round(
        TINY.spam_text_ad_image_fraction * len(spam_paired)
    )


def test_texts_are_real_sms_with_their_labels(
    built: tuple[pd.DataFrame, Path], corpus: pd.DataFrame
) -> None:
    posts, _ = built
    labels = dict(zip(corpus["text"], corpus["label"], strict=True))
    with_text = posts[posts["text"] != ""]
    assert with_text["text"].is_unique
    assert with_text["text"].isin(labels).all()
    hidden = posts[posts["slice"] == HIDDEN_IMAGE_AD]
    assert len(hidden) > 0
    assert all(labels[t] == 0 for t in hidden["text"]), "hidden_image_ad posts must carry ham text"
    assert (hidden["text_category"] == "ham").all()
    assert (~hidden["image_category"].isin(["clean", ""])).all()
    text_only = posts[posts["slice"] == TEXT_ONLY]
    assert (text_only["label"] == text_only["text"].map(labels)).all()


def test_sensitivity_rule(built: tuple[pd.DataFrame, Path]) -> None:
    posts, _ = built
    ads, clean = posts[posts["label"] == 1], posts[posts["label"] == 0]
    assert len(ads) > 0 and len(clean) > 0
    assert (ads["sensitivity"] >= 0.3).all()
    assert (clean["sensitivity"] == 0.0).all()
    assert posts["sensitivity"].between(0.0, 1.0).all()
    expected = [
        max(sensitivity_of(t), sensitivity_of(i))
        for t, i in zip(posts["text_category"], posts["image_category"], strict=True)
    ]
    assert posts["sensitivity"].tolist() == expected
    assert min(SENSITIVITY.values()) >= 0.3
    assert (
        SENSITIVITY["promotion"]
        < 0.5
        <= SENSITIVITY["contact"]
        < 0.8
        <= min(SENSITIVITY[c] for c in ("adult", "gambling", "prize", "loan"))
    )


def test_images_decode_and_lie_under_images(built: tuple[pd.DataFrame, Path]) -> None:
    posts, out = built
    assert list(posts.columns[: len(COLUMNS)]) == list(COLUMNS)
    with_image = posts[posts["image"] != ""]
    assert len(with_image) == TINY.n_text_image + TINY.n_image_only
    for ref, post_id in zip(with_image["image"], with_image["id"], strict=True):
        path = Path(ref)
        assert path.parent == out / "images" and path.stem == post_id
        assert path.suffix in (".jpg", ".png")
        rgb = read_image(path)
        assert rgb.shape == (TINY.image_size, TINY.image_size, 3)
    assert len(list((out / "images").iterdir())) == len(with_image)


def test_asking_for_more_texts_than_exist_names_the_params() -> None:
    too_many = dataclasses.replace(TINY, max_texts=50)
    with pytest.raises(ValueError, match="max_texts"):
        plan_sample(too_many, seed=0)


@pytest.mark.parametrize("style", AD_STYLES)
def test_every_ad_style_draws_on_the_background(style: str) -> None:
    backgrounds = load_backgrounds()
    for k, category in enumerate(CATEGORIES):
        rng = np.random.default_rng([11, k])
        _, background = make_background(rng, backgrounds, 96)
        img = render_ad_image(rng, background, category, style)
        assert img.mode == "RGB" and img.size == (96, 96)
        changed = (
            np.abs(np.asarray(img, np.int16) - np.asarray(background, np.int16)).max(axis=2) > 30
        )
        assert changed.mean() > 0.002, (style, category)


@pytest.mark.parametrize("kind", HARD_NEGATIVE_KINDS)
def test_hard_negatives_draw_and_plain_images_do_not(kind: str) -> None:
    rng = np.random.default_rng(5)
    _, background = make_background(rng, load_backgrounds(), 96)
    assert np.array_equal(
        np.asarray(render_clean_image(rng, background, hard_negative=False)), np.asarray(background)
    )
    img = render_clean_image(rng, background, hard_negative=True, kind=kind)
    assert img.size == (96, 96)
    assert not np.array_equal(np.asarray(img), np.asarray(background))


def test_unknown_category_or_style_is_refused() -> None:
    rng = np.random.default_rng(0)
    _, background = make_background(rng, load_backgrounds(), 64)
    with pytest.raises(ValueError, match="known: "):
        render_ad_image(rng, background, "crypto", "banner")
    with pytest.raises(ValueError, match="known: "):
        render_ad_image(rng, background, "prize", "hologram")


@pytest.mark.parametrize("size", [128, 224])
def test_qr_ads_decode_with_opencv(size: int) -> None:
    backgrounds = load_backgrounds()
    detector = cv2.QRCodeDetector()
    decoded = 0
    n = 16
    for k in range(n):
        rng = np.random.default_rng([size, k])
        _, background = make_background(rng, backgrounds, size)
        img = render_ad_image(rng, background, CATEGORIES[k % len(CATEGORIES)], "qr")
        data, _, _ = detector.detectAndDecode(np.asarray(img))
        decoded += bool(data)
    assert decoded / n >= 0.7


def test_backgrounds_are_not_perceptual_near_duplicates() -> None:
    backgrounds = load_backgrounds()
    hashes = []
    for k in range(150):
        _, img = make_background(np.random.default_rng([21, k]), backgrounds, 96)
        hashes.append(imagehash.phash(img))
    distances = np.array([a - b for i, a in enumerate(hashes) for b in hashes[i + 1 :]])
    assert (distances <= 4).mean() < 0.002
