"""The training image pipeline and the held-out image families."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from adfilter.augment.heldout import IMAGE_FAMILIES, HeldoutObfuscator
from adfilter.augment.images import TRANSFORMS, ImageAugmenter, build_pipeline
from adfilter.augment.text import AugmentError
from adfilter.config import load_params


@pytest.fixture(scope="module")
def params(repo_root):
    return load_params(repo_root / "params.yaml").augment


def _image(size=(96, 80)) -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.full((*size, 3), 250, np.uint8)
    h, w = size
    img[h // 8 : h // 2, w // 8 : 7 * w // 8] = rng.integers(0, 255, (h // 2 - h // 8, 7 * w // 8 - w // 8, 3))
    return img


def test_default_pipeline_has_at_least_ten_v2_transforms(params):
    pipeline = build_pipeline(params.image, (64, 64))
    assert len(pipeline.transforms) >= 10
    assert set(params.image.transforms) <= set(TRANSFORMS)


def test_pipeline_is_deterministic_for_a_seed_and_keeps_shape_and_dtype(params):
    aug = ImageAugmenter(params.image)
    img = _image()
    a, b = aug.augment(img, seed=7), aug.augment(img, seed=7)
    assert a.shape == img.shape and a.dtype == np.uint8
    assert np.array_equal(a, b)
    others = [aug.augment(img, seed=s) for s in range(8)]
    assert any(not np.array_equal(o, img) for o in others)
    assert len({o.tobytes() for o in others}) > 1


def test_seeded_call_leaves_the_global_generator_alone(params):
    aug = ImageAugmenter(params.image)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    aug.augment(_image(), seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_on_the_fly_call_takes_image_small_tensors(params):
    aug = ImageAugmenter(params.image)
    small = torch.from_numpy(_image((32, 32)))
    out = aug(small)
    assert isinstance(out, torch.Tensor) and out.shape == small.shape and out.dtype == torch.uint8


def test_every_transform_alone_keeps_shape_and_dtype(params):
    img = _image()
    for name in TRANSFORMS:
        only = dataclasses.replace(params.image, transforms={name: 1.0})
        out = ImageAugmenter(only).augment(img, seed=3)
        assert out.shape == img.shape and out.dtype == np.uint8, name


def test_unknown_transform_names_the_key(params):
    bad = dataclasses.replace(params.image, transforms={"warp_drive": 1.0})
    with pytest.raises(AugmentError, match="augment.image.transforms.*warp_drive"):
        ImageAugmenter(bad)
    with pytest.raises(ValueError, match="RGB uint8"):
        ImageAugmenter(params.image).augment(np.zeros((8, 8), np.uint8), seed=0)


@pytest.mark.parametrize("name", sorted(IMAGE_FAMILIES))
def test_heldout_image_families_change_the_image_and_keep_its_form(name):
    img = _image()
    out = IMAGE_FAMILIES[name].apply(img, np.random.default_rng(0))
    assert out.shape == img.shape and out.dtype == np.uint8
    assert not np.array_equal(out, img)


def test_heldout_obfuscator_is_seeded(params):
    ob = HeldoutObfuscator(params.heldout)
    a = ob.image(_image(), random.Random(5))
    b = ob.image(_image(), random.Random(5))
    assert a[1] == b[1] and np.array_equal(a[0], b[0])
    text, fams = ob.text("Claim your free prize now at www.win.com", random.Random(1))
    assert fams and text != "Claim your free prize now at www.win.com"
