"""Scenario traffic for the drift check: posts like the training data, or shifted on purpose.

`generate_posts(scenario, n, seed, sample)` yields `SimPost`s lazily (images are rendered one
chunk at a time, never all at once). The posts are planned and drawn with the embedded
sample's own library (`adfilter.sample`: the SMS corpus, the photographs, the ad and clean
renderers), with the slice mix and shares of `ingest.sample`, so `stable` traffic is what the
model was trained on, drawn afresh. The shifted scenarios change one thing each:

- `stable`: nothing;
- `new-ad-variant`: ads use a tactic absent from training (`drift.simulate.variant_share` of
  them). Ad texts write their contact details and trigger words in an obfuscated script the
  normaliser does not undo: digits as look-alike letters (`O7Bl 4S6` for 07815 456),
  punctuation inside words (`c.a.l.l`, `f-r-e-e`), leetspeak (`w1n c4sh`) and an
  added "a.d.d m.e" contact line. Ad images use a new overlay style, `watermark`: the contact
  handle tiled diagonally over the whole photo at low opacity, unlike the six styles the sample
  renders (banner, sticker, overlay, qr, poster, subtle). The text families here overlap the
  ones the augment stage holds out of training (leetspeak, punctuation inside words); the
  digit look-alikes and the watermark style are in neither the training nor the held-out set.
- `image-shift`: the same posts, but every image (`drift.simulate.shift_share` of them) comes
  through a new camera/app pipeline: a colour grade, vignetting, sensor noise, a lower capture
  resolution and heavy JPEG compression. Labels do not change.

`serving.simulate` pushes these posts through the serving cascade into a prediction store.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import random
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from adfilter.config import SampleParams

STABLE: Final = "stable"
NEW_AD_VARIANT: Final = "new-ad-variant"
IMAGE_SHIFT: Final = "image-shift"
SCENARIOS: Final = (STABLE, NEW_AD_VARIANT, IMAGE_SHIFT)

WATERMARK: Final = "watermark"
OBFUSCATED_TEXT: Final = "obfuscated_text"
CAMERA: Final = "camera"

_CHUNK: Final = 1000            # posts planned at once; plan_sample uses each SMS text once
_PLAN_STREAM: Final = 11
_VARIANT_STREAM: Final = 12
_IMAGE_STREAM: Final = 13


class ScenarioError(ValueError):
    """An unknown scenario name or an impossible size."""


@dataclass(frozen=True)
class SimPost:
    id: str
    text: str                           # '' when the post has none
    image: np.ndarray | None            # RGB uint8, None when the post has none
    label: int                          # 1 = ad
    slice: str
    variant: str                        # what the scenario changed: '', obfuscated_text, watermark, camera


def check_scenario(name: str) -> str:
    if name not in SCENARIOS:
        raise ScenarioError(f"unknown scenario '{name}'; known scenarios: {', '.join(SCENARIOS)}")
    return name


# --------------------------------------------------------------------------- the new ad tactic: text

# Digits as the letters they resemble. The normaliser joins digit runs and turns 7+ digits into
# <phone>; a number that is half letters is neither a run nor a phone number to it.
_DIGIT_LOOKALIKES: Final = {"0": "O", "1": "l", "2": "Z", "5": "S", "8": "B"}
_LEET: Final = {"a": "4", "e": "3", "i": "1", "o": "0", "s": "5", "t": "7"}
_TRIGGERS: Final = frozenset(
    "free call txt text win won winner prize claim cash reply now mobile urgent award guaranteed "
    "stop bonus offer cheap sale discount tone ringtone chat sexy hot dating loan credit money "
    "voucher holiday entry draw selected contact send click visit".split()
)
_CONTACT_LINES: Final = (
    "a.d.d m.e o.n w.h.a.t.s.a.p.p {phone}",
    "w-e-c-h-a-t: {handle}",
    "t e l e g r a m  {handle}",
    "c.a.l.l {phone} n.o.w",
    "a d d  v: {handle}",
    "q.q {digits}",
)


def _lookalike_digits(text: str) -> str:
    return "".join(_DIGIT_LOOKALIKES.get(c, c) for c in text)


def _punctuate(word: str, rng: random.Random) -> str:
    sep = rng.choice([".", "-", "_", "*", " "])
    return sep.join(word)


def _leet(word: str) -> str:
    return "".join(_LEET.get(c.lower(), c) if c.isalpha() else c for c in word)


def _contact(rng: random.Random) -> dict[str, str]:
    digits = "".join(str(rng.randrange(10)) for _ in range(rng.randint(6, 10)))
    phone = rng.choice(["07", "08", "+44 7", "0906"]) + "".join(
        str(rng.randrange(10)) for _ in range(9))
    stem = "".join(rng.choice("abcdefghjkmnpqrstuvwxyz") for _ in range(rng.randint(3, 6)))
    handle = rng.choice([f"{stem}{rng.randint(10, 999)}", f"{stem}_vip", f"{stem}_88"])
    return {"phone": _lookalike_digits(phone), "handle": _lookalike_digits(handle),
            "digits": _lookalike_digits(digits)}


def obfuscate_ad_text(text: str, rng: random.Random) -> str:
    """An ad text with its numbers, trigger words and contact written in the new script."""
    words = text.split(" ")
    out = []
    for word in words:
        core = word.strip(".,!?:;()\"'").lower()
        if any(ch.isdigit() for ch in word):
            out.append(_lookalike_digits(word))
        elif core in _TRIGGERS and len(core) >= 3:
            out.append(_punctuate(word, rng) if rng.random() < 0.7 else _leet(word))
        elif len(core) >= 4 and rng.random() < 0.25:
            out.append(_leet(word))
        else:
            out.append(word)
    result = " ".join(out)
    if rng.random() < 0.6:
        line = rng.choice(_CONTACT_LINES).format(**_contact(rng))
        result = f"{result} {line}" if rng.random() < 0.7 else f"{line} {result}"
    return result


# --------------------------------------------------------------------------- the new ad tactic: image


@functools.cache
def _font_path(bold: bool) -> str:
    import matplotlib

    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: matplotlib's DejaVu fonts are missing; reinstall matplotlib")
    return str(path)


def watermark_image(background: Image.Image, rng: random.Random) -> Image.Image:
    """`background` with a contact handle tiled diagonally over all of it, faint (new style)."""
    img = background.convert("RGBA")
    w, h = img.size
    c = _contact(rng)
    text = rng.choice([f"wx {c['handle']}", f"WA {c['phone']}", f"@{c['handle']}",
                       f"tg {c['handle']}", f"V {c['handle']}"])
    font = ImageFont.truetype(_font_path(rng.random() < 0.6), max(8, int(w * rng.uniform(0.05, 0.08))))
    left, top, right, bottom = font.getbbox(text)
    tw, th = right - left, bottom - top
    side = int(math.hypot(w, h)) + tw
    tile = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    draw = ImageDraw.Draw(tile)
    ink = (255, 255, 255) if rng.random() < 0.6 else (20, 20, 20)
    alpha = rng.randint(60, 110)
    step_x, step_y = int(tw * rng.uniform(1.3, 1.8)), int(th * rng.uniform(2.2, 3.2))
    for row, y in enumerate(range(0, side, max(step_y, 1))):
        offset = (row % 2) * step_x // 2
        for x in range(-step_x, side, max(step_x, 1)):
            draw.text((x + offset - left, y - top), text, font=font, fill=(*ink, alpha))
    tile = tile.rotate(rng.uniform(25, 40) * rng.choice([-1, 1]), resample=Image.Resampling.BICUBIC)
    x0, y0 = (side - w) // 2, (side - h) // 2
    img.alpha_composite(tile.crop((x0, y0, x0 + w, y0 + h)))
    return img.convert("RGB")


# --------------------------------------------------------------------------- image shift


def camera_look(image: Image.Image, rng: random.Random) -> Image.Image:
    """A new capture pipeline: colour grade, vignette, noise, low resolution, heavy JPEG."""
    w, h = image.size
    x = np.asarray(image.convert("RGB"), dtype=np.float32)
    grade = np.array(rng.choice([(1.12, 1.0, 0.82), (0.85, 1.02, 1.15), (1.05, 0.92, 1.1)]))
    x = x * grade
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot((xx - w / 2) / (w / 2), (yy - h / 2) / (h / 2))
    x = x * np.clip(1.0 - rng.uniform(0.35, 0.55) * r**2, 0.2, 1.0)[..., None]
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, rng.uniform(6, 12), x.shape)
    x = np.clip(x + noise, 0, 255).astype(np.uint8)
    out = Image.fromarray(x, "RGB")
    factor = rng.uniform(2.0, 3.0)
    small = out.resize((max(16, int(w / factor)), max(16, int(h / factor))), Image.Resampling.BILINEAR)
    out = small.resize((w, h), Image.Resampling.BILINEAR).filter(ImageFilter.UnsharpMask(2, 80, 2))
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=rng.randint(18, 35))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


# --------------------------------------------------------------------------- the posts


def _chunk_params(sample: SampleParams, n: int) -> SampleParams:
    """The sample's shape scaled to `n` posts (the three slices keep their shares)."""
    total = sample.n_text_only + sample.n_text_image + sample.n_image_only
    if total <= 0:
        raise ScenarioError("ingest.sample has no posts to take the traffic mix from")
    n_text_image = int(round(n * sample.n_text_image / total))
    n_image_only = int(round(n * sample.n_image_only / total))
    n_text_only = max(0, n - n_text_image - n_image_only)
    return dataclasses.replace(sample, n_text_only=n_text_only, n_text_image=n_text_image,
                               n_image_only=n_image_only, max_texts=0)


