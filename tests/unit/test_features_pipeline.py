"""FeaturePipeline and the featurize stage on a handful of synthetic posts with real PNG files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import qrcode

from adfilter.config import FeaturizeParams, ImageFeatureParams, TextFeatureParams, load_params
from adfilter.features import FeaturePipeline
from adfilter.features.image import ImageFeaturizer
from adfilter.features.pipeline import FEATURE_ARRAYS, ROW_ARRAYS, VECTOR_FEATURES, FeatureError
from adfilter.imageio import read_image
from adfilter.schema import COLUMNS

ROOT = Path(__file__).resolve().parents[2]

PARAMS = FeaturizeParams(
    text=TextFeatureParams(
        word_ngram_range=[1, 2],
        char_ngram_range=[2, 4],
        max_features_word=500,
        max_features_char=2000,
        svd_dim=5,
        margins=[],
        margin_folds=5,
        embedder="bundled",
        embed_batch_size=3,
        max_seq_tokens=10,
    ),
    image=ImageFeatureParams(
        image_size=96,
        sift_max_keypoints=50,
        sift_vocab_size=6,
        sift_kmeans_sample=2000,
        hsv_bins=[4, 2, 2],
        net_image_size=12,
        qr_max_side=512,
    ),
)

TEXTS = {
    "train": [
        "WINNER! You have won a free prize, call 0800 123 456 now",
        "Are we still meeting for lunch tomorrow?",
        "Free entry to win cash, text WIN to 80086",
        "",
        "Sorry I'll call you later",
        "",
        "Add me on wechat abc_888 for cheap loans",
        "Can you pick up some milk on the way home",
    ],
    "val": ["zyzzyva quokka", "", "See you at the station"],
    "test": ["W1N a FR££ prize, txt 0 8 0 0 to claim", "", "Happy birthday mum", ""],
}
# Which posts carry an image (train posts 3 and 5 are image only).
HAS_IMAGE = {
    "train": [False, True, True, True, False, True, False, True],
    "val": [True, True, False],
    "test": [True, True, False, False],
}


def textured(seed: int, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    img = cv2.resize(small, (size, size), interpolation=cv2.INTER_NEAREST)
    for _ in range(4):
        centre = tuple(int(v) for v in rng.integers(10, size - 10, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        cv2.circle(img, centre, int(rng.integers(4, 15)), colour, -1)
    return img


def write_posts(root: Path) -> dict[str, pd.DataFrame]:
    """Split tables whose image paths are relative to `root`, the way data/split is to the repo."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    frames = {}
    seed = 0
    for split, texts in TEXTS.items():
        rows = []
        for i, (text, has_image) in enumerate(zip(texts, HAS_IMAGE[split], strict=True)):
            post_id = f"{split}{i:02d}"
            image = ""
            if has_image:
                seed += 1
                img = textured(seed, size=80 + 10 * (seed % 4))
                if split == "test" and i == 0:
                    qr = np.asarray(qrcode.make("https://prize.example").convert("RGB"))
                    img = cv2.resize(qr, (160, 160), interpolation=cv2.INTER_AREA)
                image = f"images/{post_id}.png"
                cv2.imwrite(str(root / image), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
            kind = "text_image" if text and image else ("image_only" if image else "text_only")
            rows.append(
                {
                    "id": post_id,
                    "text": text,
                    "image": image,
                    "label": int("win" in text.lower() or "wechat" in text.lower()),
                    "sensitivity": 0.25 * (i % 4),
                    "slice": kind,
                    "group": i,
                }
            )
        frames[split] = pd.DataFrame(rows)
    return frames


@pytest.fixture(scope="module")
def posts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, pd.DataFrame]]:
    root = tmp_path_factory.mktemp("posts")
    return root, write_posts(root)


@pytest.fixture(scope="module")
def pipeline(posts: tuple[Path, dict[str, pd.DataFrame]]) -> FeaturePipeline:
    root, frames = posts
    return FeaturePipeline.fit(frames["train"], PARAMS, seed=0, image_root=root)


def decoded(root: Path, df: pd.DataFrame) -> list[np.ndarray | None]:
    return [read_image(root / p) if p else None for p in df["image"]]


