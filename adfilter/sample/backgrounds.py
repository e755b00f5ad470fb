"""Real photographs shipped inside the scikit-image wheel, turned into many distinct backgrounds.

About twenty photographs are not enough images on their own, and near-duplicates would make
the duplicate-aware split lump them together. `make_background` therefore takes a random
rotated crop at a random scale (one affine warp), may mirror it, and changes brightness,
contrast, saturation and hue: every call gives an image whose 64-bit perceptual hash is far
from the others' (see the sample report for the measured figure).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from importlib import resources

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

# Photographs and textures used as backgrounds (bundled in the wheel, no download).
PHOTOS = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "cell.png",
    "chelsea.png",
    "clock_motion.png",
    "coffee.png",
    "coins.png",
    "color.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "moon.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
    "rocket.jpg",
)
# Pictures of ordinary printed text, for clean images that must not look like ads.
DOCUMENTS = ("page.png", "text.png")
# Black-and-white grids a QR detector might mistake for a code.
PATTERNS = ("chessboard_RGB.png",)

# Sources are shrunk once so a crop is never warped from a needlessly large picture.
_MAX_SOURCE_SIDE = 640


def _skimage_data_dir():
    try:
        return resources.files("skimage").joinpath("data")
    except ModuleNotFoundError:
        raise FileNotFoundError(
            "the sample's photographs ship in scikit-image, which is not installed: "
            "install the project's requirements.lock (make venv)"
        ) from None


@functools.cache
def _load_named(names: tuple[str, ...]) -> dict[str, Image.Image]:
    folder = _skimage_data_dir()
    out: dict[str, Image.Image] = {}
    for name in names:
        ref = folder.joinpath(name)
        if not ref.is_file():
            raise FileNotFoundError(
                f"{ref}: expected inside the installed scikit-image wheel; reinstall scikit-image"
            )
        with Image.open(str(ref)) as img:
            img.load()
            rgb = img.convert("RGB")
        if max(rgb.size) > _MAX_SOURCE_SIDE:
            rgb.thumbnail((_MAX_SOURCE_SIDE, _MAX_SOURCE_SIDE), Image.Resampling.LANCZOS)
        out[name.rsplit(".", 1)[0]] = rgb
    return out


def load_backgrounds() -> dict[str, Image.Image]:
    """The background photographs by name (`astronaut`, `coffee`, ...), RGB, in a fixed order."""
    return dict(_load_named(PHOTOS))


def load_documents() -> dict[str, Image.Image]:
    """Photographs of ordinary printed text (`page`, `text`), RGB."""
    return dict(_load_named(DOCUMENTS))


def load_patterns() -> dict[str, Image.Image]:
    """QR-like but QR-free graphics (a chessboard), RGB."""
    return dict(_load_named(PATTERNS))


def random_view(
    rng: np.random.Generator,
    source: Image.Image,
    size: tuple[int, int],
    min_scale: float = 0.3,
    max_scale: float = 0.9,
    max_angle: float = 20.0,
) -> Image.Image:
    """A random rotated, scaled and possibly mirrored crop of `source`, resized to `size`.

    The crop's side is `min_scale`..`max_scale` of the largest one that fits."""
    src_w, src_h = source.size
    out_w, out_h = size
    angle = math.radians(rng.uniform(-max_angle, max_angle)) if rng.random() < 0.5 else 0.0
    cos, sin = abs(math.cos(angle)), abs(math.sin(angle))
    aspect = out_w / out_h
    # The largest crop (in source pixels) whose rotated box still fits inside the source.
    fit = min(src_w / (aspect * cos + sin), src_h / (aspect * sin + cos))
    # Below the full view: the full view of a source is a fixed point that makes near-duplicates.
    crop_h = fit * rng.uniform(min_scale, max_scale)
    crop_w = crop_h * aspect
    half_w = (crop_w * cos + crop_h * sin) / 2
    half_h = (crop_w * sin + crop_h * cos) / 2
    cx = rng.uniform(half_w, max(half_w, src_w - half_w))
    cy = rng.uniform(half_h, max(half_h, src_h - half_h))
    scale = crop_h / out_h
    mirror = -1.0 if rng.random() < 0.5 else 1.0
    signed = angle if rng.random() < 0.5 else -angle
    c, s = math.cos(signed) * scale, math.sin(signed) * scale
    # Output pixel (u, v), centred, maps to source (x, y) = R * S * (mirror * u, v) + centre.
    a, b = c * mirror, -s
    d, e = s * mirror, c
    u0, v0 = out_w / 2, out_h / 2
    coeffs = (a, b, cx - a * u0 - b * v0, d, e, cy - d * u0 - e * v0)
    return source.transform(size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BICUBIC)


def jitter_colours(rng: np.random.Generator, img: Image.Image) -> Image.Image:
    """Random brightness, contrast, saturation, hue (and sometimes a tint or a slight blur)."""
    if rng.random() < 0.25:
        dark = tuple(int(v) for v in rng.integers(0, 90, 3))
        light = tuple(int(v) for v in rng.integers(170, 256, 3))
        img = ImageOps.colorize(img.convert("L"), dark, light)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.7, 1.3))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.7, 1.35))
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.4, 1.6))
    if rng.random() < 0.5:
        shift = int(rng.integers(1, 256))
        h, s, v = img.convert("HSV").split()
        h = h.point(lambda x: (x + shift) % 256)
        img = Image.merge("HSV", (h, s, v)).convert("RGB")
    if rng.random() < 0.15:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.2)))
    return img


def make_background(
    rng: np.random.Generator,
    sources: Mapping[str, Image.Image],
    size: int | tuple[int, int],
) -> tuple[str, Image.Image]:
    """A new background from one randomly chosen source: `(source name, RGB image of size)`."""
    if not sources:
        raise ValueError("make_background needs at least one source image (see load_backgrounds)")
    names = list(sources)
    name = names[int(rng.integers(len(names)))]
    out_size = (size, size) if isinstance(size, int) else size
    return name, jitter_colours(rng, random_view(rng, sources[name], out_size))
