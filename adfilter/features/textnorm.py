"""Text normalisation that undoes the usual tricks ads use to slip past word filters.

`normalize_text` is the one normaliser of the project: features, split de-duplication and
serving all call it, so a post is seen the same way in training and online. It is idempotent
(`normalize_text(normalize_text(x)) == normalize_text(x)`) and runs on every post online, so
the regular expressions are compiled once at import and pure-ASCII posts (most of them) skip the
Unicode steps.

What it does, in order:

1. Unicode compatibility decomposition (NFKD, recomposed at the end, i.e. NFKC): full-width
   and mathematical letters become ASCII (`ＷＩＮ`, `𝐖𝐈𝐍` -> `WIN`), circled digits become
   digits, ligatures are split.
2. Invisible characters (zero-width spaces and joiners, soft hyphens, bidi controls, variation
   selectors, tag characters, Hangul fillers) are removed, and so are the *generic* combining
   diacritics (U+0300-036F, 1AB0-1AFF, 1DC0-1DFF, 20D0-20FF, FE20-FE2F) used for "Zalgo" text
   and keycap emoji. Marks of other scripts (Devanagari vowel signs, Arabic harakat, ...) are
   kept: they are spelling there, not obfuscation. Accents on Latin letters go too (`é` -> `e`),
   which a spam filter wants anyway.
3. Confusable folding: letters of Cyrillic, Greek, Armenian and the IPA block that look like a
   Latin letter are replaced by it (`HOMOGLYPHS` below, a subset of the Unicode TR39
   `confusables.txt` restricted to one letter -> one Latin letter). Following TR39's
   mixed-script idea, a word is folded only when it mixes Latin letters with lookalikes
   (`pаypal` with a Cyrillic `а`) or consists entirely of lookalikes (`ѕех`); an ordinary
   Cyrillic or Greek word with letters that have no Latin twin (`привет`) is left alone.
   Digits used as letters (`fr33`) are out of scope: `3` -> `e` is ambiguous in real text.
4. Case folding (`str.casefold`), and non-ASCII decimal digits (Arabic-Indic, Devanagari, ...)
   become ASCII digits.
5. Spelled-out dots: `[.]`, `(.)`, `(dot)`, `[dot]` always become `.`; a bare ` dot ` (or a
   spaced ` . `) only before a known top-level domain (`example dot com`) or after `www`.
6. Stable tokens *substituted* for the span they stand for: `<chatid>` for messenger links and
   handles (`wa.me/...`, `t.me/...`, `wechat id xyz_88`, `add v: ab1234`, `qq 12345678`; the app
   name is kept, only the handle is replaced; a handle must follow "id"/":"/"@" or look like one,
   with a digit or an underscore, and a bare number is a phone number unless it follows "id" or
   "qq"), `<url>` for other URLs and bare domains,
   `<email>` for e-mail addresses, `<phone>` for digit runs of 7 or more.
7. Digit runs broken up by separators (spaces, `. - _ | * ~ · •`, brackets, emoji) are joined
   (`0 8 0 0 - 1 2 3` -> `0800123`) when there are at least three groups and four digits; dates
   (`12.05.2024`) are left alone. Runs of 7+ digits then become `<phone>`.
8. Whitespace runs collapse to one space; the ends are stripped.

Why substitute rather than append the tokens: a phone number, a handle or a URL is a
high-cardinality string that carries almost no signal by itself (every campaign uses a new
one), wastes the short token budget of the sequence model (a URL is easily 20 WordPiece ids of
64) and fills the TF-IDF vocabulary with one-off n-grams. The token, in place, keeps the
context the models learn from (`call <phone> now`, `add me on wechat <chatid>`), and template
spam that differs only in its number or link gets one fingerprint, so the duplicate-aware split
keeps those variants on one side. The app name next to a handle is kept because it is signal.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Final

URL_TOKEN: Final = "<url>"
EMAIL_TOKEN: Final = "<email>"
PHONE_TOKEN: Final = "<phone>"
CHATID_TOKEN: Final = "<chatid>"
TOKENS: Final = (URL_TOKEN, EMAIL_TOKEN, PHONE_TOKEN, CHATID_TOKEN)

# One letter -> the Latin letter it imitates (TR39 confusables.txt, single-letter entries of
# these scripts whose prototype is one Latin letter). Upper case maps to lower case directly,
# because case folding follows and some capitals only look Latin as capitals (Cyrillic Н, В).
HOMOGLYPHS: Final[dict[str, str]] = {
    # Cyrillic lower case
    "а": "a", "е": "e", "һ": "h", "і": "i", "ј": "j", "к": "k", "ӏ": "l",
    "о": "o", "р": "p", "ԛ": "q", "с": "c", "ѕ": "s", "у": "y", "ү": "y", "ԝ": "w",
    "х": "x", "ԁ": "d",
    # Cyrillic upper case
    "А": "a", "В": "b", "Е": "e", "Һ": "h", "І": "i", "Ј": "j", "К": "k", "Ӏ": "l",
    "М": "m", "Н": "h", "О": "o", "Р": "p", "Ԛ": "q", "С": "c", "Ѕ": "s", "Т": "t",
    "У": "y", "Ү": "y", "Ԝ": "w", "Х": "x", "Ԁ": "d",
    # Greek lower case
    "α": "a", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "υ": "u", "χ": "x",
    "ϲ": "c", "ϳ": "j", "γ": "y",
    # Greek upper case
    "Α": "a", "Β": "b", "Ε": "e", "Η": "h", "Ι": "i", "Κ": "k", "Μ": "m", "Ν": "n",
    "Ο": "o", "Ρ": "p", "Τ": "t", "Υ": "y", "Χ": "x", "Ϲ": "c", "Ϳ": "j", "Ζ": "z",
    # Armenian
    "օ": "o", "ս": "u", "հ": "h", "ո": "n", "ց": "g", "զ": "q", "Օ": "o", "Տ": "s",
    # Latin-script lookalikes outside ASCII that NFKD does not fold
    "ı": "i", "ȷ": "j", "ɑ": "a", "ɡ": "g", "ɩ": "i", "ʏ": "y", "ᴅ": "d", "ᴋ": "k", "ᴍ": "m", "ᴏ": "o",
    "ᴘ": "p", "ᴛ": "t", "ᴜ": "u", "ᴠ": "v", "ᴡ": "w", "ᴢ": "z", "ʀ": "r", "ɴ": "n",
    "ʜ": "h", "ʟ": "l", "ɢ": "g", "ꜱ": "s", "ꞯ": "q", "ᴀ": "a", "ʙ": "b", "ᴄ": "c",
    "ᴇ": "e", "ꜰ": "f", "ɪ": "i", "ᴊ": "j",
}  # fmt: skip
_HOMOGLYPH_TABLE: Final = str.maketrans(HOMOGLYPHS)

_INVISIBLE: Final = (
    "\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
    "\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\U000e0000-\U000e007f\U000e0100-\U000e01ef"
)
_GENERIC_MARKS: Final = "\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f"
_STRIP_RE: Final = re.compile(f"[{_INVISIBLE}{_GENERIC_MARKS}]+")
_WORD_RE: Final = re.compile(r"[^\W\d_]+")
_NON_ASCII_DIGIT_RE: Final = re.compile(r"(?![0-9])\d")

# Top-level domains accepted for bare domains (`example.com`) and spelled-out dots. Two-letter
# ones that are English words (in, it, me, to, us, ...) are left out: "home.it" in a sloppy SMS
# is a missing space, not a link; `wa.me` and `t.me` are matched as messenger links instead.
_TLDS: Final = (
    "com|net|org|info|biz|io|ly|co|uk|xyz|top|club|online|site|shop|store|app|link|click|vip|"
    "loan|ru|cn|de|tk|ml|ga|cf|gq|pw|cc|tv|ws|su|eu|fr|nl|au|ca|jp|kr|hk|tw|sg|ph|vn|br|mx|"
    "es|pl|ua|tr|ir|gl|gd|icu|buzz|fun|pro|mobi|asia|bet|casino|today|live"
)
_BRACKET_DOT_RE: Final = re.compile(r"\s*[(\[{]\s*(?:dot|\.)\s*[)\]}]\s*")
_WORD_DOT_RE: Final = re.compile(
    rf"(?:(?<=[a-z0-9])\s+(?:dot|\.)\s+(?=(?:{_TLDS})\b)|(?<=\bwww)\s*(?:dot|\.)\s*(?=[a-z0-9]))"
)
_CHAT_LINK_RE: Final = re.compile(
    r"(?:https?://)?(?:www\.)?\b(?:wa\.me|t\.me|telegram\.(?:me|dog)|line\.me|m\.me|"
    r"(?:api|chat)\.whatsapp\.com|u\.wechat\.com|weixin\.qq\.com|qm\.qq\.com)\b(?:/\S*)?"
)
_URL_RE: Final = re.compile(
    rf"(?:\b(?:https?|ftp)://\S+|\bwww\.\S+|"
    rf"\b(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+(?:{_TLDS})\b(?:/\S*)?)"
)
_EMAIL_RE: Final = re.compile(r"\b[a-z0-9._%+-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)+\b")
_CHAT_HANDLE_RE: Final = re.compile(
    r"(?P<prefix>\b(?:wechat|weixin|whatsapp|telegram|line|kik|snapchat|snap|skype|viber|"
    r"signal|discord|qq|wx|vx|tg|wa|add\s+(?:me\s+)?v)\b(?:\s*(?:id|no|number|#))?\s*[:=#]?\s*)"
    r"(?P<handle>@?[a-z0-9][a-z0-9_.\-]{1,30}[a-z0-9_])"
)
_PREFIX_NAMES_HANDLE: Final = re.compile(r"\bid\b|#")
_SEP: Final = r"(?:[\s.\-_|*~·•()\[\]\u2190-\u2bff\U0001f000-\U0001faff]{1,4})"
_DIGIT_RUN_RE: Final = re.compile(rf"\d+(?:{_SEP}\d+)+")
_DIGIT_GROUP_RE: Final = re.compile(r"\d+")
_DATE_RE: Final = re.compile(r"\d{1,2}([./-])\d{1,2}\1(?:\d{2}|\d{4})|\d{4}([./-])\d{1,2}\2\d{1,2}")
_PHONE_RE: Final = re.compile(r"(?<!\d)(?:\+\d|\d)\d{6,}(?!\d)")
_HAS_DOMAIN_RE: Final = re.compile(r"[a-z0-9]\.[a-z]|://")
_FINGERPRINT_DROP_RE: Final = re.compile(r"[^\w<>]+")


def normalize_text(text: str) -> str:
    """The canonical form of `text` (see the module docstring for every step and why)."""
    if not text:
        return ""
    text = _unicode_fold(text) if not text.isascii() else text.lower()
    # The cheap `in` checks skip patterns that cannot match: most posts have no link at all.
    if "(" in text or "[" in text or "{" in text:
        text = _BRACKET_DOT_RE.sub(".", text)
    if "dot" in text or " ." in text or "www" in text:
        text = _WORD_DOT_RE.sub(".", text)
    if _HAS_DOMAIN_RE.search(text):
        text = _CHAT_LINK_RE.sub(CHATID_TOKEN, text)
        if "@" in text:
            text = _EMAIL_RE.sub(EMAIL_TOKEN, text)
        text = _URL_RE.sub(URL_TOKEN, text)
    text = _DIGIT_RUN_RE.sub(_join_digit_run, text)
    text = _CHAT_HANDLE_RE.sub(_chat_handle, text)
    text = _PHONE_RE.sub(PHONE_TOKEN, text)
    return " ".join(text.split())


def text_fingerprint(text: str) -> str:
    """A stable 64-bit hash (16 hex digits) of the normalised text, for duplicate detection.

    Punctuation, emoji and spacing do not count ("Sorry, I'll call later" and "sorry i'll call
    later!!" are one post). Empty for a post with no words at all, which has nothing to compare.
    """
    key = _FINGERPRINT_DROP_RE.sub(" ", normalize_text(text)).strip()
    if not key:
        return ""
    return hashlib.blake2b(key.encode("utf-8"), digest_size=8).hexdigest()


def _unicode_fold(text: str) -> str:
    text = _STRIP_RE.sub("", unicodedata.normalize("NFKD", text))
    # Folded before case folding for the capitals that only look Latin as capitals (Н, Т),
    # and again after it: case folding can turn a non-lookalike into a lookalike (Γ -> γ) or a
    # letter into a base plus a generic mark, and without the second round the output would
    # change when normalised again.
    text = _WORD_RE.sub(_fold_word, text)
    text = _STRIP_RE.sub("", unicodedata.normalize("NFKD", text.casefold()))
    text = unicodedata.normalize("NFC", _WORD_RE.sub(_fold_word, text))
    if not text.isascii():
        text = _NON_ASCII_DIGIT_RE.sub(lambda m: str(unicodedata.decimal(m.group())), text)
    return text


def _is_latin(char: str) -> bool:
    return (char < "\u0250" or "\u1d00" <= char <= "\u1eff" or "\u2c60" <= char <= "\u2c7f"
            or "\ua720" <= char <= "\ua7ff" or "\uab30" <= char <= "\uab6f")  # fmt: skip


def _fold_word(match: re.Match[str]) -> str:
    word = match.group()
    if word.isascii():
        return word
    folded = word.translate(_HOMOGLYPH_TABLE)
    if folded == word:
        return word
    # Mixed with real Latin letters, or made of lookalikes only: an imitation of a Latin word.
    if all(_is_latin(c) for c in folded) or any(_is_latin(c) and c not in HOMOGLYPHS for c in word):
        return folded
    return word


def _join_digit_run(match: re.Match[str]) -> str:
    run = match.group()
    if _DATE_RE.fullmatch(run):
        return run
    groups = _DIGIT_GROUP_RE.findall(run)
    if len(groups) < 3 or sum(map(len, groups)) < 4:
        return run
    return "".join(groups)


def _chat_handle(match: re.Match[str]) -> str:
    prefix, handle = match.group("prefix"), match.group("handle")
    explicit = _PREFIX_NAMES_HANDLE.search(prefix) is not None or handle.startswith("@")
    if handle.isdigit() and not explicit and not prefix.startswith("qq"):
        # "private line 01223585334": a bare number is a phone number (the phone rule takes it);
        # only QQ ids are numeric by nature.
        return match.group()
    looks_like_handle = any(c.isdigit() or c == "_" for c in handle)
    if explicit or looks_like_handle:
        return prefix + CHATID_TOKEN
    return match.group()
