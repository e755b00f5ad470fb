"""The fastText gate as the server runs it: `gate.bin` + `gate.json` from the bundle.

The file format is the one the export stage writes (`models.gate.FastTextGate.save`):
`gate.json` holds the calibrated `low` / `high` thresholds, the label names and whether the
gate reads normalised text. The server loads it with the `fasttext` package directly, because
`serving/` must not import the training code; the few lines of scoring below mirror
`models.gate.fasttext_p_ad`, and `tests/unit/test_serving_units.py` checks that both give the
same probabilities.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

MODEL_FILE: Final = "gate.bin"
META_FILE: Final = "gate.json"
AD_LABEL: Final = "__label__ad"


class TextGate:
    """P(ad) of normalised texts, with the thresholds the gate was calibrated to:
    `p <= low` is confidently clean, `p >= high` confidently an ad."""

    def __init__(self, model: Any, low: float, high: float, ad_label: str = AD_LABEL,
                 normalized_text: bool = True) -> None:
        if not low < high:
            raise ValueError(f"gate thresholds must satisfy low < high, got low={low}, high={high}")
        self.model = model
        self.low = float(low)
        self.high = float(high)
        self.ad_label = ad_label
        self.normalized_text = normalized_text

    @classmethod
    def load(cls, directory: str | Path) -> TextGate:
        import fasttext

        directory = Path(directory)
        model_path, meta_path = directory / MODEL_FILE, directory / META_FILE
        for path in (model_path, meta_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} not found: a model bundle holds {MODEL_FILE} and {META_FILE} "
                    f"(written by the export stage: dvc repro export)"
                )
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        try:
            low, high = float(meta["low"]), float(meta["high"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"{meta_path}: needs numeric 'low' and 'high' gate thresholds ({exc}); "
                f"re-run the export stage"
            ) from exc
        labels = meta.get("labels") or []
        ad_label = next((name for name in labels if name.endswith("ad")), AD_LABEL)
        model = fasttext.load_model(str(model_path))
        return cls(model, low, high, ad_label, bool(meta.get("normalized_text", True)))

    def p_ad(self, texts: Sequence[str]) -> np.ndarray:
        """P(ad) per text, one batched call into fastText's C++ code.

        Texts must already be normalised (`adfilter.features.normalize_text`) when the gate was
        trained on normalised text, which `normalized_text` in `gate.json` records.
        """
        if len(texts) == 0:
            return np.zeros(0, dtype=np.float64)
        # fastText reads one example per line and refuses newlines at prediction time.
        labels, probs = self.model.predict([" ".join(t.split()) for t in texts], k=-1)
        p = np.fromiter(
            (
                row_probs[row_labels.index(self.ad_label)] if self.ad_label in row_labels else 0.0
                for row_labels, row_probs in zip(labels, probs, strict=True)
            ),
            dtype=np.float64,
            count=len(texts),
        )
        # fastText adds 1e-5 to every probability, so the top one can exceed 1.
        return np.clip(p, 0.0, 1.0)