def test_transform_gives_the_contract_arrays(posts, pipeline: FeaturePipeline) -> None:
    root, frames = posts
    out = pipeline.transform(frames["test"], image_root=root, progress=False)
    n = len(frames["test"])
    assert set(out) == set(FEATURE_ARRAYS) | set(ROW_ARRAYS)
    expected = {
        "id": ((n,), "U"),
        "slice": ((n,), "U"),
        "label": ((n,), np.int64),
        "sensitivity": ((n,), np.float32),
        "has_text": ((n,), np.bool_),
        "has_image": ((n,), np.bool_),
        "tfidf": ((n, 5), np.float32),
        "sent_emb": ((n, 384), np.float32),
        "sift_bow": ((n, 6), np.float32),
        "hsv": ((n, 16), np.float32),
        "qr": ((n, 1), np.float32),
        "token_ids": ((n, 10), np.int32),
        "image_small": ((n, 12, 12, 3), np.uint8),
    }
    for name, (shape, dtype) in expected.items():
        assert out[name].shape == shape, name
        if dtype == "U":
            assert out[name].dtype.kind == "U", name
        else:
            assert out[name].dtype == dtype, name
    assert out["id"].tolist() == frames["test"]["id"].tolist()
    assert out["slice"].tolist() == frames["test"]["slice"].tolist()
    np.testing.assert_allclose(out["sensitivity"], frames["test"]["sensitivity"])
    assert out["qr"][:, 0].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_feature_dims_match_the_arrays(posts, pipeline: FeaturePipeline) -> None:
    root, frames = posts
    out = pipeline.transform(frames["val"], image_root=root, progress=False)
    dims = pipeline.feature_dims
    for name in VECTOR_FEATURES:
        assert out[name].shape[1] == dims[name], name
    assert out["token_ids"].shape[1] == dims["token_ids"]
    assert out["image_small"].shape[1:] == (dims["image_small"], dims["image_small"], 3)
    assert pipeline.token_vocab_size == 30522


def test_missing_modalities_are_flagged_and_zero(posts, pipeline: FeaturePipeline) -> None:
    root, frames = posts
    df = frames["train"]
    out = pipeline.transform(df, image_root=root, progress=False)
    assert out["has_text"].tolist() == [bool(t) for t in df["text"]]
    assert out["has_image"].tolist() == HAS_IMAGE["train"]
    no_text, no_image = ~out["has_text"], ~out["has_image"]
    for name in ("tfidf", "sent_emb"):
        assert not out[name][no_text].any(), name
        assert out[name][~no_text].any(axis=1).all(), name
    for name in ("sift_bow", "hsv", "qr", "image_small"):
        assert not out[name][no_image].any(), name
    assert out["hsv"][~no_image].any(axis=1).all()
    np.testing.assert_allclose(out["sift_bow"][~no_image].sum(axis=1), 1.0, rtol=1e-6)


def test_fitted_on_train_rows_only(posts, pipeline: FeaturePipeline) -> None:
    root, frames = posts
    vocab = pipeline.text.word.vocabulary_
    assert "lunch" in vocab and "zyzzyva" not in vocab and "birthday" not in vocab
    train = frames["train"]
    shuffled = train[train["image"] != ""].sample(frac=1.0, random_state=0)
    train_images = [read_image(root / p) for p in shuffled["image"]]
    direct = ImageFeaturizer.fit(train_images, PARAMS.image, seed=0)
    np.testing.assert_array_equal(
        pipeline.image.codebook.cluster_centers_, direct.codebook.cluster_centers_
    )
    everything = pd.concat([train, frames["val"], frames["test"]], ignore_index=True)
    wider = FeaturePipeline.fit(everything, PARAMS, seed=0, image_root=root)
    assert "zyzzyva" in wider.text.word.vocabulary_
    assert not np.allclose(
        pipeline.image.codebook.cluster_centers_, wider.image.codebook.cluster_centers_
    )


def test_featurize_posts_matches_transform(posts, pipeline: FeaturePipeline) -> None:
    root, frames = posts
    df = pd.concat([frames["val"], frames["test"]], ignore_index=True)
    batch = pipeline.transform(df, image_root=root, progress=False)
    online = pipeline.featurize_posts(df["text"].tolist(), decoded(root, df))
    assert set(online) == set(FEATURE_ARRAYS)
    for name in FEATURE_ARRAYS:
        np.testing.assert_allclose(online[name], batch[name], err_msg=name)
    # One post on its own (the usual online request) gets the same features up to float noise.
    single = pipeline.featurize_posts([df["text"][3]], [decoded(root, df)[3]])
    for name in FEATURE_ARRAYS:
        np.testing.assert_allclose(single[name][0], batch[name][3], atol=1e-5, err_msg=name)


def test_featurize_posts_checks_lengths(pipeline: FeaturePipeline) -> None:
    with pytest.raises(ValueError, match="one of each per post"):
        pipeline.featurize_posts(["a", "b"], [None])


