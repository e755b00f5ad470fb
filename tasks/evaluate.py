"""Stage `evaluate`: the net and every baseline on the same test split, in one run, one code path.

Reads `data/split/{train,val,test}.parquet`, `data/features/{train,val,test}.npz` and the
trained net in `artifacts/model`; writes

- `reports/metrics.json` (DVC metrics): for `ours` (the net at `model.threshold`),
  `ours_text_only` (the net with the image dropped) and each baseline, metrics overall and per
  slice (`models.metrics`), plus the issue's targets checked on these figures;
- `reports/test_predictions.csv`: one row per test post, `id,label,slice,score,p_ad,sensitivity`
  (the net's outputs) and a `baseline_<name>` score column per baseline and for
  `ours_text_only`;
- `reports/plots/`: PR and ROC curves of every model, the net's confusion matrix at the deployed
  threshold and its reliability curve.

Baselines score on their own scales, so each is deployed at the threshold that keeps FPR <=
`evaluate.baseline_val_fpr` on the validation split (`models.metrics.operating_point`); the net
is deployed at `model.threshold`, as in serving. Threshold-free figures (`recall_at_fpr`, PR
and ROC AUC) compare all of them on equal terms.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from adfilter.config import Params, load_params
from adfilter.logs import setup_logging
from adfilter.schema import HIDDEN_IMAGE_AD
from adfilter.versioning import provenance
from models.baselines import BASELINES, create_baseline
from models.metrics import (
    TEXT_POSTS,
    binary_metrics,
    format_table,
    json_safe,
    metrics_report,
    operating_point,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
OURS = "ours"
HELDOUT = "obfuscated_ads_heldout"
OURS_TEXT_ONLY = "ours_text_only"
SCORER_COLUMNS = ("id", "p_ad", "sensitivity", "score")
PLOT_FILES = ("pr_curve.png", "roc_curve.png", "confusion_matrix.png", "calibration.png")

# (model_dir, npz_path, drop_modality) -> DataFrame(id, p_ad, sensitivity, score)
Scorer = Callable[..., pd.DataFrame]

TABLE_COLUMNS = (
    ("acc", "overall.accuracy"),
    ("prec", "overall.precision"),
    ("recall", "overall.recall"),
    ("f1", "overall.f1"),
    ("mcc", "overall.mcc"),
    ("pr_auc", "overall.pr_auc"),
    ("roc_auc", "overall.roc_auc"),
    ("R@fpr", "overall.recall_at_fpr"),
    ("kill_rate", "overall.false_kill_rate"),
    ("text R@fpr", f"slices.{TEXT_POSTS}.recall_at_fpr"),
    ("hidden recall", f"slices.{HIDDEN_IMAGE_AD}.recall"),
)


def evaluate(
    params: Params,
    split_dir: Path = Path("data/split"),
    features_dir: Path = Path("data/features"),
    model_dir: Path = Path("artifacts/model"),
    reports_dir: Path = Path("reports"),
    scorer: Scorer | None = None,
    raw_dir: Path = Path("data/raw"),
    heldout_path: Path = Path("data/augmented/heldout_obfuscated.npz"),
) -> dict[str, Any]:
    """Scores the test split with the net and every baseline; writes and returns the metrics.

    `heldout_path` (the augment stage's `obfuscated_ads_heldout` slice: test ads perturbed with
    families never used in training, plus the clean test posts) is scored by the same net and
    fitted baselines at the same thresholds, under `obfuscated_ads_heldout` in the metrics.

    `scorer` defaults to `models.predict.predict_split`; any callable with its signature works.
    """
    split_dir, features_dir = Path(split_dir), Path(features_dir)
    model_dir, reports_dir = Path(model_dir), Path(reports_dir)
    if scorer is None:
        from models.predict import predict_split

        scorer = predict_split
    ev = params.evaluate
    threshold = float(params.model.threshold)
    # Fail before the expensive scoring, not after it.
    for name in ev.baselines:
        if name not in BASELINES:
            create_baseline(name)
    if len(set(ev.baselines)) != len(ev.baselines):
        raise ValueError(f"params.yaml evaluate.baselines names a baseline twice: {ev.baselines}")

    frames, arrays = {}, {}
    for split in SPLITS:
        frames[split], arrays[split] = _load_split(split, split_dir, features_dir)
    test = frames["test"]
    y_test = test["label"].to_numpy().astype(int)
    has_text = test["text"].fillna("").astype(str).str.strip().ne("").to_numpy()
    slices = test["slice"].astype(str).to_numpy()
    sens_true = test["sensitivity"].to_numpy(dtype=np.float64)
    log.info(
        "loaded splits: train %d, val %d, test %d posts (%d ads in test)",
        len(frames["train"]),
        len(frames["val"]),
        len(test),
        int(y_test.sum()),
    )

    test_npz = features_dir / "test.npz"
    started = time.perf_counter()
    ours = _scored(scorer(model_dir, test_npz, drop_modality=None), test, "the net")
    ours_text = _scored(
        scorer(model_dir, test_npz, drop_modality="image"), test, "the net without images"
    )
    log.info(
        "scored the test split with the net in %.1f s (full and text-only)",
        time.perf_counter() - started,
    )

    def report(
        score: np.ndarray, thr: float, sens_pred: np.ndarray | None = None
    ) -> dict[str, Any]:
        return metrics_report(
            y_test,
            score,
            thr,
            slices,
            has_text,
            sens_true if sens_pred is not None else None,
            sens_pred,
            max_fpr=ev.max_fpr,
        )

    results: dict[str, Any] = {
        OURS: report(ours["score"].to_numpy(), threshold, ours["sensitivity"].to_numpy()),
        OURS_TEXT_ONLY: report(
            ours_text["score"].to_numpy(), threshold, ours_text["sensitivity"].to_numpy()
        ),
        "baselines": {},
    }
    curves: dict[str, np.ndarray] = {
        OURS: ours["score"].to_numpy(),
        OURS_TEXT_ONLY: ours_text["score"].to_numpy(),
    }
    y_val = frames["val"]["label"].to_numpy().astype(int)
    fitted: dict[str, tuple[Any, float]] = {}
    for name in ev.baselines:
        started = time.perf_counter()
        baseline = create_baseline(name, seed=params.seed).fit(frames["train"], arrays["train"])
        val_recall, thr = operating_point(
            y_val, baseline.score(frames["val"], arrays["val"]), ev.baseline_val_fpr
        )
        if math.isnan(thr):
            raise ValueError(
                f"{split_dir / 'val.parquet'}: the validation split needs both ads and clean posts "
                f"to set baseline {name}'s threshold; check the split stage's report"
            )
        fitted[name] = (baseline, thr)
        score = baseline.score(test, arrays["test"])
        curves[name] = score
        results["baselines"][name] = report(score, thr)
        log.info(
            "baseline %s: fitted and scored in %.1f s; val threshold %.4g (val recall %.3f at FPR <= %g), "
            "test recall_at_fpr %.3f",
            name,
            time.perf_counter() - started,
            thr,
            val_recall,
            ev.baseline_val_fpr,
            results["baselines"][name]["overall"]["recall_at_fpr"],
        )

    metrics = {
        "threshold": threshold,
        "max_fpr": ev.max_fpr,
        "baseline_val_fpr": ev.baseline_val_fpr,
        "n_test": len(test),
        "data_version": provenance(raw_dir)["data_version"],
        **results,
        "targets": check_targets(results, params),
        HELDOUT: score_heldout(Path(heldout_path), scorer, model_dir, fitted, threshold,
                               ev.max_fpr),
    }
    reports_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = reports_dir / "metrics.json"
    metrics_path.write_text(json.dumps(json_safe(metrics), indent=2, allow_nan=False) + "\n")
    log.info("wrote %s", metrics_path)

    predictions = pd.DataFrame(
        {
            "id": test["id"].astype(str).to_numpy(),
            "label": y_test,
            "slice": slices,
            "score": ours["score"].to_numpy(),
            "p_ad": ours["p_ad"].to_numpy(),
            "sensitivity": ours["sensitivity"].to_numpy(),
        }
    )
    for name in [*ev.baselines, OURS_TEXT_ONLY]:
        predictions[f"baseline_{name}"] = curves[name]
    predictions_path = reports_dir / "test_predictions.csv"
    predictions.to_csv(predictions_path, index=False)
    log.info("wrote %s (%d rows)", predictions_path, len(predictions))

    plots_dir = reports_dir / "plots"
    write_plots(
        y_test,
        curves,
        ours["p_ad"].to_numpy(),
        threshold,
        plots_dir,
        ev.max_fpr,
        ev.calibration_bins,
    )
    log.info("wrote %s", ", ".join(str(plots_dir / f) for f in PLOT_FILES))
    targets = metrics["targets"]
    log.info(
        "targets: %s",
        ", ".join(
            f"{k} {'met' if v['passed'] else 'MISSED'}"
            for k, v in targets.items()
            if isinstance(v, dict)
        ),
    )
    return metrics


def score_heldout(
    path: Path,
    scorer: Scorer,
    model_dir: Path,
    fitted: Mapping[str, tuple[Any, float]],
    threshold: float,
    max_fpr: float,
) -> dict[str, Any]:
    """The held-out obfuscated-ads slice through the net and the fitted baselines.

    Missing file: `{"skipped": why}` (the pipeline always makes it; a bare model dir may not).
    """
    if not path.is_file():
        log.warning("%s not found: the obfuscated_ads_heldout slice is not scored "
                    "(dvc repro augment makes it)", path)
        return {"skipped": f"{path} not found"}
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    missing = [k for k in ("id", "label", "text", "source") if k not in arrays]
    if missing:
        raise ValueError(f"{path}: missing arrays {missing}; rerun the augment stage")
    frame = pd.DataFrame({
        "id": arrays["id"].astype(str),
        "text": arrays["text"].astype(str),
        "label": arrays["label"].astype(int),
    })
    y = frame["label"].to_numpy()
    ours = _scored(scorer(model_dir, path, drop_modality=None), frame, "the net (held-out slice)")
    block: dict[str, Any] = {
        "posts": len(frame),
        "perturbed_ads": int((arrays["source"].astype(str) != "original").sum()),
        "clean_posts": int((y == 0).sum()),
        OURS: {"threshold": float(threshold),
               **binary_metrics(y, ours["score"].to_numpy(), threshold, max_fpr=max_fpr)},
        "baselines": {},
    }
    for name, (baseline, thr) in fitted.items():
        block["baselines"][name] = {
            "threshold": float(thr),
            **binary_metrics(y, baseline.score(frame, arrays), thr, max_fpr=max_fpr),
        }
    log.info("obfuscated_ads_heldout (%d perturbed ads, %d clean): ours recall %.3f at the "
             "threshold, %.3f at FPR <= %g; best baseline %s", block["perturbed_ads"],
             block["clean_posts"], block[OURS]["recall"], block[OURS]["recall_at_fpr"], max_fpr,
             max(((n, b["recall_at_fpr"]) for n, b in block["baselines"].items()),
                 key=lambda kv: kv[1], default=None))
    return block


def render_table(metrics: Mapping[str, Any]) -> str:
    """The main figures of `ours`, `ours_text_only` and every baseline, one row each."""
    rows = {OURS: metrics[OURS], OURS_TEXT_ONLY: metrics[OURS_TEXT_ONLY], **metrics["baselines"]}
    note = (
        f"test split, {metrics['n_test']} posts; R@fpr = recall at FPR <= {metrics['max_fpr']:g}; "
        f"ours blocks at score > {metrics['threshold']:g}, baselines at their val FPR <= "
        f"{metrics['baseline_val_fpr']:g} threshold"
    )
    return note + "\n" + format_table(rows, TABLE_COLUMNS)


def check_targets(results: Mapping[str, Any], params: Params) -> dict[str, Any]:
    """The issue's targets on the test figures, each with `passed` and the numbers behind it."""
    t = params.evaluate.targets
    ours = results[OURS]
    baselines = results["baselines"]

    def versus_best(where: str | None) -> dict[str, Any]:
        def pick(block: Mapping[str, Any]) -> float:
            return (block["overall"] if where is None else block["slices"][where])["recall_at_fpr"]

        value = pick(ours)
        candidates = {n: pick(b) for n, b in baselines.items() if not math.isnan(pick(b))}
        best = max(candidates, key=candidates.__getitem__) if candidates else None
        best_value = candidates[best] if best else float("nan")
        return {
            "passed": _at_least(value, best_value) if best else not math.isnan(value),
            "ours": value,
            "best_baseline": best,
            "best_baseline_value": best_value,
        }

    overall = ours["overall"]
    hidden = ours["slices"][HIDDEN_IMAGE_AD]["recall"]
    out: dict[str, Any] = {
        "recall_at_fpr_vs_baselines": versus_best(None),
        "text_recall_at_fpr_vs_baselines": versus_best(TEXT_POSTS),
        "accuracy": {
            "passed": _at_least(overall["accuracy"], t.min_accuracy),
            "value": overall["accuracy"],
            "target": t.min_accuracy,
        },
        "false_kill_rate": {
            "passed": _at_least(t.max_false_kill_rate, overall["false_kill_rate"]),
            "value": overall["false_kill_rate"],
            "target": t.max_false_kill_rate,
        },
        "hidden_image_ad_recall": {
            "passed": _at_least(hidden, t.min_hidden_image_ad_recall),
            "value": hidden,
            "target": t.min_hidden_image_ad_recall,
        },
    }
    out["all_passed"] = all(v["passed"] for v in out.values())
    return out


