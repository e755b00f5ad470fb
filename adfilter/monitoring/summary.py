"""Readable summaries of the handcrafted features, the Evidently data-drift report, and plots.

Evidently compares columns one by one, and a 384-wide embedding or a 256-word visual vocabulary
is not a column anyone can read. Each block is summarised by its first principal components
(fitted on the reference posts that have the modality; NaN where a post lacks it), next to the
model's score, the QR flag, the text length in tokens and the two modality flags. Drift in the
score distribution and in these summaries is what the report shows; the retrain decision is the
SHAP importance shift (`adfilter.monitoring.shift`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd

from adfilter.monitoring.groups import GROUP_LABELS

log = logging.getLogger(__name__)

PCA_BLOCKS: Final = {"tfidf": "text", "sent_emb": "text", "sift_bow": "image", "hsv": "image"}
HTML_FILE: Final = "evidently.html"
JSON_FILE: Final = "evidently.json"


class Summaries:
    """Principal components of each handcrafted block, fitted on reference posts."""

    def __init__(self, reference: Mapping[str, np.ndarray], components: int, seed: int = 0) -> None:
        from sklearn.decomposition import PCA

        self.components = components
        self.pca: dict[str, Any] = {}
        for block, modality in PCA_BLOCKS.items():
            rows = np.asarray(reference[f"has_{modality}"], dtype=bool)
            x = np.asarray(reference[block], dtype=np.float32)[rows]
            k = min(components, x.shape[1], max(0, len(x) - 1))
            if k >= 1:
                self.pca[block] = PCA(n_components=k, random_state=seed).fit(x)

    def frame(self, arrays: Mapping[str, np.ndarray], score: np.ndarray) -> pd.DataFrame:
        has_text = np.asarray(arrays["has_text"], dtype=bool)
        has_image = np.asarray(arrays["has_image"], dtype=bool)
        out: dict[str, Any] = {
            "score": np.asarray(score, dtype=np.float64),
            "has_text": has_text.astype(int),
            "has_image": has_image.astype(int),
            "text_tokens": np.where(has_text, (np.asarray(arrays["token_ids"]) != 0).sum(axis=1),
                                    np.nan),
            "qr": np.where(has_image, np.asarray(arrays["qr"], dtype=np.float64).reshape(-1), np.nan),
        }
        for block, pca in self.pca.items():
            present = has_text if PCA_BLOCKS[block] == "text" else has_image
            comps = pca.transform(np.asarray(arrays[block], dtype=np.float32))
            for j in range(comps.shape[1]):
                out[f"{block}_pc{j + 1}"] = np.where(present, comps[:, j], np.nan)
        return pd.DataFrame(out)

    @property
    def numerical(self) -> list[str]:
        cols = ["score", "text_tokens", "qr"]
        for block, pca in self.pca.items():
            cols += [f"{block}_pc{j + 1}" for j in range(pca.n_components_)]
        return cols


def evidently_report(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    out_dir: str | Path,
    numerical: Sequence[str],
    categorical: Sequence[str] = ("has_text", "has_image"),
) -> dict[str, Any]:
    """Evidently's DataDriftPreset (current vs reference) saved as HTML and JSON in `out_dir`;
    returns the drifted-column count and each column's drift score."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    definition = DataDefinition(numerical_columns=list(numerical),
                                categorical_columns=list(categorical))
    snapshot = Report([DataDriftPreset()]).run(
        Dataset.from_pandas(current, data_definition=definition),
        Dataset.from_pandas(reference, data_definition=definition),
    )
    snapshot.save_html(str(out_dir / HTML_FILE))
    data = snapshot.dict()
    (out_dir / JSON_FILE).write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    summary: dict[str, Any] = {"columns": {}, "html": str(out_dir / HTML_FILE),
                               "json": str(out_dir / JSON_FILE)}
    for metric in data.get("metrics", []):
        config = metric.get("config", {})
        value = metric.get("value")
        if "DriftedColumnsCount" in str(config.get("type", "")):
            summary["drifted_columns"] = int(value.get("count", 0))
            summary["drifted_share"] = float(value.get("share", 0.0))
        elif "ValueDrift" in str(config.get("type", "")) and "column" in config:
            summary["columns"][config["column"]] = {
                "method": config.get("method"), "threshold": config.get("threshold"),
                "score": None if value is None else float(value),
            }
    return summary


def cell_label(cell: str) -> str:
    """`tfidf:ad` -> `TF-IDF -> ad`; a plain group name -> its label."""
    group, _, side = cell.partition(":")
    label = GROUP_LABELS.get(group, group)
    return f"{label} \u2192 {side}" if side else label


def plot_importance(
    reference: np.ndarray, window: np.ndarray, groups: Sequence[str], shift: float,
    threshold: float, path: str | Path, noise: float | None = None,
) -> Path:
    """Side-by-side bars of the two importance distributions (over groups or cells)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [cell_label(g) for g in groups]
    y = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(7.5, 0.4 * len(groups) + 1.6))
    ax.barh(y - 0.2, reference, height=0.4, label="reference", color="#7f7f7f")
    ax.barh(y + 0.2, window, height=0.4, label="window", color="#d62728")
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel("share of the SHAP attribution mass")
    noise_text = f" ± {noise:.3f}" if noise is not None else ""
    ax.set_title(f"feature-group importance: shift (TVD) {shift:.3f}{noise_text}, "
                 f"threshold {threshold:g}", fontsize=10)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_shap_summary(values: np.ndarray, groups: Sequence[str], path: str | Path,
                      title: str = "window") -> Path:
    """shap's summary (beeswarm) plot of the group SHAP values of the explained posts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import shap

    labels = [GROUP_LABELS.get(g, g) for g in groups]
    plt.figure()
    shap.summary_plot(np.asarray(values), feature_names=labels, show=False, plot_type="dot",
                      color_bar=False, sort=False)
    fig = plt.gcf()
    fig.suptitle(f"SHAP values per feature group ({title})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