def test_save_and_load_give_identical_features(
    posts, pipeline: FeaturePipeline, tmp_path: Path
) -> None:
    root, frames = posts
    pipeline.save(tmp_path / "featurizer", extra_meta={"data_version": "sha256:0123456789abcdef"})
    meta = json.loads((tmp_path / "featurizer" / "meta.json").read_text())
    assert meta["feature_dims"] == pipeline.feature_dims
    assert meta["data_version"] == "sha256:0123456789abcdef"
    assert meta["embedder"]["spec"] == "bundled"
    assert Path(meta["embedder"]["location"]).is_dir()
    loaded = FeaturePipeline.load(tmp_path / "featurizer")
    assert loaded.feature_dims == pipeline.feature_dims
    before = pipeline.transform(frames["test"], image_root=root, progress=False)
    after = loaded.transform(frames["test"], image_root=root, progress=False)
    for name in (*FEATURE_ARRAYS, *ROW_ARRAYS):
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_a_fit_in_another_process_saves_the_same_text_bytes(
    pipeline: FeaturePipeline, tmp_path: Path
) -> None:
    # A rerun of featurize on the same data must not make a new artifact version: scikit-learn
    # caches a memory address on the vectorizers, which is left out of the saved state.
    import subprocess
    import sys

    pipeline.save(tmp_path / "here")
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from adfilter.features import FeaturePipeline\n"
        "from tests.unit.test_features_pipeline import PARAMS, write_posts\n"
        "root = Path(sys.argv[1])\n"
        "frames = write_posts(root)\n"
        "FeaturePipeline.fit(frames['train'], PARAMS, seed=0, image_root=root).save(sys.argv[2])\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "posts"), str(tmp_path / "there")],
                   check=True, cwd=Path(__file__).resolve().parents[2])
    assert (tmp_path / "there" / "text.joblib").read_bytes() == \
        (tmp_path / "here" / "text.joblib").read_bytes()


def test_load_of_an_empty_folder_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dvc repro featurize"):
        FeaturePipeline.load(tmp_path)


def test_unreadable_image_names_the_post_and_path(
    posts, pipeline: FeaturePipeline, tmp_path: Path
) -> None:
    root, frames = posts
    df = frames["val"].copy()
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    df.loc[1, "image"] = str(tmp_path / "broken.png")
    with pytest.raises(FeatureError, match=r"post val01: image .*broken\.png"):
        pipeline.transform(df, image_root=root, progress=False)


def test_missing_columns_are_named(pipeline: FeaturePipeline) -> None:
    with pytest.raises(FeatureError, match="sensitivity"):
        pipeline.transform(pd.DataFrame({c: [] for c in COLUMNS if c != "sensitivity"}))


def test_featurize_stage_writes_the_contract(tmp_path: Path) -> None:
    from tasks.featurize import featurize

    frames = write_posts(tmp_path)
    split_dir = tmp_path / "split"
    split_dir.mkdir()
    for name, df in frames.items():
        df.to_parquet(split_dir / f"{name}.parquet", index=False)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "manifest.json").write_text(json.dumps({"data_version": "sha256:feedfacecafebeef"}))
    params = dataclasses.replace(load_params(ROOT / "params.yaml", profile="ci"), featurize=PARAMS)

    report = featurize(
        params,
        split_dir=split_dir,
        out_dir=tmp_path / "features",
        artifact_dir=tmp_path / "featurizer",
        report_path=tmp_path / "reports" / "featurize.json",
        image_root=tmp_path,
        raw_dir=raw,
    )

    for name, df in frames.items():
        with np.load(tmp_path / "features" / f"{name}.npz") as npz:
            assert set(npz.files) == set(FEATURE_ARRAYS) | set(ROW_ARRAYS)
            assert npz["id"].tolist() == df["id"].tolist()
            assert npz["label"].tolist() == df["label"].tolist()
            assert npz["has_image"].tolist() == HAS_IMAGE[name]
        assert report["splits"][name]["n_posts"] == len(df)
    assert report["splits"]["test"]["n_qr"] == 1
    rates = report["throughput_posts_per_s"]
    assert all(rates[k] > 0 for k in ("tfidf", "embedding", "image_sift_hsv_qr"))
    assert json.loads((tmp_path / "reports" / "featurize.json").read_text()) == report
    meta = json.loads((tmp_path / "featurizer" / "meta.json").read_text())
    assert meta["data_version"] == "sha256:feedfacecafebeef"
    assert meta["fitted_on"]["n_posts"] == len(frames["train"])
    loaded = FeaturePipeline.load(tmp_path / "featurizer")
    with np.load(tmp_path / "features" / "test.npz") as npz:
        again = loaded.transform(frames["test"], image_root=tmp_path, progress=False)
        np.testing.assert_allclose(again["sent_emb"], npz["sent_emb"], atol=1e-6)
        np.testing.assert_array_equal(again["sift_bow"], npz["sift_bow"])