def generate_posts(
    scenario: str,
    n: int,
    seed: int,
    sample: SampleParams,
    variant_share: float = 1.0,
    shift_share: float = 1.0,
    exclude_texts: Collection[str] = (),
) -> Iterator[SimPost]:
    """`n` posts of `scenario` (see the module docstring), the same for the same arguments.

    Texts in `exclude_texts` (the train split's) are not used: live traffic is posts the model
    has never seen, and the served TF-IDF margins are overconfident on the texts they were
    fitted on, which would make even `stable` traffic look unlike the reference (unseen val and
    test posts)."""
    from adfilter.sample import load_backgrounds, load_sms_corpus, make_background, plan_sample
    from adfilter.sample.build import render_post_image

    check_scenario(scenario)
    if n < 0:
        raise ScenarioError(f"--n must be >= 0, got {n}")
    corpus = load_sms_corpus()
    if exclude_texts:
        corpus = corpus[~corpus["text"].isin(set(exclude_texts))].reset_index(drop=True)
    backgrounds = load_backgrounds()
    made = 0
    chunk_no = 0
    while made < n:
        size = min(_CHUNK, n - made)
        chunk_seed = int(np.random.SeedSequence([seed, _PLAN_STREAM, chunk_no]).generate_state(1)[0])
        plan = plan_sample(_chunk_params(sample, size), chunk_seed, corpus)
        rng = random.Random(f"{seed}:{chunk_no}:{scenario}")
        for k, row in enumerate(plan.itertuples(index=False)):
            text = str(row.text)
            variant = ""
            text_ad = row.text_category not in ("", "ham")
            image_ad = row.image_category not in ("", "clean")
            new_tactic = scenario == NEW_AD_VARIANT and row.label == 1 and rng.random() < variant_share
            if new_tactic and text_ad:
                text = obfuscate_ad_text(text, rng)
                variant = OBFUSCATED_TEXT
            image = None
            if row.image_category:
                if new_tactic and image_ad:
                    img_rng = np.random.default_rng([chunk_seed, _IMAGE_STREAM, k])
                    _, bg = make_background(img_rng, backgrounds, sample.image_size)
                    pil = watermark_image(bg, rng)
                    variant = f"{variant}+{WATERMARK}" if variant else WATERMARK
                else:
                    pil = render_post_image(chunk_seed, k, row.image_category, row.image_style,
                                            sample.image_size, backgrounds)
                if scenario == IMAGE_SHIFT and rng.random() < shift_share:
                    pil = camera_look(pil, rng)
                    variant = CAMERA
                image = np.asarray(pil.convert("RGB"), dtype=np.uint8)
            yield SimPost(
                id=f"{scenario}-s{seed}-{made + k:06d}",
                text=text,
                image=image,
                label=int(row.label),
                slice=str(row.slice),
                variant=variant,
            )
        made += size
        chunk_no += 1
