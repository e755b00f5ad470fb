"""The embedded multimodal sample: real SMS texts and real photographs, rendered into posts.

Posts come in three shapes, sized by `ingest.sample` in `params.yaml`:

- text only (`n_text_only`): an SMS text, spam or ham as labelled in the corpus;
- text + image (`n_text_image`): a share `hidden_image_ad_fraction` is ham text with an ad
  image (slice `hidden_image_ad`, what a keyword filter misses); of the rest, spam texts get an
  ad image of the same category with probability `spam_text_ad_image_fraction` (else a clean
  one) and ham texts get a clean image;
- image only (`n_image_only`): a share `image_ad_fraction` of ad images, the rest clean.

A share `hard_negative_fraction` of all clean images are hard negatives (ordinary captions,
signs, charts, pages ...; see `adfilter.sample.render`). Each SMS text is used once, spam
spread evenly over the text slices. A post is an ad (label 1) when its text or its image
advertises; its sensitivity is the larger of the parts' (see `adfilter.sample.categories`).

Everything is drawn from `seed`: the plan from one generator, each image from its own
generator keyed by (seed, post number), so the same seed gives byte-identical images and
table.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Final

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from adfilter.config import SampleParams
from adfilter.sample.backgrounds import load_backgrounds, make_background
from adfilter.sample.categories import (
    ADULT,
    CONTACT,
    GAMBLING,
    LOAN,
    PRIZE,
    PROMOTION,
    sensitivity_of,
)
from adfilter.sample.render import (
    AD_STYLES,
    HARD_NEGATIVE_KINDS,
    PLAIN,
    render_ad_image,
    render_clean_image,
)
from adfilter.sample.sms import load_sms_corpus
from adfilter.schema import COLUMNS, slice_of

log = logging.getLogger(__name__)

# Categories of ad images that are not tied to a spam text, and how often each appears.
IMAGE_AD_WEIGHTS: Final[dict[str, float]] = {
    PROMOTION: 0.3,
    CONTACT: 0.25,
    PRIZE: 0.15,
    LOAN: 0.1,
    GAMBLING: 0.1,
    ADULT: 0.1,
}
PNG_SHARE: Final = 0.2  # the rest is JPEG at quality 80-95
JPEG_QUALITY: Final = (80, 95)
DETAIL_COLUMNS: Final = ("text_category", "image_category", "image_style")

_PLAN_STREAM: Final = 1
_IMAGE_STREAM: Final = 2


def _check(params: SampleParams) -> None:
    for name in ("n_text_only", "n_text_image", "n_image_only", "max_texts"):
        if getattr(params, name) < 0:
            raise ValueError(f"ingest.sample.{name} is {getattr(params, name)}; it must be >= 0")
    for name in (
        "hidden_image_ad_fraction",
        "spam_text_ad_image_fraction",
        "image_ad_fraction",
        "hard_negative_fraction",
    ):
        value = getattr(params, name)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"ingest.sample.{name} is {value}; it must lie in [0, 1]")
    if params.image_size < 32:
        raise ValueError(f"ingest.sample.image_size is {params.image_size}; use at least 32 pixels")


def _stratified_take(
    rng: np.random.Generator, spam: list[int], ham: list[int], n: int, share: float
) -> list[int]:
    """Pop `n` indices from the spam and ham pools (in place), about `share` of them spam."""
    n_spam = min(len(spam), int(round(n * share)))
    n_ham = n - n_spam
    if n_ham > len(ham):
        n_ham = len(ham)
        n_spam = n - n_ham
    taken = [spam.pop() for _ in range(n_spam)] + [ham.pop() for _ in range(n_ham)]
    rng.shuffle(taken)
    return taken


def plan_sample(
    params: SampleParams, seed: int, corpus: pd.DataFrame | None = None
) -> pd.DataFrame:
    """What every post will hold, before any image is drawn.

    Columns: id, text, text_category (`''` no text, `ham`, or an ad category), image_category
    (`''` no image, `clean`, or an ad category), image_style (an ad style, a clean kind, or
    `''`), label, sensitivity, slice.
    """
    _check(params)
    rng = np.random.default_rng([seed, _PLAN_STREAM])
    corpus = load_sms_corpus() if corpus is None else corpus
    spam_all = np.flatnonzero(corpus["label"].to_numpy() == 1)
    ham_all = np.flatnonzero(corpus["label"].to_numpy() == 0)
    if 0 < params.max_texts < len(corpus):
        n_spam = int(round(params.max_texts * len(spam_all) / len(corpus)))
        spam_all = rng.choice(spam_all, n_spam, replace=False)
        ham_all = rng.choice(ham_all, params.max_texts - n_spam, replace=False)
    spam = [int(i) for i in rng.permutation(spam_all)]
    ham = [int(i) for i in rng.permutation(ham_all)]

    n_hidden = int(round(params.hidden_image_ad_fraction * params.n_text_image))
    n_texts = params.n_text_only + params.n_text_image
    if n_texts > len(spam) + len(ham) or n_hidden > len(ham):
        raise ValueError(
            f"ingest.sample asks for {n_texts} texts ({n_hidden} of them ham for hidden_image_ad) but "
            f"only {len(spam) + len(ham)} SMS texts ({len(ham)} ham) are available with max_texts="
            f"{params.max_texts}: lower n_text_only / n_text_image or raise max_texts (0 = all)"
        )
    hidden = [ham.pop() for _ in range(n_hidden)]
    share = len(spam) / max(1, len(spam) + len(ham))
    paired = _stratified_take(rng, spam, ham, params.n_text_image - n_hidden, share)
    text_only = _stratified_take(rng, spam, ham, params.n_text_only, share)

    def ad_category() -> str:
        names = list(IMAGE_AD_WEIGHTS)
        weights = np.asarray([IMAGE_AD_WEIGHTS[n] for n in names])
        return names[int(rng.choice(len(names), p=weights / weights.sum()))]

    rows: list[dict] = []

    def add(text_index: int | None, image_category: str) -> None:
        if text_index is None:
            text, text_category = "", ""
        else:
            text = str(corpus["text"].iat[text_index])
            text_category = str(corpus["category"].iat[text_index])
        rows.append(
            {"text": text, "text_category": text_category, "image_category": image_category}
        )

    for i in text_only:
        add(i, "")
    for i in hidden:
        add(i, ad_category())
    spam_paired = [i for i in paired if corpus["label"].iat[i] == 1]
    n_spam_ad = int(round(params.spam_text_ad_image_fraction * len(spam_paired)))
    spam_with_ad = {int(i) for i in rng.permutation(spam_paired)[:n_spam_ad]}
    for i in paired:
        add(i, str(corpus["category"].iat[i]) if i in spam_with_ad else "clean")
    n_image_ads = int(round(params.image_ad_fraction * params.n_image_only))
    for k in range(params.n_image_only):
        add(None, ad_category() if k < n_image_ads else "clean")

    plan = pd.DataFrame(rows, columns=["text", "text_category", "image_category"])
    plan = plan.iloc[rng.permutation(len(plan))].reset_index(drop=True)

    clean = np.flatnonzero(plan["image_category"].to_numpy() == "clean")
    n_hard = int(round(params.hard_negative_fraction * len(clean)))
    hard = set(rng.permutation(clean)[:n_hard].tolist())
    styles = []
    for k, category in enumerate(plan["image_category"]):
        if category == "":
            styles.append("")
        elif category == "clean":
            styles.append(
                HARD_NEGATIVE_KINDS[int(rng.integers(len(HARD_NEGATIVE_KINDS)))]
                if k in hard
                else PLAIN
            )
        else:
            styles.append(AD_STYLES[int(rng.integers(len(AD_STYLES)))])
    plan["image_style"] = styles

    text_ad = ~plan["text_category"].isin(["", "ham"])
    image_ad = ~plan["image_category"].isin(["", "clean"])
    has_text = plan["text"].str.strip() != ""
    has_image = plan["image_category"] != ""
    plan["label"] = (text_ad | image_ad).astype("int64")
    plan["sensitivity"] = [
        max(sensitivity_of(t), sensitivity_of(c))
        for t, c in zip(plan["text_category"], plan["image_category"], strict=True)
    ]
    plan["slice"] = [
        slice_of(bool(t), bool(i), bool(ta), bool(ia))
        for t, i, ta, ia in zip(has_text, has_image, text_ad, image_ad, strict=True)
    ]
    plan.insert(0, "id", [f"p{k:06d}" for k in range(len(plan))])
    return plan


def image_reference(path: Path) -> str:
    """How the `image` column names a file: relative to the working directory (the repository
    root when run by DVC) when it lies below it, else absolute."""
    if not path.is_absolute():
        return path.as_posix()
    try:
        return path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return path.as_posix()


def render_post_image(
    seed: int,
    number: int,
    category: str,
    style: str,
    size: int,
    backgrounds: dict[str, Image.Image] | None = None,
) -> Image.Image:
    """The image of post `number` in the plan: the same (seed, number) always draws the same."""
    rng = np.random.default_rng([seed, _IMAGE_STREAM, number])
    _, background = make_background(
        rng, backgrounds if backgrounds is not None else load_backgrounds(), size
    )
    if category == "clean":
        return render_clean_image(
            rng, background, hard_negative=style != PLAIN, kind=None if style == PLAIN else style
        )
    return render_ad_image(rng, background, category, style)


def _save(rng: np.random.Generator, img: Image.Image, stem: Path) -> Path:
    if rng.random() < PNG_SHARE:
        path = stem.with_suffix(".png")
        img.save(path, "PNG")
    else:
        path = stem.with_suffix(".jpg")
        img.save(path, "JPEG", quality=int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1)))
    return path


def build_sample(params: SampleParams, seed: int, out_dir: str | Path) -> pd.DataFrame:
    """Render the sample's images into `out_dir/images/` and return its posts.

    The table has `adfilter.schema.COLUMNS` (image paths as `image_reference` gives them) plus
    `DETAIL_COLUMNS`: text_category, image_category and image_style, for reports. The caller
    writes it (see `tasks.ingest`).
    """
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_sample(params, seed)
    backgrounds = load_backgrounds()
    to_draw = plan.index[plan["image_category"] != ""]
    paths = [""] * len(plan)
    for k in tqdm(
        to_draw, desc="rendering sample images", unit="img", mininterval=2.0, disable=None
    ):
        img = render_post_image(
            seed,
            int(k),
            plan.at[k, "image_category"],
            plan.at[k, "image_style"],
            params.image_size,
            backgrounds,
        )
        save_rng = np.random.default_rng([seed, _IMAGE_STREAM, int(k), 1])
        paths[k] = image_reference(_save(save_rng, img, images_dir / plan.at[k, "id"]))
    plan["image"] = paths
    log.info(
        "rendered %d images (%dx%d) into %s",
        len(to_draw),
        params.image_size,
        params.image_size,
        os.fspath(images_dir),
    )
    return plan[[*COLUMNS, *DETAIL_COLUMNS]].copy()
