"""Held-out obfuscation families: used ONLY to build the `obfuscated_ads_heldout` evaluation slice.

Nothing here is used to make training data, and this module imports nothing from the training
families (`adfilter.augment.text`, `adfilter.augment.images`), so a gain measured on the slice
is a gain on tricks the model has not been shown:

- text: leetspeak (`fr33 c4$h`), letters spaced out (`F R E E`), punctuation inside words
  (`f.r.e.e`), repeated letters (`freeeee`), zero-width characters inside words, combining
  marks ("Zalgo"), circled letters (`ⓕⓡⓔⓔ`);
- image: JPEG recompression at low quality, pixelation, a coloured frame around a shrunken
  image, a grid of lines drawn over it.

`normalize_text` undoes three of the text families (zero-width, combining marks, circled
letters: `undone_by_normalize`); a variant made only of those reaches the model as its original
did, which is what the normaliser is for, and the report counts such variants separately.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

import cv2
import numpy as np

from adfilter.config import HeldoutParams

_WORD_RE: Final = re.compile(r"[A-Za-z]{3,}")


class HeldoutError(ValueError):
    """A held-out family name in params.yaml that does not exist."""


@dataclass(frozen=True)
class TextFamily:
    name: str
    apply: Callable[[str, random.Random], str]
    undone_by_normalize: bool
    alphabet: frozenset[str]        # the non-ASCII characters it may insert


@dataclass(frozen=True)
class ImageFamily:
    name: str
    apply: Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _words(text: str, rng: random.Random, share: float = 0.4) -> list[re.Match[str]]:
    words = list(_WORD_RE.finditer(text))
    if not words:
        return []
    k = max(1, round(share * len(words)))
    return sorted(rng.sample(words, min(k, len(words))), key=lambda m: m.start())


def _each_word(text: str, rng: random.Random, rewrite: Callable[[str, random.Random], str]) -> str:
    out, last = [], 0
    for match in _words(text, rng):
        out.append(text[last : match.start()])
        out.append(rewrite(match.group(), rng))
        last = match.end()
    out.append(text[last:])
    return "".join(out)


_LEET: Final = {"a": "4@", "e": "3", "i": "1!", "o": "0", "s": "5$", "t": "7", "l": "1", "g": "9",
                "b": "8"}  # fmt: skip


def leetspeak(text: str, rng: random.Random) -> str:
    def rewrite(word: str, r: random.Random) -> str:
        spots = [i for i, c in enumerate(word) if c.lower() in _LEET]
        if not spots:
            return word + "!"
        chars = list(word)
        for i in r.sample(spots, max(1, len(spots) // 2 + 1) if len(spots) > 1 else 1):
            chars[i] = r.choice(_LEET[chars[i].lower()])
        return "".join(chars)

    return _each_word(text, rng, rewrite)


def letter_spacing(text: str, rng: random.Random) -> str:
    return _each_word(text, rng, lambda w, r: " ".join(w.upper() if r.random() < 0.5 else w))


def intraword_punct(text: str, rng: random.Random) -> str:
    return _each_word(text, rng, lambda w, r: r.choice([".", "-", "*", "_", "'"]).join(w))


def char_repeat(text: str, rng: random.Random) -> str:
    def rewrite(word: str, r: random.Random) -> str:
        i = r.randrange(len(word))
        return word[: i + 1] + word[i] * r.randint(2, 4) + word[i + 1 :]

    return _each_word(text, rng, rewrite)


_ZERO_WIDTH: Final = ("\u200b", "\u200c", "\u200d", "\u2060", "\ufeff")


def zero_width(text: str, rng: random.Random) -> str:
    def rewrite(word: str, r: random.Random) -> str:
        return "".join(c + (r.choice(_ZERO_WIDTH) if i < len(word) - 1 else "")
                       for i, c in enumerate(word))

    return _each_word(text, rng, rewrite)


_MARKS: Final = tuple(chr(c) for c in range(0x0300, 0x0370))


def combining_marks(text: str, rng: random.Random) -> str:
    def rewrite(word: str, r: random.Random) -> str:
        return "".join(c + "".join(r.choice(_MARKS) for _ in range(r.randint(1, 3))) for c in word)

    return _each_word(text, rng, rewrite)


def _circled(c: str) -> str:
    if "A" <= c <= "Z":
        return chr(0x24B6 + ord(c) - ord("A"))
    if "a" <= c <= "z":
        return chr(0x24D0 + ord(c) - ord("a"))
    return c


def circled_letters(text: str, rng: random.Random) -> str:
    return _each_word(text, rng, lambda w, r: "".join(_circled(c) for c in w))


TEXT_FAMILIES: Final[dict[str, TextFamily]] = {
    f.name: f
    for f in (
        TextFamily("leetspeak", leetspeak, False, frozenset()),
        TextFamily("letter_spacing", letter_spacing, False, frozenset()),
        TextFamily("intraword_punct", intraword_punct, False, frozenset()),
        TextFamily("char_repeat", char_repeat, False, frozenset()),
        TextFamily("zero_width", zero_width, True, frozenset(_ZERO_WIDTH)),
        TextFamily("combining_marks", combining_marks, True, frozenset(_MARKS)),
        TextFamily("circled_letters", circled_letters, True,
                   frozenset(chr(c) for c in range(0x24B6, 0x24EA))),
    )
}


# --------------------------------------------------------------------------- images


def jpeg(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    quality = int(rng.integers(5, 25))
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # OpenCV without a JPEG codec: nothing to do, and never silently the same image
        raise RuntimeError("cv2.imencode('.jpg') failed: this OpenCV build has no JPEG codec")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def pixelate(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = rgb.shape[:2]
    block = int(rng.integers(3, 7))
    small = cv2.resize(rgb, (max(1, w // block), max(1, h // block)), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


def frame(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = rgb.shape[:2]
    border = max(2, int(min(h, w) * rng.uniform(0.08, 0.18)))
    colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
    inner = cv2.resize(rgb, (max(1, w - 2 * border), max(1, h - 2 * border)),
                       interpolation=cv2.INTER_AREA)
    out = np.empty_like(rgb)
    out[:] = np.array(colour, dtype=np.uint8)
    out[border : border + inner.shape[0], border : border + inner.shape[1]] = inner
    return out


def grid_overlay(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = rgb.copy()
    h, w = out.shape[:2]
    step = max(4, int(min(h, w) / rng.integers(6, 12)))
    colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
    thickness = max(1, min(h, w) // 150)
    for x in range(int(rng.integers(0, step)), w, step):
        cv2.line(out, (x, 0), (x, h - 1), colour, thickness)
    for y in range(int(rng.integers(0, step)), h, step):
        cv2.line(out, (0, y), (w - 1, y), colour, thickness)
    return out


IMAGE_FAMILIES: Final[dict[str, ImageFamily]] = {
    f.name: f
    for f in (
        ImageFamily("jpeg", jpeg),
        ImageFamily("pixelate", pixelate),
        ImageFamily("frame", frame),
        ImageFamily("grid_overlay", grid_overlay),
    )
}


def _check(chosen: Mapping[str, float], known: Mapping[str, object], where: str) -> list[str]:
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise HeldoutError(
            f"params.yaml {where}: unknown held-out family {', '.join(unknown)}; known: "
            f"{', '.join(sorted(known))}"
        )
    return [n for n, w in chosen.items() if w > 0]


class HeldoutObfuscator:
    """Applies 1..max_families held-out families to the text and/or image of a test ad."""

    def __init__(self, params: HeldoutParams) -> None:
        self.params = params
        self.text_names = _check(params.text_families, TEXT_FAMILIES, "augment.heldout.text_families")
        self.image_names = _check(params.image_families, IMAGE_FAMILIES,
                                  "augment.heldout.image_families")

    def _choose(self, names: list[str], weights: Mapping[str, float], rng: random.Random) -> list[str]:
        pool = list(names)
        k = rng.randint(1, min(self.params.max_families, len(pool)))
        chosen = []
        for _ in range(k):
            pick = rng.choices(range(len(pool)), weights=[weights[n] for n in pool])[0]
            chosen.append(pool.pop(pick))
        return chosen

    def text(self, text: str, rng: random.Random) -> tuple[str, list[str]]:
        """(variant, families); the text unchanged and [] when it has no word to work on."""
        if not self.text_names or not _WORD_RE.search(text):
            return text, []
        chosen = self._choose(self.text_names, self.params.text_families, rng)
        out = text
        for name in chosen:
            out = TEXT_FAMILIES[name].apply(out, rng)
        return out, chosen

    def image(self, rgb: np.ndarray, rng: random.Random) -> tuple[np.ndarray, list[str]]:
        if not self.image_names:
            return rgb, []
        chosen = self._choose(self.image_names, self.params.image_families, rng)
        gen = np.random.default_rng(rng.getrandbits(63))
        out = rgb
        for name in chosen:
            out = IMAGE_FAMILIES[name].apply(out, gen)
        return np.ascontiguousarray(out, dtype=np.uint8), chosen
