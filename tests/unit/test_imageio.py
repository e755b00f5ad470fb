from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adfilter.imageio import ImageError, ImageLimits, read_image, resize_square


def _png_bytes(w: int = 40, h: int = 30) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def test_reads_png_from_bytes_and_path(tmp_path: Path) -> None:
    data = _png_bytes()
    arr = read_image(data)
    assert arr.shape == (30, 40, 3) and arr.dtype == np.uint8
    path = tmp_path / "a.png"
    path.write_bytes(data)
    np.testing.assert_array_equal(read_image(path), arr)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "image_empty"),
        (b"definitely not an image" * 10, "image_corrupt"),
        (_png_bytes()[:60], "image_corrupt"),
        (_bomb_png(30000, 30000), "image_bomb"),
    ],
)
def test_bad_bytes_have_reasons(payload: bytes, reason: str) -> None:
    with pytest.raises(ImageError) as exc:
        read_image(payload)
    assert exc.value.reason == reason


def test_limits_are_enforced(tmp_path: Path) -> None:
    data = _png_bytes()
    with pytest.raises(ImageError, match="image_too_large"):
        read_image(data, ImageLimits(max_bytes=10))
    with pytest.raises(ImageError, match="image_too_small"):
        read_image(data, ImageLimits(min_side=100))
    with pytest.raises(ImageError, match="image_format"):
        read_image(data, ImageLimits(formats=("JPEG",)))
    with pytest.raises(ImageError, match="image_missing"):
        read_image(tmp_path / "nope.png")


def test_truncated_jpeg_fails_on_full_decode() -> None:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(buf, format="JPEG")
    with pytest.raises(ImageError, match="image_corrupt"):
        read_image(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_resize_square() -> None:
    arr = np.zeros((50, 80, 3), np.uint8)
    assert resize_square(arr, 32).shape == (32, 32, 3)
    assert resize_square(arr, 128).shape == (128, 128, 3)
