"""The post: the one record every stage reads and writes.

A post has `id`, `text` (may be empty), `image` (path relative to the repository root, may be
empty), `label` (1 = advertising/spam, 0 = clean), `sensitivity` in [0, 1] and `slice`.
Tables of posts are Parquet files with exactly these columns (plus `reason` in quarantine).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

COLUMNS: Final = ("id", "text", "image", "label", "sensitivity", "slice")

TEXT_ONLY: Final = "text_only"
IMAGE_ONLY: Final = "image_only"
TEXT_IMAGE: Final = "text_image"
HIDDEN_IMAGE_AD: Final = "hidden_image_ad"
SLICES: Final = (TEXT_ONLY, IMAGE_ONLY, TEXT_IMAGE, HIDDEN_IMAGE_AD)


@dataclass(frozen=True)
class Post:
    id: str
    text: str = ""
    image: str = ""
    label: int = 0
    sensitivity: float = 0.0
    slice: str = TEXT_ONLY

    @property
    def has_text(self) -> bool:
        return bool(self.text.strip())

    @property
    def has_image(self) -> bool:
        return bool(self.image)


def slice_of(has_text: bool, has_image: bool, text_is_ad: bool, image_is_ad: bool) -> str:
    """The evaluation slice of a post; `hidden_image_ad` is clean text with an ad image."""
    if has_text and has_image:
        return HIDDEN_IMAGE_AD if (image_is_ad and not text_is_ad) else TEXT_IMAGE
    return IMAGE_ONLY if has_image else TEXT_ONLY
