"""The augment stage end to end on tiny synthetic posts: a real fitted FeaturePipeline, real
textattack, the real v2 pipeline, GAN, held-out slice and the proxy ablation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from adfilter.augment import (
    ADDED_SOURCES,
    GAN,
    IMAGE_TRANSFORM,
    OBFUSCATION,
    ORIGINAL,
    SOURCES,
    TEXT_ATTACK,
)
from adfilter.config import FeaturizeParams, ImageFeatureParams, TextFeatureParams, load_params
from adfilter.features import FeaturePipeline
from adfilter.schema import HIDDEN_IMAGE_AD, IMAGE_ONLY, TEXT_IMAGE, TEXT_ONLY
from tasks.augment import CONTRACT, HELDOUT_FILE, IMAGE_KEYS, TEXT_KEYS, augment

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FEATURIZE = FeaturizeParams(
    text=TextFeatureParams(word_ngram_range=[1, 2], char_ngram_range=[2, 4], max_features_word=500,
                           max_features_char=2000, svd_dim=6, margins=[], margin_folds=5, embedder="bundled",
                           embed_batch_size=32, max_seq_tokens=16),
    image=ImageFeatureParams(image_size=64, sift_max_keypoints=40, sift_vocab_size=8,
                             sift_kmeans_sample=4000, hsv_bins=[4, 2, 2], net_image_size=16,
                             qr_max_side=256),
)
ADS = ["WINNER!! Claim your free prize now, call 09061701461 or visit www.win-cash.com",
       "Free entry to win cash, text WIN to 80086 and add me on wechat abc_888",
       "Cheap loans approved today, call 0800 123 4567 for your bonus",
       "URGENT! Your mobile number has won 2000 pounds, call 09050000327"]
CLEAN = ["Are we still meeting for lunch tomorrow at noon?",
         "Sorry I will call you later, stuck in the office",
         "Can you pick up some milk on the way home please",
         "Happy birthday mum, see you on Sunday for dinner"]


def _image(rng: np.random.Generator, ad: bool) -> np.ndarray:
    img = np.full((80, 80, 3), rng.integers(150, 255), np.uint8)
    for _ in range(6):
        p, q = rng.integers(0, 80, 2), rng.integers(0, 80, 2)
        cv2.rectangle(img, tuple(int(v) for v in p), tuple(int(v) for v in q),
                      tuple(int(v) for v in rng.integers(0, 255, 3)), -1)
    if ad:
        cv2.putText(img, "SALE 50%", (4, 45), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 255), 2)
    return img


def _posts(root: Path, name: str, n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    (root / "data/raw/images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        label = int(i % 3 == 0)
        kind = [TEXT_ONLY, TEXT_IMAGE, IMAGE_ONLY, TEXT_ONLY][i % 4]
        if label and kind == TEXT_IMAGE and i % 2:
            kind = HIDDEN_IMAGE_AD
        text_is_ad = label and kind != HIDDEN_IMAGE_AD
        text = "" if kind == IMAGE_ONLY else f"{(ADS if text_is_ad else CLEAN)[i % 4]} #{i}"
        image = ""
        if kind != TEXT_ONLY:
            image = f"data/raw/images/{name}{i:03d}.png"
            cv2.imwrite(str(root / image), _image(rng, ad=bool(label)))
        rows.append({"id": f"{name}{i:03d}", "text": text, "image": image, "label": label,
                     "sensitivity": 0.3 + 0.5 * rng.random() if label else 0.0, "slice": kind})
    return pd.DataFrame(rows)


def _replace(obj, path: str, value):
    head, _, rest = path.partition(".")
    inner = getattr(obj, head)
    return dataclasses.replace(obj, **{head: _replace(inner, rest, value) if rest else value})


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("augment")
    frames = {"train": _posts(root, "tr", 96, 0), "val": _posts(root, "va", 24, 1),
              "test": _posts(root, "te", 24, 2)}
    (root / "data/split").mkdir(parents=True)
    (root / "data/features").mkdir(parents=True)
    for name, df in frames.items():
        df.to_parquet(root / f"data/split/{name}.parquet", index=False)
    pipeline = FeaturePipeline.fit(frames["train"], FEATURIZE, seed=0, image_root=root)
    pipeline.save(root / "artifacts/featurizer")
    for name, df in frames.items():
        np.savez_compressed(root / f"data/features/{name}.npz",
                            **pipeline.transform(df, image_root=root, progress=False))
    params = load_params(ROOT / "params.yaml", profile="ci")
    for key, value in {
        "augment.gan.epochs": 3, "augment.gan.max_c2st_auc": 1.0, "augment.gan.holdout_fraction": 0.4, "augment.ablation.steps": 20,
        "augment.ablation.seeds": [0], "augment.text_attack.variants_per_call": 2,
    }.items():
        params = _replace(params, key, value)
    report = augment(
        params,
        split_dir=root / "data/split", features_dir=root / "data/features",
        featurizer_dir=root / "artifacts/featurizer", out_dir=root / "data/augmented",
        report_path=root / "reports/augmentation.json", image_root=root,
        cache_dir=root / ".cache", raw_dir=root / "data/raw",
    )
    return root, params, report


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def test_augmented_train_set_has_the_contract_arrays_and_the_expansion_in_range(workspace):
    root, params, report = workspace
    train = _load(root / "data/features/train.npz")
    out = _load(root / "data/augmented/train.npz")
    assert set(out) == {*CONTRACT, "source", "parent_id"}
    n = len(out["id"])
    assert all(len(v) == n for v in out.values())
    for key in CONTRACT:
        assert out[key].dtype == train[key].dtype or key in ("id", "slice"), key
        assert out[key].shape[1:] == train[key].shape[1:], key
    factor = n / len(train["id"])
    lo, hi = params.augment.expansion_range
    assert lo <= factor <= hi
    assert report["expansion_factor"] == pytest.approx(factor, abs=1e-3)
    assert set(out["source"]) <= set(SOURCES)
    assert len(set(out["id"])) == n
    originals = out["source"] == ORIGINAL
    assert np.array_equal(out["id"][originals], train["id"])
    saved = json.loads((root / "reports/augmentation.json").read_text())
    assert saved["counts"] == {s: int((out["source"] == s).sum()) for s in SOURCES}
    assert saved["class_balance"]["after"]["ads"] == int(out["label"].sum())


def test_variants_keep_their_parent_label_and_change_only_their_modality(workspace):
    root, _, _ = workspace
    train = _load(root / "data/features/train.npz")
    out = _load(root / "data/augmented/train.npz")
    index = {pid: i for i, pid in enumerate(train["id"])}
    assert {TEXT_ATTACK, OBFUSCATION, IMAGE_TRANSFORM} <= set(out["source"])
    for source in (TEXT_ATTACK, OBFUSCATION, IMAGE_TRANSFORM):
        rows = np.flatnonzero(out["source"] == source)
        parents = np.array([index[p] for p in out["parent_id"][rows]])
        assert np.array_equal(out["label"][rows], train["label"][parents])
        same, probe = (IMAGE_KEYS, "token_ids") if source != IMAGE_TRANSFORM else (TEXT_KEYS, "image_small")
        for key in same:
            assert np.array_equal(out[key][rows], train[key][parents]), (source, key)
        # The modality that was perturbed reaches the features (the tiny TF-IDF vocabulary
        # misses emoji and lookalikes, the WordPiece ids and the pixels do not).
        moved = [not np.array_equal(out[probe][r], train[probe][p])
                 for r, p in zip(rows, parents, strict=True)]
        assert np.mean(moved) > 0.9, source
    gan = out["source"] == GAN
    if gan.any():
        # A GAN sample varies a real train ad: its parent's raw inputs, modalities and QR flag,
        # the parent's blocks for an absent modality, histograms that still sum to one.
        rows = np.flatnonzero(gan)
        parents = np.array([index[p] for p in out["parent_id"][rows]])
        assert (out["label"][rows] == 1).all() and (train["label"][parents] == 1).all()
        for key in ("token_ids", "image_small", "has_text", "has_image", "qr"):
            assert np.array_equal(out[key][rows], train[key][parents]), key
        sums = out["hsv"][rows][out["has_image"][rows]].sum(axis=1)
        assert np.allclose(sums, 1.0, atol=1e-4)
        no_text = ~out["has_text"][rows]
        assert np.array_equal(out["tfidf"][rows][no_text], train["tfidf"][parents][no_text])


def test_heldout_slice_holds_obfuscated_test_ads_and_every_clean_test_post(workspace):
    root, _, report = workspace
    test = _load(root / "data/features/test.npz")
    held = _load(root / "data/augmented" / HELDOUT_FILE)
    ads = held["source"] != ORIGINAL
    assert (held["label"][ads] == 1).all() and ads.sum() == report["heldout"]["n_obfuscated_ads"] > 0
    assert (~ads).sum() == int((test["label"] == 0).sum())
    assert all(held["families"][ads])
    assert len(held["text"]) == len(held["id"])
    assert set(held["parent_id"][ads]) <= set(test["id"][test["label"] == 1])


def test_report_holds_per_source_counts_gan_quality_and_the_ablation(workspace):
    _, _, report = workspace
    assert set(report["counts"]) == set(SOURCES)
    gan = report["sources"][GAN]
    assert {"c2st_auc", "mmd2", "knn_precision", "passed"} <= set(gan["quality"])
    assert len(gan["history"]) == 3
    runs = report["ablation"]["runs"]
    configs = {r["config"] for r in runs.values()}
    assert configs == {"no_augmentation", "text_only", "images_only", "gan_only", "all"}
    assert {r["loss"] for r in runs.values()} == {"focal", "bce"}
    for run in runs.values():
        assert 0.0 <= run["false_kill_rate"] <= 1.0
    assert runs["all|focal|oversample"]["train_rows"] == report["n_augmented"]
    assert set(ADDED_SOURCES) <= set(report["mix"])
