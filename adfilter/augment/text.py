"""Training text families: textattack recipes and the obfuscations spammers use.

Two sources of the augment stage draw from here:

- `text_attack`: textattack augmenters (`RECIPES`): character swaps, insertions, deletions,
  substitutions, keyboard-neighbour typos, word order swaps, word deletion and contractions,
  all of which work offline. textattack refuses to start without the NLTK `stopwords` corpus
  and tries to download it; `import_textattack` builds that corpus from scikit-learn's English
  stop-word list in a project folder first, so nothing is ever downloaded.
- `obfuscation`: `FAMILIES`, what ads do to slip past word filters: lookalike letters from
  other scripts, full-width and mathematical letters, digits broken up by spaces or emoji,
  digits spelled out, "dot" spelled out in links, emoji between words, random case.

Each family says whether `normalize_text` undoes it (`undone_by_normalize`). A variant that
normalises back to its parent's text carries the parent's features exactly, so it adds no
information; the stage redraws such a variant (see `Obfuscator`), and the families the
normaliser undoes are kept because stacked with the others they still teach the residue.

The families of the held-out evaluation slice live in `adfilter.augment.heldout`; the two
modules share no family and no inserted character (checked by the tests).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from adfilter.config import ObfuscationParams, TextAttackParams
from adfilter.features.textnorm import normalize_text

log = logging.getLogger(__name__)

DEFAULT_CACHE: Final = Path(".cache")
_WORD_RE: Final = re.compile(r"[A-Za-z]{2,}")
_DIGIT_RUN_RE: Final = re.compile(r"\d{4,}")
_ANY_DIGIT_RE: Final = re.compile(r"\d")
_DOMAIN_DOT_RE: Final = re.compile(
    r"(?<=[a-z0-9])\.(?=(?:com|net|org|co|uk|info|biz|ly|io|xyz|ru|cn|de|eu|tv|mobi)\b)"
    r"|(?<=\bwww)\.(?=[a-z0-9])",
    re.IGNORECASE,
)


class AugmentError(RuntimeError):
    """A family, recipe or resource of the augment stage that cannot be used."""


# --------------------------------------------------------------------------- families


@dataclass(frozen=True)
class Family:
    """One perturbation: `apply(text, rng, rate)` returns a changed text when `applies(text)`."""

    name: str
    apply: Callable[[str, random.Random, float], str]
    applies: Callable[[str], bool]
    undone_by_normalize: bool
    alphabet: frozenset[str]        # the non-ASCII characters it may insert


def _pick_words(text: str, rng: random.Random, rate: float) -> list[re.Match[str]]:
    words = list(_WORD_RE.finditer(text))
    if not words:
        return []
    k = max(1, round(rate * len(words)))
    return sorted(rng.sample(words, min(k, len(words))), key=lambda m: m.start())


def _rewrite_words(
    text: str, rng: random.Random, rate: float, rewrite: Callable[[str, random.Random], str]
) -> str:
    out, last = [], 0
    for match in _pick_words(text, rng, rate):
        out.append(text[last : match.start()])
        out.append(rewrite(match.group(), rng))
        last = match.end()
    out.append(text[last:])
    return "".join(out)


def _has_word(text: str) -> bool:
    return _WORD_RE.search(text) is not None


# Lookalikes that `normalize_text` folds back (Cyrillic and Greek, TR39 confusables).
MIXED_SCRIPT: Final[dict[str, str]] = {
    "a": "а", "c": "с", "e": "е", "i": "і", "j": "ј", "o": "о", "p": "р", "s": "ѕ", "x": "х",
    "y": "у", "h": "һ", "d": "ԁ", "k": "к", "v": "ν", "u": "υ",
    "A": "А", "B": "В", "C": "С", "E": "Е", "H": "Н", "I": "І", "J": "Ј", "K": "К", "M": "М",
    "O": "О", "P": "Р", "S": "Ѕ", "T": "Т", "X": "Х", "Y": "У", "N": "Ν", "Z": "Ζ",
}  # fmt: skip
# Lookalikes beyond the normaliser's table (Cherokee capitals, Latin letters with hooks):
# what gets through when a spammer reaches further into Unicode.
FAR_HOMOGLYPHS: Final[dict[str, str]] = {
    "A": "Ꭺ", "B": "Ᏼ", "C": "Ꮯ", "D": "Ꭰ", "E": "Ꭼ", "G": "Ꮐ", "H": "Ꮋ", "J": "Ꭻ", "K": "Ꮶ",
    "L": "Ꮮ", "M": "Ꮇ", "P": "Ꮲ", "R": "Ꭱ", "S": "Ꮪ", "T": "Ꭲ", "V": "Ꮩ", "W": "Ꮃ", "Z": "Ꮓ",
    "b": "ɓ", "d": "ɗ", "f": "ƒ", "g": "ɠ", "h": "ɦ", "k": "ƙ", "m": "ɱ", "n": "ɲ", "p": "ƥ",
    "r": "ɾ", "t": "ƭ", "v": "ʋ", "z": "ȥ", "s": "ʂ",
}  # fmt: skip


def _letters(table: Mapping[str, str], share: float) -> Callable[[str, random.Random], str]:
    def rewrite(word: str, rng: random.Random) -> str:
        spots = [i for i, c in enumerate(word) if c in table]
        if not spots:
            return word
        chosen = rng.sample(spots, max(1, round(share * len(spots))))
        chars = list(word)
        for i in chosen:
            chars[i] = table[chars[i]]
        return "".join(chars)

    return rewrite


def mixed_script(text: str, rng: random.Random, rate: float) -> str:
    """Latin words with some letters swapped for Cyrillic/Greek twins (`pаypal`)."""
    return _rewrite_words(text, rng, rate, _letters(MIXED_SCRIPT, 0.5))


def homoglyph(text: str, rng: random.Random, rate: float) -> str:
    """Letters swapped for lookalikes the normaliser does not know (Cherokee, hooked Latin)."""
    return _rewrite_words(text, rng, rate, _letters(FAR_HOMOGLYPHS, 0.5))


def _shift(word: str, upper: int, lower: int, digit: int | None = None) -> str:
    out = []
    for c in word:
        if "A" <= c <= "Z":
            out.append(chr(upper + ord(c) - ord("A")))
        elif "a" <= c <= "z":
            out.append(chr(lower + ord(c) - ord("a")))
        elif digit is not None and "0" <= c <= "9":
            out.append(chr(digit + ord(c) - ord("0")))
        else:
            out.append(c)
    return "".join(out)


def fullwidth(text: str, rng: random.Random, rate: float) -> str:
    """Words in full-width forms (`ＷＩＮ`)."""
    return _rewrite_words(text, rng, rate, lambda w, _: _shift(w, 0xFF21, 0xFF41))


# Mathematical bold, sans-serif bold and monospace: the three styles with no holes in A-Z/a-z.
_MATH_STYLES: Final = ((0x1D400, 0x1D41A), (0x1D5D4, 0x1D5EE), (0x1D670, 0x1D68A))


def math_letters(text: str, rng: random.Random, rate: float) -> str:
    """Words in mathematical alphanumeric letters (`𝐖𝐈𝐍`), which look bold or monospace."""
    return _rewrite_words(
        text, rng, rate, lambda w, r: _shift(w, *r.choice(_MATH_STYLES))
    )


def case_noise(text: str, rng: random.Random, rate: float) -> str:
    """Random upper/lower case inside words (`FrEe CaSh`)."""

    def rewrite(word: str, r: random.Random) -> str:
        flipped = "".join(c.upper() if r.random() < 0.5 else c.lower() for c in word)
        # Guarantee a change: flip the first letter when the draw reproduced the word.
        return flipped if flipped != word else word[0].swapcase() + word[1:]

    return _rewrite_words(text, rng, rate, rewrite)


def _split_digits(run: str, rng: random.Random, separators: list[str]) -> str:
    # At least four groups: three same-separator groups could read as a date, which the
    # normaliser leaves alone on purpose.
    groups: list[str] = []
    i = 0
    while i < len(run):
        room = len(run) - i
        size = 1 if room <= 4 - len(groups) else rng.randint(1, min(3, room))
        groups.append(run[i : i + size])
        i += size
    sep = rng.choice(separators)
    return sep.join(groups)


def _rewrite_digit_runs(text: str, rng: random.Random, separators: list[str]) -> str:
    return _DIGIT_RUN_RE.sub(lambda m: _split_digits(m.group(), rng, separators), text)


def _has_digit_run(text: str) -> bool:
    return _DIGIT_RUN_RE.search(text) is not None


def spaced_digits(text: str, rng: random.Random, rate: float) -> str:
    """Phone numbers and codes broken up: `0 8 0 0 - 1 2 3`, `08.00.12.3`."""
    return _rewrite_digit_runs(text, rng, [" ", "-", ".", " - ", " . ", "_", "|", "·"])


EMOJI: Final = ("🔥", "💰", "🎁", "✅", "👉", "💯", "🎉", "📲", "⭐", "✨", "📞", "💸", "🤑", "❤")


def emoji_digits(text: str, rng: random.Random, rate: float) -> str:
    """Digits separated by emoji (`0📞8📞0📞0`)."""
    emoji = rng.choice(EMOJI)
    return _rewrite_digit_runs(text, rng, [emoji, f" {emoji} "])


_DIGIT_NAMES: Final = {
    "0": ("zero", "oh", "o"), "1": ("one",), "2": ("two",), "3": ("three",), "4": ("four",),
    "5": ("five",), "6": ("six",), "7": ("seven",), "8": ("eight",), "9": ("nine",),
}  # fmt: skip


def digit_words(text: str, rng: random.Random, rate: float) -> str:
    """Digits spelled out as words (`call oh eight hundred`-style: `zero eight zero ...`)."""

    def rewrite(match: re.Match[str]) -> str:
        if rng.random() > max(rate, 0.5):
            return match.group()
        return " " + " ".join(rng.choice(_DIGIT_NAMES[d]) for d in match.group()) + " "

    out = re.sub(r"\d+", rewrite, text)
    if out == text:  # every run was skipped by chance: spell out the first one
        out = re.sub(r"\d+", lambda m: " " + " ".join(_DIGIT_NAMES[d][0] for d in m.group()) + " ",
                     text, count=1)
    return " ".join(out.split())


def dot_spelled(text: str, rng: random.Random, rate: float) -> str:
    """Dots in links spelled out: `example dot com`, `example(dot)com`, `example[.]com`."""
    forms = [" dot ", "(dot)", "[.]", " [dot] ", "(.)", " . "]
    form = rng.choice(forms)
    return _DOMAIN_DOT_RE.sub(form, text)


def _has_domain(text: str) -> bool:
    return _DOMAIN_DOT_RE.search(text) is not None


def emoji_words(text: str, rng: random.Random, rate: float) -> str:
    """Emoji between words, the way ads shout (`FREE 🔥 entry 💰`)."""
    words = text.split(" ")
    if len(words) < 2:
        return f"{text} {rng.choice(EMOJI)}"
    k = max(1, round(rate * (len(words) - 1) / 2))
    for pos in sorted(rng.sample(range(1, len(words)), min(k, len(words) - 1)), reverse=True):
        words.insert(pos, rng.choice(EMOJI) * rng.randint(1, 2))
    return " ".join(words)


def _always(text: str) -> bool:
    return bool(text.strip())


def _alphabet(*tables: Any) -> frozenset[str]:
    chars: set[str] = set()
    for table in tables:
        values = table.values() if isinstance(table, Mapping) else table
        for value in values:
            chars.update(c for c in value if not c.isascii())
    return frozenset(chars)


def _shifted_alphabet(pairs: tuple[tuple[int, int], ...]) -> frozenset[str]:
    return frozenset(chr(base + i) for upper, lower in pairs for base in (upper, lower)
                     for i in range(26))


FAMILIES: Final[dict[str, Family]] = {
    f.name: f
    for f in (
        Family("mixed_script", mixed_script, _has_word, True, _alphabet(MIXED_SCRIPT)),
        Family("homoglyph", homoglyph, _has_word, False, _alphabet(FAR_HOMOGLYPHS)),
        Family("fullwidth", fullwidth, _has_word, True, _shifted_alphabet(((0xFF21, 0xFF41),))),
        Family("math_letters", math_letters, _has_word, True, _shifted_alphabet(_MATH_STYLES)),
        Family("case_noise", case_noise, _has_word, True, frozenset()),
        Family("spaced_digits", spaced_digits, _has_digit_run, True, frozenset("·")),
        Family("emoji_digits", emoji_digits, _has_digit_run, True, _alphabet(EMOJI)),
        Family("digit_words", digit_words, lambda t: _ANY_DIGIT_RE.search(t) is not None, False,
               frozenset()),
        Family("dot_spelled", dot_spelled, _has_domain, True, frozenset()),
        Family("emoji_words", emoji_words, _always, False, _alphabet(EMOJI)),
    )
}


def check_names(chosen: Mapping[str, float], known: Mapping[str, Any], where: str) -> None:
    """Fail naming the params key when `chosen` holds an unknown name or a negative weight."""
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise AugmentError(
            f"params.yaml {where}: unknown name(s) {', '.join(unknown)}; known: "
            f"{', '.join(sorted(known))}"
        )
    negative = sorted(k for k, v in chosen.items() if v < 0)
    if negative:
        raise AugmentError(f"params.yaml {where}: negative weight for {', '.join(negative)}")


class Obfuscator:
    """Stacks 1..max_families training families on a text, chosen by their weights.

    A variant whose normalised text equals the parent's is redrawn up to `max_attempts`
    times, then given up (`None`): its features would be the parent's exactly.
    """

    def __init__(self, params: ObfuscationParams) -> None:
        check_names(params.families, FAMILIES, "augment.obfuscation.families")
        self.params = params
        self.names = [n for n, w in params.families.items() if w > 0]
        self.weights = [params.families[n] for n in self.names]

    def variant(self, text: str, rng: random.Random) -> tuple[str, list[str]] | None:
        """(variant, families applied), or None when every attempt normalised back."""
        base = normalize_text(text)
        usable = [(n, w) for n, w in zip(self.names, self.weights, strict=True)
                  if FAMILIES[n].applies(text)]
        if not usable:
            return None
        names, weights = zip(*usable, strict=True)
        residual = [(n, w) for n, w in usable if not FAMILIES[n].undone_by_normalize]
        for attempt in range(max(1, self.params.max_attempts)):
            k = rng.randint(1, min(self.params.max_families, len(names)))
            chosen = _weighted_sample(list(names), list(weights), k, rng)
            if attempt and residual and all(FAMILIES[n].undone_by_normalize for n in chosen):
                # The last draw normalised back: this time one family has to survive it.
                chosen[-1] = _weighted_sample([n for n, _ in residual], [w for _, w in residual],
                                              1, rng)[0]
            out = text
            for name in chosen:
                out = FAMILIES[name].apply(out, rng, self.params.rate)
            if out != text and normalize_text(out) != base:
                return out, chosen
        return None


def _weighted_sample(names: list[str], weights: list[float], k: int, rng: random.Random) -> list[str]:
    names, weights = list(names), list(weights)
    chosen = []
    for _ in range(k):
        pick = rng.choices(range(len(names)), weights=weights)[0]
        chosen.append(names.pop(pick))
        weights.pop(pick)
    return chosen


# --------------------------------------------------------------------------- textattack


def build_nltk_data(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """`cache_dir/nltk_data` with `corpora/stopwords/english`, built from scikit-learn's list.

    textattack's StopwordModification reads NLTK's English stop words; the project makes the
    corpus itself (one word a line, NLTK's format) instead of letting NLTK download it.
    """
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    root = Path(cache_dir) / "nltk_data"
    target = root / "corpora" / "stopwords" / "english"
    words = "\n".join(sorted(ENGLISH_STOP_WORDS)) + "\n"
    if not target.is_file() or target.read_text(encoding="utf-8") != words:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(words, encoding="utf-8")
    return root


# textattack points these at its cache folder when TA_CACHE_DIR is set; they are put back.
_TEXTATTACK_ENV: Final = ("TFHUB_CACHE_DIR", "PYTORCH_TRANSFORMERS_CACHE", "HF_HOME",
                          "XDG_CACHE_HOME")


def import_textattack(cache_dir: Path = DEFAULT_CACHE) -> Any:
    """`import textattack` offline: NLTK data built first, the post-install download skipped.

    On its first import textattack downloads NLTK corpora and marks that done with a file in
    its cache folder; the folder is put under `cache_dir/textattack` and the mark written
    beforehand, since every corpus it needs here is built by `build_nltk_data`.
    """
    nltk_root = build_nltk_data(cache_dir)
    paths = [str(nltk_root.resolve()), *filter(None, os.environ.get("NLTK_DATA", "").split(os.pathsep))]
    os.environ["NLTK_DATA"] = os.pathsep.join(dict.fromkeys(paths))
    ta_cache = (Path(cache_dir) / "textattack").resolve()
    ta_cache.mkdir(parents=True, exist_ok=True)
    (ta_cache / "post_install_check_3").touch()
    saved = {k: os.environ.get(k) for k in (*_TEXTATTACK_ENV, "TA_CACHE_DIR")}
    os.environ["TA_CACHE_DIR"] = str(ta_cache)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import nltk

        if str(nltk_root.resolve()) not in nltk.data.path:
            nltk.data.path.insert(0, str(nltk_root.resolve()))
        import textattack
    except Exception as exc:  # textattack's import chain raises many unrelated types
        raise AugmentError(
            f"cannot import textattack ({type(exc).__name__}: {exc}); install the project from "
            f"requirements.lock (textattack==0.3.11 with flair==0.15.1, transformers<5)"
        ) from exc
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return textattack


def _recipes() -> dict[str, Callable[[], Any]]:
    from textattack.transformations import (
        CompositeTransformation,
        WordDeletion,
        WordInnerSwapRandom,
        WordSwapContract,
        WordSwapExtend,
        WordSwapNeighboringCharacterSwap,
        WordSwapQWERTY,
        WordSwapRandomCharacterDeletion,
        WordSwapRandomCharacterInsertion,
        WordSwapRandomCharacterSubstitution,
    )

    edge = {"random_one": True, "skip_first_char": True, "skip_last_char": True}
    return {
        "char_swap": lambda: WordSwapNeighboringCharacterSwap(**edge),
        "char_insert": lambda: WordSwapRandomCharacterInsertion(**edge),
        "char_delete": lambda: WordSwapRandomCharacterDeletion(**edge),
        "char_substitute": lambda: WordSwapRandomCharacterSubstitution(random_one=True),
        "qwerty": lambda: WordSwapQWERTY(**edge),
        "word_order": WordInnerSwapRandom,
        "word_delete": WordDeletion,
        "contraction": lambda: CompositeTransformation([WordSwapContract(), WordSwapExtend()]),
    }


RECIPES: Final = ("char_swap", "char_insert", "char_delete", "char_substitute", "qwerty",
                  "word_order", "word_delete", "contraction")


@contextlib.contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """textattack draws from Python's and NumPy's global generators; seed them for one call
    and put their state back, so a variant depends on its own seed only."""
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class TextAttacker:
    """textattack augmenters, one per recipe in `augment.text_attack.recipes`.

    `variants(text, n, seed)` returns up to `n` distinct variants with the recipe that made
    each; fewer when the text offers too little to change (a two-word post).
    """

    def __init__(self, params: TextAttackParams, cache_dir: Path = DEFAULT_CACHE) -> None:
        check_names(params.recipes, dict.fromkeys(RECIPES), "augment.text_attack.recipes")
        import_textattack(cache_dir)
        from textattack.augmentation import Augmenter
        from textattack.constraints.pre_transformation import (
            RepeatModification,
            StopwordModification,
        )

        factories = _recipes()
        self.params = params
        self.names = [n for n, w in params.recipes.items() if w > 0]
        self.weights = [params.recipes[n] for n in self.names]
        if not self.names:
            raise AugmentError("params.yaml augment.text_attack.recipes: every weight is 0")
        stopwords = StopwordModification()
        self.augmenters = {
            name: Augmenter(
                transformation=factories[name](),
                constraints=[RepeatModification(), stopwords],
                pct_words_to_swap=params.pct_words_to_swap,
                transformations_per_example=1,
            )
            for name in self.names
        }

    def variants(self, text: str, n: int, seed: int) -> list[tuple[str, str]]:
        rng = random.Random(seed)
        plan: dict[str, int] = {}
        for name in rng.choices(self.names, weights=self.weights, k=n):
            plan[name] = plan.get(name, 0) + 1
        out: list[tuple[str, str]] = []
        seen = {text}
        for i, (name, count) in enumerate(sorted(plan.items())):
            augmenter = self.augmenters[name]
            augmenter.transformations_per_example = count
            with seeded_global_rngs(seed * 31 + i):
                try:
                    produced = augmenter.augment(text)
                except (IndexError, ValueError, KeyError) as exc:
                    # A few recipes trip over texts made of punctuation only; skip the text.
                    log.debug("textattack %s failed on %r: %s", name, text[:60], exc)
                    produced = []
            for variant in produced:
                if variant not in seen:
                    seen.add(variant)
                    out.append((variant, name))
        return out[:n]
