"""normalize_text / text_fingerprint on real obfuscation patterns seen in ad spam."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adfilter.features.textnorm import HOMOGLYPHS, normalize_text, text_fingerprint


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # full-width letters, a Cyrillic "а", doubled spaces
        ("ＷＩＮ  а prize", "win a prize"),
        ("𝐅𝐑𝐄𝐄 𝐂𝐀𝐒𝐇", "free cash"),
        # zero-width characters and soft hyphens inside words
        ("fr\u200bee m\u200cone\u00ady", "free money"),
        ("c\u2060a\ufeffsh", "cash"),
        # combining marks stacked to break words ("Zalgo")
        ("F̷̛R̶E̴E̵ ̸v̸i̶a̴g̶r̷a̵", "free viagra"),
        ("Ĉàśh", "cash"),
        # homoglyphs mixed into Latin words, and words made only of lookalikes
        ("Pаyраl", "paypal"),  # Cyrillic а and р
        ("ѕех", "sex"),  # all Cyrillic
        ("ΙΝVΕSΤ", "invest"),  # Greek capitals
        ("Bitсоіn", "bitcoin"),
        # spelled-out and bracketed dots
        ("visit spam dot com", "visit <url>"),
        ("visit spam(dot)com now", "visit <url> now"),
        ("www dot spam [.] net", "<url>"),
        ("go to cheap-pills[dot]ru", "go to <url>"),
        ("http://bit.ly/3xYz", "<url>"),
        ("see www.winbig.co.uk/claim", "see <url>"),
        # spaced, separated and emoji-separated digits
        ("call 0 8 0 0 - 1 2 3 now", "call <phone> now"),
        ("0.8.0.0", "0800"),
        ("0️⃣8️⃣0️⃣0️⃣1️⃣2️⃣3️⃣", "<phone>"),
        ("0🔥8🔥0🔥0🔥1🔥2🔥3", "<phone>"),
        ("ring ０９０６１７０１４６１", "ring <phone>"),
        ("+44 7911 123456", "<phone>"),
        ("Call 09061701461 to claim", "call <phone> to claim"),
        ("٠٧٩١١١٢٣٤٥٦", "<phone>"),  # Arabic-Indic digits
        # messenger handles and links
        ("add V: ab1234", "add v: <chatid>"),
        ("wechat id xyz_88", "wechat id <chatid>"),
        ("qq 12345678", "qq <chatid>"),
        ("telegram @cryptoking", "telegram <chatid>"),
        ("wa.me/447911123456", "<chatid>"),
        ("join https://t.me/pumpgroup today", "join <chatid> today"),
        ("mail a.b@spam.com", "mail <email>"),
    ],
)
def test_obfuscation_is_undone(raw: str, expected: str) -> None:
    assert normalize_text(raw) == expected


@pytest.mark.parametrize(
    "text",
    [
        "Sorry, I'll call later",
        "meet on 12.05.2024 at 10.30",  # a date and a time are not phone numbers
        "i have 3 kids and 2 dogs",
        "version 1.2.3",
        "text win to 87121",  # a short code is kept as it is
        "signal is weak here",  # an app name without a handle
        "line: call me",
        "home.it's fine",  # a missing space, not a link
        "привет",  # a real Cyrillic word stays Cyrillic
        "नमस्ते दोस्त",  # script-specific marks are spelling, not obfuscation
        "polka dot dress",
    ],
)
def test_ordinary_text_is_kept(text: str) -> None:
    assert normalize_text(text) == " ".join(text.lower().split())


@pytest.mark.parametrize(("raw", "expected"), [("аß", "ass"), ("ΓΑ", "ya"), ("ТЫ", "ты"), ("МАМА", "mama")])
def test_confusable_folding_decides_per_word(raw: str, expected: str) -> None:
    assert normalize_text(raw) == expected


def test_bare_number_after_app_name_is_a_phone() -> None:
    assert normalize_text("private line 01223585334") == "private line <phone>"


def test_homoglyph_table_maps_to_single_ascii_letters() -> None:
    for source, target in HOMOGLYPHS.items():
        assert len(source) == 1 and not source.isascii(), source
        assert len(target) == 1 and "a" <= target <= "z", (source, target)


_OBFUSCATION_ALPHABET = st.sampled_from(
    list("abcxyz019 .-_()[]@:/#+\n\t")
    + list(HOMOGLYPHS)
    + ["\u200b", "\u00ad", "\ufe0f", "\u20e3", "\u0301", "\u0336", "İ", "ß", "ﬁ", "Ａ", "①"]
    + [c.upper() for c in HOMOGLYPHS] + [c.lower() for c in HOMOGLYPHS]
    + ["🔥", "٣", "ё", "й", "ΐ", "ǰ", "ẖ", "Γ", "Ω", "Ы", "Σ", "ς", "ǅ", "ᾼ", "K", "Å"]
    + ["dot", "www", "qq ", "wechat id ", ".com", "wa.me/"]
)


@settings(max_examples=1000, deadline=None)
@given(st.lists(_OBFUSCATION_ALPHABET, max_size=30).map("".join))
def test_idempotent(text: str) -> None:
    once = normalize_text(text)
    assert normalize_text(once) == once


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_idempotent_on_any_unicode(text: str) -> None:
    once = normalize_text(text)
    assert normalize_text(once) == once


def test_fingerprint_ignores_obfuscation_punctuation_and_spacing() -> None:
    assert text_fingerprint("WIN a prize") == text_fingerprint("ＷＩＮ  а prize!!")
    assert text_fingerprint("Sorry, I'll call later") == text_fingerprint("sorry i'll call later")
    assert text_fingerprint("WIN a prize") != text_fingerprint("WIN a car")
    assert len(text_fingerprint("hello")) == 16


def test_fingerprint_joins_template_spam_with_different_numbers() -> None:
    a = "URGENT! Call 09061701461 to claim your prize"
    b = "URGENT! Call 09050000878 to claim your prize"
    assert text_fingerprint(a) == text_fingerprint(b)


def test_fingerprint_of_textless_post_is_empty() -> None:
    assert text_fingerprint("") == ""
    assert text_fingerprint(" 🔥!! ") == ""
