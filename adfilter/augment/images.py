"""The training image pipeline: torchvision.transforms.v2, chosen and weighted in params.yaml.

`augment.image.transforms` maps names of `TRANSFORMS` to the probability that each is applied;
they run in the order of `TRANSFORMS` (geometry, then colour, then noise and erasing), each
wrapped in `v2.RandomApply`. Magnitudes are fixed here: mild enough that an ad stays an ad
(a crop keeps at least 60% of the image, rotations stay within 12 degrees).

`ImageAugmenter` is used twice: by the augment stage to materialise variants of the train
images (seeded, so a rerun gives the same variants), and on the fly by a training loader on
`image_small` (unseeded: it draws from torch's generator, which Lightning seeds per worker).
Input and output are RGB uint8 (H, W, 3), numpy or torch, with shape and dtype kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from adfilter.augment.text import check_names
from adfilter.config import ImageAugmentParams

Size = tuple[int, int]


def _gaussian_noise(size: Size) -> v2.Transform:
    # GaussianNoise works on float images: convert, add noise (clipped to [0, 1]), convert back.
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.GaussianNoise(sigma=0.04),
                       v2.ToDtype(torch.uint8, scale=True)])


# name -> factory(image size); the order here is the order of application.
TRANSFORMS: Final[dict[str, Callable[[Size], v2.Transform]]] = {
    "random_resized_crop": lambda s: v2.RandomResizedCrop(s, scale=(0.6, 1.0), ratio=(0.8, 1.25),
                                                          antialias=True),
    "horizontal_flip": lambda s: v2.RandomHorizontalFlip(p=1.0),
    "rotation": lambda s: v2.RandomRotation(degrees=12, fill=255),
    "affine": lambda s: v2.RandomAffine(degrees=0, translate=(0.08, 0.08), scale=(0.85, 1.1),
                                        shear=8, fill=255),
    "perspective": lambda s: v2.RandomPerspective(distortion_scale=0.3, p=1.0, fill=255),
    "color_jitter": lambda s: v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03),
    "grayscale": lambda s: v2.RandomGrayscale(p=1.0),
    "gaussian_blur": lambda s: v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.5)),
    "sharpness": lambda s: v2.RandomAdjustSharpness(sharpness_factor=2.0, p=1.0),
    "autocontrast": lambda s: v2.RandomAutocontrast(p=1.0),
    "equalize": lambda s: v2.RandomEqualize(p=1.0),
    "posterize": lambda s: v2.RandomPosterize(bits=4, p=1.0),
    "invert": lambda s: v2.RandomInvert(p=1.0),
    "channel_permutation": lambda s: v2.RandomChannelPermutation(),
    "gaussian_noise": _gaussian_noise,
    "erasing": lambda s: v2.RandomErasing(p=1.0, scale=(0.02, 0.08), value=0),
}


def build_pipeline(params: ImageAugmentParams, size: Size) -> v2.Compose:
    """The v2 pipeline for images of `size` (H, W): every transform with p > 0, in order."""
    check_names(params.transforms, TRANSFORMS, "augment.image.transforms")
    steps = [v2.RandomApply([TRANSFORMS[name](size)], p=float(params.transforms[name]))
             for name in TRANSFORMS if params.transforms.get(name, 0.0) > 0]
    return v2.Compose(steps)


class ImageAugmenter:
    """Applies the params' pipeline to RGB uint8 (H, W, 3) images.

    `seed=None` draws from torch's global generator (on the fly in a loader);
    `augment(image, seed)` draws from a generator seeded with `seed` alone and leaves the
    global one as it was, so a variant depends on nothing but its seed.
    """

    def __init__(self, params: ImageAugmentParams) -> None:
        check_names(params.transforms, TRANSFORMS, "augment.image.transforms")
        self.params = params
        self._pipelines: dict[Size, v2.Compose] = {}

    @property
    def names(self) -> list[str]:
        return [n for n in TRANSFORMS if self.params.transforms.get(n, 0.0) > 0]

    def _pipeline(self, size: Size) -> v2.Compose:
        if size not in self._pipelines:
            self._pipelines[size] = build_pipeline(self.params, size)
        return self._pipelines[size]

    def __call__(self, image: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        return self.augment(image, seed=None)

    def augment(self, image: np.ndarray | torch.Tensor, seed: int | None = None) -> Any:
        """The augmented image, of the same type, shape and dtype as `image`."""
        as_numpy = isinstance(image, np.ndarray)
        hwc = torch.from_numpy(np.require(image, requirements=["C", "W"])) if as_numpy else image
        if hwc.ndim != 3 or hwc.shape[-1] != 3 or hwc.dtype != torch.uint8:
            raise ValueError(
                f"ImageAugmenter expects an RGB uint8 image (H, W, 3), got {hwc.dtype} "
                f"{tuple(hwc.shape)}; decode with adfilter.imageio.read_image"
            )
        chw = tv_tensors.Image(hwc.permute(2, 0, 1))
        pipeline = self._pipeline((int(hwc.shape[0]), int(hwc.shape[1])))
        if seed is None:
            out = pipeline(chw)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                out = pipeline(chw)
        result = out.as_subclass(torch.Tensor).permute(1, 2, 0).contiguous()
        return result.numpy() if as_numpy else result