def _at_least(value: float, target: float) -> bool:
    # NaN (an undefined figure) never meets a target.
    return bool(value >= target)


def _load_split(
    split: str, split_dir: Path, features_dir: Path
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    table, npz = split_dir / f"{split}.parquet", features_dir / f"{split}.npz"
    for path, stage in ((table, "split"), (npz, "featurize")):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: run the {stage} stage first (dvc repro {stage})"
            )
    df = pd.read_parquet(table)
    missing = [c for c in ("id", "text", "label", "sensitivity", "slice") if c not in df.columns]
    if missing:
        raise ValueError(f"{table}: missing columns {missing}; rerun the split stage")
    with np.load(npz, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    if "id" not in arrays or not np.array_equal(
        arrays["id"].astype(str), df["id"].astype(str).to_numpy()
    ):
        raise ValueError(
            f"{npz}: its rows are not the posts of {table} in the same order; rerun the featurize "
            "stage (dvc repro featurize)"
        )
    return df.reset_index(drop=True), arrays


def _scored(pred: pd.DataFrame, test: pd.DataFrame, who: str) -> pd.DataFrame:
    missing = [c for c in SCORER_COLUMNS if c not in pred.columns]
    if missing:
        raise ValueError(
            f"{who}: the scorer's table lacks columns {missing} (expected {list(SCORER_COLUMNS)})"
        )
    pred = pred.assign(id=pred["id"].astype(str))
    dup = pred["id"][pred["id"].duplicated()]
    if len(dup):
        raise ValueError(f"{who}: the scorer gave {len(dup)} duplicate ids, e.g. {dup.iloc[0]!r}")
    ids = test["id"].astype(str)
    aligned = pred.set_index("id").reindex(ids)
    unscored = ids[aligned["score"].isna().to_numpy()]
    if len(unscored):
        raise ValueError(
            f"{who}: {len(unscored)} of {len(ids)} test posts have no score, e.g. {unscored.iloc[0]!r}; "
            "the model and data/features/test.npz must come from the same pipeline run"
        )
    return aligned.reset_index()


def write_plots(
    y: np.ndarray,
    curves: Mapping[str, np.ndarray],
    p_ad: np.ndarray,
    threshold: float,
    plots_dir: Path,
    max_fpr: float,
    calibration_bins: int,
) -> list[Path]:
    """PR and ROC curves of every scorer, and the net's confusion matrix and reliability curve.

    `curves["ours"]` is the net's final score; `p_ad` its ad probability (the calibrated one).
    """
    from matplotlib.figure import Figure
    from sklearn.calibration import CalibrationDisplay
    from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay

    plots_dir.mkdir(parents=True, exist_ok=True)
    y = np.asarray(y).astype(int)
    two_classes = np.unique(y).size == 2
    paths = [plots_dir / name for name in PLOT_FILES]
    pr_path, roc_path, cm_path, cal_path = paths

    fig = Figure(figsize=(7, 6), layout="constrained")
    ax = fig.subplots()
    if two_classes:
        for name, score in curves.items():
            PrecisionRecallDisplay.from_predictions(
                y, score, name=name, ax=ax, plot_chance_level=name == OURS
            )
    ax.set(
        title="Precision-recall on the test split",
        xlabel="recall (ads blocked)",
        ylabel="precision",
    )
    ax.legend(loc="lower left", fontsize="small")
    fig.savefig(pr_path, dpi=120)

    fig = Figure(figsize=(13, 6), layout="constrained")
    full, zoom = fig.subplots(1, 2)
    if two_classes:
        for name, score in curves.items():
            for ax in (full, zoom):
                RocCurveDisplay.from_predictions(y, score, name=name, ax=ax)
    full.set(
        title="ROC on the test split",
        xlabel="false-positive rate (clean posts blocked)",
        ylabel="true-positive rate (ads blocked)",
    )
    full.legend(loc="lower right", fontsize="small")
    # sklearn draws ROC curves square; the zoom needs the room of its own panel.
    for ax in (full, zoom):
        ax.set_aspect("auto")
    limit = max(10 * max_fpr, 0.01)
    zoom.set_xlim(-0.02 * limit, limit)
    line = zoom.axvline(max_fpr, color="grey", linestyle="--", label=f"FPR = {max_fpr:g}")
    zoom.set(
        title="ROC, low false-positive region",
        xlabel="false-positive rate",
        ylabel="true-positive rate",
    )
    zoom.legend(handles=[line], loc="lower right", fontsize="small")
    fig.savefig(roc_path, dpi=120)

    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.subplots()
    ConfusionMatrixDisplay.from_predictions(
        y,
        (np.asarray(curves[OURS]) > threshold).astype(int),
        labels=[0, 1],
        display_labels=["clean", "ad"],
        ax=ax,
        colorbar=False,
        cmap="Blues",
    )
    ax.set(
        title=f"Ours at the deployed threshold (score > {threshold:g})",
        xlabel="decision",
        ylabel="true label",
    )
    fig.savefig(cm_path, dpi=120)

    fig = Figure(figsize=(6, 6), layout="constrained")
    ax = fig.subplots()
    if two_classes:
        CalibrationDisplay.from_predictions(
            y, p_ad, n_bins=calibration_bins, name="ours p_ad", ax=ax
        )
        if not np.allclose(curves[OURS], p_ad):
            CalibrationDisplay.from_predictions(
                y,
                np.clip(curves[OURS], 0.0, 1.0),
                n_bins=calibration_bins,
                name="ours score",
                ax=ax,
            )
    ax.set(
        title="Reliability on the test split",
        xlabel="mean predicted probability",
        ylabel="fraction of ads",
    )
    ax.legend(loc="upper left", fontsize="small")
    fig.savefig(cal_path, dpi=120)
    if not two_classes:
        log.warning("the test split holds a single class: curves are left empty in %s", plots_dir)
    return paths


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tasks.evaluate",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model-dir", default="artifacts/model", type=Path,
                        help="the trained net to score (train's out dir)")
    parser.add_argument("--reports-dir", default="reports", type=Path,
                        help="where metrics.json, test_predictions.csv and plots/ go")
    args = parser.parse_args(argv)
    setup_logging()
    metrics = evaluate(load_params(args.params), model_dir=args.model_dir,
                       reports_dir=args.reports_dir)
    print(render_table(metrics))


if __name__ == "__main__":
    main()
