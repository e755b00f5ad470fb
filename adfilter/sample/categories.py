"""What an ad is about, and how sensitive that makes the post.

Sensitivity rule (one number in [0, 1] per post, used to weight the rare, harmful ads):

| category    | what it is                                                     | sensitivity |
|-------------|----------------------------------------------------------------|-------------|
| `adult`     | sex, porn, "hot singles", adult dating and chat lines          | 1.0         |
| `gambling`  | casinos, betting, slots, poker                                  | 0.9         |
| `prize`     | "you have won", prize draws, claim codes, premium-rate bait    | 0.9         |
| `loan`      | loans, bad credit, debt relief                                  | 0.85        |
| `contact`   | moves the user off the platform: "add V: ab1234", WeChat, QQ,  | 0.5         |
|             | WhatsApp or Telegram IDs with nothing else said                 |             |
| `promotion` | ordinary selling: sales, prices, ringtones, subscriptions      | 0.4         |
| clean       | no advertising                                                  | 0.0         |

A post's sensitivity is the maximum over its parts (text, image). An SMS spam text gets its
category from keyword rules tried in the order adult, gambling, loan, prize (the first rule
that matches wins; none matching means `promotion`); a rendered ad image carries the category
it was rendered with. Every ad is therefore at least 0.4 (>= 0.3 is the guarantee), every
clean post exactly 0.
"""

from __future__ import annotations

import re
from typing import Final

ADULT: Final = "adult"
GAMBLING: Final = "gambling"
PRIZE: Final = "prize"
LOAN: Final = "loan"
CONTACT: Final = "contact"
PROMOTION: Final = "promotion"

CATEGORIES: Final = (ADULT, GAMBLING, PRIZE, LOAN, CONTACT, PROMOTION)

SENSITIVITY: Final[dict[str, float]] = {
    ADULT: 1.0,
    GAMBLING: 0.9,
    PRIZE: 0.9,
    LOAN: 0.85,
    CONTACT: 0.5,
    PROMOTION: 0.4,
}

# Order matters: a "win a date with hot singles" text is adult before it is a prize.
_TEXT_RULES: Final = (
    (
        ADULT,
        re.compile(
            r"\b(sex\w*|porn\w*|xxx(?!x)\w*|horny|randy|saucy|busty|knickers|dogging|fantasies|flirt\w*|dating|gigolo|admirer"
            r"|babes?|laid|wet|naughty|naked|hardcore|hot\s+pics|adult\w*|erotic\w*"
            r"|(hot|local|lonely|exciting)\s+singles)\b",
            re.IGNORECASE,
        ),
    ),
    (
        GAMBLING,
        re.compile(
            r"\b(casino\w*|poker|bet|bets|betting|bingo|slots?|gambl\w*|odds|wager\w*)\b",
            re.IGNORECASE,
        ),
    ),
    (
        LOAN,
        re.compile(
            r"\b(loans?|bad\s+credit|credit\s+check|debts?|mortgage\w*|borrow\w*|apr)\b",
            re.IGNORECASE,
        ),
    ),
    (
        PRIZE,
        re.compile(
            r"\b(won|win|wins|winner\w*|winning|prizes?|award\w*|claim\w*|reward\w*|cash|selected"
            r"|guaranteed|lucky|draw|vouchers?|bonus|congrat\w*|holiday|jackpot|urgent|entitled"
            r"|free\s+entry|points)\b",
            re.IGNORECASE,
        ),
    ),
)


def text_category(text: str) -> str:
    """The category of an advertising text (call it for spam only: it never answers 'clean')."""
    for category, pattern in _TEXT_RULES:
        if pattern.search(text):
            return category
    return PROMOTION


def sensitivity_of(category: str) -> float:
    """Sensitivity of one ad part; `''`, `'ham'` and `'clean'` mean no ad and give 0."""
    if category in ("", "ham", "clean"):
        return 0.0
    try:
        return SENSITIVITY[category]
    except KeyError:
        raise ValueError(
            f"unknown ad category {category!r}; known: {', '.join(CATEGORIES)}"
        ) from None
