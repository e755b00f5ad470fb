"""Image features: SIFT bag of visual words, HSV histogram, QR flag, image_small."""

from __future__ import annotations

import pickle
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
import qrcode
from skimage import data as skdata

from adfilter.config import ImageFeatureParams
from adfilter.features.image import CodebookError, ImageFeaturizer, hsv_histogram
from adfilter.imageio import resize_square

PARAMS = ImageFeatureParams(
    image_size=96,
    sift_max_keypoints=60,
    sift_vocab_size=8,
    sift_kmeans_sample=3000,
    hsv_bins=[6, 2, 2],
    net_image_size=16,
    qr_max_side=512,
)


def textured(seed: int, size: int = 96) -> np.ndarray:
    """Blocky colour noise with a few shapes drawn on it: plenty of SIFT keypoints."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    img = cv2.resize(small, (size, size), interpolation=cv2.INTER_NEAREST)
    for _ in range(4):
        centre = tuple(int(v) for v in rng.integers(10, size - 10, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        cv2.circle(img, centre, int(rng.integers(4, 15)), colour, -1)
    return img


def qr_on(background: np.ndarray, side: int, corner: bool = False) -> np.ndarray:
    code = np.asarray(qrcode.make("https://win-a-prize.example/claim").convert("RGB"))
    code = cv2.resize(code, (side, side), interpolation=cv2.INTER_AREA)
    img = background.copy()
    y = x = 8 if corner else (img.shape[0] - side) // 2
    img[y : y + side, x : x + side] = code
    return img


@pytest.fixture(scope="module")
def featurizer() -> ImageFeaturizer:
    return ImageFeaturizer.fit([textured(s) for s in range(6)], PARAMS, seed=0)


def test_outputs_have_contract_shapes_and_dtypes(featurizer: ImageFeaturizer) -> None:
    images = [textured(10), None, textured(11, size=150)]
    out = featurizer.transform(images, n=3)
    assert out["sift_bow"].shape == (3, 8) and out["sift_bow"].dtype == np.float32
    assert out["hsv"].shape == (3, 24) and out["hsv"].dtype == np.float32
    assert out["qr"].shape == (3, 1) and out["qr"].dtype == np.float32
    assert out["image_small"].shape == (3, 16, 16, 3) and out["image_small"].dtype == np.uint8
    assert out["has_image"].tolist() == [True, False, True]
    assert featurizer.feature_dims == {"sift_bow": 8, "hsv": 24, "qr": 1}


def test_bag_of_words_is_l1_normalised_counts(featurizer: ImageFeaturizer) -> None:
    bow = featurizer.transform([textured(20), textured(21)], n=2)["sift_bow"]
    np.testing.assert_allclose(bow.sum(axis=1), 1.0, rtol=1e-6)
    # Word counts over at most sift_max_keypoints descriptors: multiples of 1/count.
    sift = cv2.SIFT_create(nfeatures=PARAMS.sift_max_keypoints)
    gray = cv2.cvtColor(resize_square(textured(20), PARAMS.image_size), cv2.COLOR_RGB2GRAY)
    _, desc = sift.detectAndCompute(gray, None)
    centres = featurizer.codebook.cluster_centers_
    nearest = np.linalg.norm(desc[:, None, :] - centres[None, :, :], axis=2).argmin(axis=1)
    expected = np.bincount(nearest, minlength=8) / len(desc)
    np.testing.assert_allclose(bow[0], expected, rtol=1e-6)


def test_visual_words_agree_with_kmeans_predict(featurizer: ImageFeaturizer) -> None:
    sift = cv2.SIFT_create(nfeatures=PARAMS.sift_max_keypoints)
    gray = cv2.cvtColor(textured(25), cv2.COLOR_RGB2GRAY)
    _, desc = sift.detectAndCompute(gray, None)
    np.testing.assert_array_equal(featurizer.visual_words(desc), featurizer.codebook.predict(desc))


def test_missing_image_gives_zeros(featurizer: ImageFeaturizer) -> None:
    out = featurizer.transform([None, None], n=2)
    for name in ("sift_bow", "hsv", "qr", "image_small"):
        assert not out[name].any(), name
    assert not out["has_image"].any()


def test_flat_image_has_no_keypoints_but_a_colour_histogram(featurizer: ImageFeaturizer) -> None:
    flat = np.full((80, 80, 3), (200, 30, 30), np.uint8)
    out = featurizer.transform([flat], n=1)
    assert not out["sift_bow"].any()
    assert out["has_image"][0]
    assert out["hsv"][0].sum() == pytest.approx(1.0)


def test_hsv_histogram_puts_pure_red_in_the_first_hue_bin() -> None:
    red = np.zeros((32, 32, 3), np.uint8)
    red[..., 0] = 255
    hist = hsv_histogram(red, [6, 2, 2]).reshape(6, 2, 2)
    assert hist[0, 1, 1] == pytest.approx(1.0)
    half = np.concatenate([red, np.full((32, 32, 3), (0, 0, 255), np.uint8)], axis=1)
    hist = hsv_histogram(half, [6, 2, 2]).reshape(6, 2, 2)
    # Blue has hue 120 of OpenCV's 0..179, the fifth of six bins.
    assert hist[0, 1, 1] == pytest.approx(0.5) and hist[4, 1, 1] == pytest.approx(0.5)


def test_image_small_is_the_resized_image(featurizer: ImageFeaturizer) -> None:
    img = textured(30, size=120)
    small = featurizer.transform([img], n=1)["image_small"][0]
    np.testing.assert_array_equal(small, resize_square(img, 16))


def test_qr_code_is_found_and_plain_photos_are_not(featurizer: ImageFeaturizer) -> None:
    photo = resize_square(skdata.chelsea(), 300)
    with_qr = qr_on(photo, 160)
    small_corner_qr = qr_on(resize_square(skdata.astronaut(), 512), 120, corner=True)
    plain = [photo, skdata.astronaut(), skdata.coffee(), textured(40, size=200)]
    flags = featurizer.transform([with_qr, small_corner_qr, *plain], n=6)["qr"][:, 0]
    assert flags.tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_codebook_is_deterministic_and_depends_on_the_fitting_images(
    featurizer: ImageFeaturizer,
) -> None:
    train = [textured(s) for s in range(6)]
    a = featurizer.codebook.cluster_centers_
    b = ImageFeaturizer.fit(train, PARAMS, seed=0).codebook.cluster_centers_
    np.testing.assert_array_equal(a, b)
    other = ImageFeaturizer.fit(train + [textured(s) for s in range(50, 56)], PARAMS, seed=0)
    assert not np.allclose(a, other.codebook.cluster_centers_)


def test_codebook_reads_images_only_until_it_has_its_sample() -> None:
    read = []

    def images():
        for s in range(40):
            read.append(s)
            yield textured(s)

    params = ImageFeatureParams(**{**PARAMS.__dict__, "sift_kmeans_sample": 300})
    featurizer = ImageFeaturizer.fit(images(), params, seed=0)
    assert 1 < len(read) < 40
    assert featurizer.codebook.cluster_centers_.shape == (8, 128)


def test_too_few_descriptors_for_the_vocabulary_fails_naming_the_param() -> None:
    flat = [np.full((64, 64, 3), 90, np.uint8), textured(1, size=32)]
    params = ImageFeatureParams(**{**PARAMS.__dict__, "sift_vocab_size": 5000})
    with pytest.raises(CodebookError, match="sift_vocab_size"):
        ImageFeaturizer.fit(flat, params)


def test_same_features_from_threads_and_after_pickling(featurizer: ImageFeaturizer) -> None:
    images = [textured(60 + s, size=120) for s in range(8)]
    images[3] = qr_on(resize_square(skdata.chelsea(), 300), 160)
    serial = featurizer.transform(images, n=8)
    with ThreadPoolExecutor(max_workers=4) as pool:
        rows = list(pool.map(featurizer.one, images))
    for i, (bow, hsv, qr, small) in enumerate(rows):
        np.testing.assert_array_equal(bow, serial["sift_bow"][i])
        np.testing.assert_array_equal(hsv, serial["hsv"][i])
        assert qr == serial["qr"][i, 0]
        np.testing.assert_array_equal(small, serial["image_small"][i])
    assert serial["qr"][3, 0] == 1.0
    copy = pickle.loads(pickle.dumps(featurizer))
    again = copy.transform(images, n=8)
    for name, value in serial.items():
        np.testing.assert_array_equal(again[name], value, err_msg=name)


def test_wrong_image_type_is_refused(featurizer: ImageFeaturizer) -> None:
    with pytest.raises(ValueError, match="RGB uint8"):
        featurizer.transform([np.zeros((32, 32), np.float32)], n=1)
