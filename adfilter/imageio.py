"""Safe image decoding shared by validation, featurization and serving.

Every image that enters the system goes through `read_image`: it checks the byte size, the
format and the pixel count *before* decoding (a decompression bomb never gets decoded), then
forces a full decode so that truncated files fail here and not deep inside a model.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

DEFAULT_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


class ImageError(ValueError):
    """An image that cannot be used; `reason` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 10_000_000
    max_pixels: int = 25_000_000
    min_side: int = 16
    formats: tuple[str, ...] = DEFAULT_FORMATS


def read_image(source: str | Path | bytes, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Decode `source` (a path or the file's bytes) into an RGB uint8 array of shape (H, W, 3)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        where = "uploaded image"
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise ImageError("image_missing", f"{where} does not exist")
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise ImageError("image_too_large", f"{where} is {size} bytes; the limit is {limits.max_bytes}")
        data = path.read_bytes()
    if not data:
        raise ImageError("image_empty", f"{where} is empty")
    if len(data) > limits.max_bytes:
        raise ImageError("image_too_large", f"{where} is {len(data)} bytes; the limit is {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = (img.format or "").upper()
            if fmt not in limits.formats:
                raise ImageError(
                    "image_format", f"{where} is {fmt or 'of an unknown format'}; allowed: {', '.join(limits.formats)}"
                )
            width, height = img.size
            if width * height > limits.max_pixels:
                raise ImageError(
                    "image_bomb",
                    f"{where} declares {width}x{height} pixels; the limit is {limits.max_pixels}",
                )
            if min(width, height) < limits.min_side:
                raise ImageError("image_too_small", f"{where} is {width}x{height}; the minimum side is {limits.min_side}")
            img.load()
            rgb = img.convert("RGB")
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("image_bomb", f"{where}: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageError("image_corrupt", f"{where} is not a readable image") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError("image_corrupt", f"{where} could not be decoded ({exc})") from exc
    return np.asarray(rgb, dtype=np.uint8)


def resize_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize to size x size (area interpolation when shrinking), the model's fixed input."""
    import cv2

    h, w = rgb.shape[:2]
    interp = cv2.INTER_AREA if max(h, w) > size else cv2.INTER_LINEAR
    return cv2.resize(rgb, (size, size), interpolation=interp)
