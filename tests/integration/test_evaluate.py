"""The evaluate stage on synthetic split and feature files, with a scorer standing in for the net."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score

from adfilter.config import load_params
from adfilter.schema import COLUMNS
from models.metrics import REPORT_SLICES, binary_metrics
from tasks.evaluate import PLOT_FILES, evaluate, render_table

pytestmark = pytest.mark.integration

AD_WORDS = ["free", "win", "prize", "claim", "cash", "call", "txt", "offer", "urgent", "reward"]
CLEAN_WORDS = [
    "lunch",
    "tomorrow",
    "meeting",
    "mum",
    "home",
    "later",
    "sorry",
    "dinner",
    "class",
    "bus",
]
SIZES = {"train": 240, "val": 120, "test": 90}


def _write_split(name: str, n: int, seed: int, split_dir: Path, features_dir: Path) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    kind = rng.choice(["text_only", "image_only", "text_image"], n, p=[0.5, 0.25, 0.25])
    label = (rng.random(n) < 0.35).astype(int)
    has_text = kind != "image_only"
    has_image = kind != "text_only"
    # Half of the text+image ads carry clean text and an ad image: the hidden image ads.
    hidden = (kind == "text_image") & (label == 1) & (rng.random(n) < 0.5)
    text_is_ad = (label == 1) & ~hidden
    texts = []
    for i in range(n):
        if not has_text[i]:
            texts.append("")
            continue
        own, other = (AD_WORDS, CLEAN_WORDS) if text_is_ad[i] else (CLEAN_WORDS, AD_WORDS)
        texts.append(" ".join([*rng.choice(own, 3), *rng.choice(other, 1)]))
    ids = np.array([f"{name}{i:04d}" for i in range(n)])
    slices = np.where(hidden, "hidden_image_ad", kind)
    df = pd.DataFrame(
        {
            "id": ids,
            "text": texts,
            "image": [
                f"data/raw/images/{i}.png" if img else ""
                for i, img in zip(ids, has_image, strict=True)
            ],
            "label": label,
            "sensitivity": np.round(label * rng.uniform(0.3, 1.0, n), 3),
            "slice": slices,
            "group": np.arange(n),
        }
    )
    assert tuple(df.columns[:6]) == COLUMNS
    df.to_parquet(split_dir / f"{name}.parquet", index=False)

    image_ad = (label == 1) & has_image & (text_is_ad == 0) | (
        (label == 1) & has_image & (rng.random(n) < 0.5)
    )
    hsv = rng.random((n, 8)).astype(np.float32)
    hsv[:, 0] += 0.9 * image_ad
    sift = rng.random((n, 16)).astype(np.float32)
    sift[:, 2] += 0.7 * image_ad
    qr = (image_ad & (rng.random(n) < 0.6)).astype(np.float32)[:, None]
    word_hits = np.array([sum(w in AD_WORDS for w in t.split()) for t in texts], dtype=np.float32)
    np.savez(
        features_dir / f"{name}.npz",
        id=ids,
        label=label.astype(np.int64),
        sensitivity=df["sensitivity"].to_numpy(np.float32),
        slice=slices,
        has_text=has_text,
        has_image=has_image,
        tfidf=np.stack([word_hits, rng.random(n).astype(np.float32)], axis=1),
        hsv=hsv * has_image[:, None],
        sift_bow=sift * has_image[:, None],
        qr=qr * has_image[:, None],
    )
    return df


def stand_in_scorer(
    model_dir: Path, npz_path: Path, drop_modality: str | None = None
) -> pd.DataFrame:
    """A fixed rule over the features (no labels), shaped like models.predict.predict_split."""
    assert model_dir.name == "model"
    with np.load(npz_path) as f:
        image = f["has_image"] & (drop_modality != "image")
        logit = 1.6 * f["tfidf"][:, 0] - 3.0
        logit = logit + image * (4.0 * f["qr"][:, 0] + 5.0 * (f["hsv"][:, 0] - 0.5))
        p_ad = 1.0 / (1.0 + np.exp(-logit))
        ids = f["id"]
    # Returned shuffled: evaluate must align by id, not by position.
    order = np.random.default_rng(0).permutation(len(ids))
    return pd.DataFrame(
        {
            "id": ids[order],
            "p_ad": p_ad[order],
            "sensitivity": 0.6 * p_ad[order],
            "score": p_ad[order],
        }
    )


@pytest.fixture(scope="module")
def run(
    tmp_path_factory: pytest.TempPathFactory, repo_root: Path
) -> tuple[dict, Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("evaluate")
    split_dir, features_dir, reports_dir = root / "split", root / "features", root / "reports"
    split_dir.mkdir()
    features_dir.mkdir()
    frames = {
        name: _write_split(name, n, seed, split_dir, features_dir)
        for seed, (name, n) in enumerate(SIZES.items())
    }
    params = load_params(repo_root / "params.yaml", profile="ci")
    metrics = evaluate(
        params,
        split_dir=split_dir,
        features_dir=features_dir,
        model_dir=root / "model",
        reports_dir=reports_dir,
        scorer=stand_in_scorer,
        raw_dir=root / "raw",
        heldout_path=_write_heldout(features_dir / "test.npz", frames["test"], root / "heldout.npz"),
    )
    return metrics, reports_dir, frames["test"]


def _write_heldout(test_npz: Path, test: pd.DataFrame, dest: Path) -> Path:
    """Like the augment stage's slice: every test ad with its ad words spelt out letter by
    letter (which the word baseline no longer matches), plus the clean test posts unchanged."""
    with np.load(test_npz) as f:
        arrays = {k: f[k] for k in f.files}
    ads = np.flatnonzero(arrays["label"] == 1)
    clean = np.flatnonzero(arrays["label"] == 0)
    texts = test["text"].to_numpy().astype(str)
    spaced = np.array([" ".join(" ".join(w) if w in AD_WORDS else w for w in t.split())
                       for t in texts[ads]])
    out = {k: np.concatenate([v[ads], v[clean]]) for k, v in arrays.items()}
    out["id"] = np.concatenate([np.char.add(arrays["id"][ads], "~ho0"), arrays["id"][clean]])
    out["text"] = np.concatenate([spaced, texts[clean]])
    out["source"] = np.array(["obfuscated_ads_heldout"] * len(ads) + ["original"] * len(clean))
    np.savez(dest, **out)
    return dest


def test_metrics_json_holds_every_model_and_slice(run: tuple, repo_root: Path) -> None:
    metrics, reports_dir, test = run
    params = load_params(repo_root / "params.yaml", profile="ci")
    on_disk = json.loads((reports_dir / "metrics.json").read_text())
    assert on_disk["n_test"] == len(test) == SIZES["test"]
    assert on_disk["threshold"] == params.model.threshold
    assert set(on_disk["baselines"]) == set(params.evaluate.baselines)
    for block in [on_disk["ours"], on_disk["ours_text_only"], *on_disk["baselines"].values()]:
        assert set(block) == {"threshold", "overall", "slices"}
        assert tuple(block["slices"]) == REPORT_SLICES
        assert block["overall"]["n"] == len(test)
    # hidden_image_ad holds only ads: figures that need clean posts are null, not NaN.
    assert on_disk["ours"]["slices"]["hidden_image_ad"]["roc_auc"] is None
    assert on_disk["ours"]["overall"]["sensitivity_mae"] is not None
    assert on_disk["data_version"] is None  # no raw manifest in this workspace


def test_predictions_csv_has_one_row_per_test_post(run: tuple, repo_root: Path) -> None:
    _, reports_dir, test = run
    params = load_params(repo_root / "params.yaml", profile="ci")
    pred = pd.read_csv(reports_dir / "test_predictions.csv", dtype={"id": str})
    expected = ["id", "label", "slice", "score", "p_ad", "sensitivity"]
    expected += [f"baseline_{b}" for b in params.evaluate.baselines] + ["baseline_ours_text_only"]
    assert list(pred.columns) == expected
    assert pred["id"].tolist() == test["id"].tolist()
    assert pred["label"].tolist() == test["label"].tolist()
    assert pred.notna().all().all()
    # The stand-in scorer's rule, recomputed from the features, lands in the right rows.
    again = stand_in_scorer(Path("model"), reports_dir.parent / "features" / "test.npz").set_index(
        "id"
    )
    np.testing.assert_allclose(pred["score"], again.loc[pred["id"], "score"], rtol=1e-6)


def test_reported_figures_match_the_predictions(run: tuple) -> None:
    metrics, reports_dir, _ = run
    pred = pd.read_csv(reports_dir / "test_predictions.csv", dtype={"id": str})
    y = pred["label"].to_numpy()
    ours = metrics["ours"]["overall"]
    assert ours["accuracy"] == pytest.approx(
        accuracy_score(y, pred["score"] > metrics["threshold"])
    )
    for name, block in metrics["baselines"].items():
        again = binary_metrics(
            y, pred[f"baseline_{name}"].to_numpy(), block["threshold"], max_fpr=metrics["max_fpr"]
        )
        assert block["overall"]["recall_at_fpr"] == pytest.approx(again["recall_at_fpr"]), name
        assert block["overall"]["false_kill_rate"] == pytest.approx(again["false_kill_rate"]), name
    # Dropping the image must cost the stand-in its image-only recall.
    assert (
        metrics["ours_text_only"]["slices"]["image_only"]["pr_auc"]
        < metrics["ours"]["slices"]["image_only"]["pr_auc"]
    )
    # Text baselines see ad words; the image baseline does not.
    text = metrics["baselines"]["tfidf_word_lr"]["slices"]["text_only"]["roc_auc"]
    assert text > 0.9


def test_targets_are_checked_against_the_figures(run: tuple) -> None:
    metrics, _, _ = run
    targets = metrics["targets"]
    best = targets["recall_at_fpr_vs_baselines"]
    values = {n: b["overall"]["recall_at_fpr"] for n, b in metrics["baselines"].items()}
    assert best["best_baseline_value"] == max(values.values())
    assert best["passed"] == (metrics["ours"]["overall"]["recall_at_fpr"] >= max(values.values()))
    assert targets["accuracy"]["passed"] == (metrics["ours"]["overall"]["accuracy"] >= 0.99)
    assert targets["all_passed"] == all(
        v["passed"] for k, v in targets.items() if k != "all_passed"
    )


def test_plots_are_written(run: tuple) -> None:
    _, reports_dir, _ = run
    for name in PLOT_FILES:
        data = (reports_dir / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name


def test_table_lists_every_model(run: tuple) -> None:
    metrics, _, _ = run
    table = render_table(metrics)
    rows = [line.split()[0] for line in table.splitlines()[3:]]
    assert rows == ["ours", "ours_text_only", *metrics["baselines"]]


def test_unscored_test_posts_fail_loudly(run: tuple, tmp_path: Path, repo_root: Path) -> None:
    _, reports_dir, _ = run
    root = reports_dir.parent

    def partial(model_dir: Path, npz_path: Path, drop_modality: str | None = None) -> pd.DataFrame:
        return stand_in_scorer(model_dir, npz_path, drop_modality).iloc[1:]

    params = load_params(repo_root / "params.yaml", profile="ci")
    with pytest.raises(ValueError, match="1 of 90 test posts have no score"):
        evaluate(
            params, root / "split", root / "features", root / "model", tmp_path, scorer=partial
        )
    with pytest.raises(FileNotFoundError, match="run the split stage first"):
        evaluate(
            params,
            tmp_path / "nowhere",
            root / "features",
            root / "model",
            tmp_path,
            scorer=partial,
        )


def test_the_heldout_obfuscated_slice_is_scored_by_the_net_and_every_baseline(run: tuple) -> None:
    metrics, reports_dir, test = run
    block = json.loads((reports_dir / "metrics.json").read_text())["obfuscated_ads_heldout"]
    n_ads = int(test["label"].sum())
    assert block["perturbed_ads"] == n_ads and block["clean_posts"] == len(test) - n_ads
    assert block["posts"] == len(test)
    assert set(block["baselines"]) == set(metrics["baselines"])
    # The same scorer on the same rows gives the same figures as binary_metrics.
    heldout = reports_dir.parent / "heldout.npz"
    scored = stand_in_scorer(reports_dir.parent / "model", heldout).set_index("id")
    with np.load(heldout) as f:
        ids, y = f["id"].astype(str), f["label"]
    expected = binary_metrics(y, scored.loc[ids, "score"].to_numpy(), metrics["threshold"],
                              max_fpr=metrics["max_fpr"])
    assert block["ours"]["recall"] == pytest.approx(expected["recall"])
    assert block["ours"]["recall_at_fpr"] == pytest.approx(expected["recall_at_fpr"])
    # Each baseline keeps the threshold it got on val for the test split.
    for name, b in block["baselines"].items():
        assert b["n"] == len(test)
        assert b["threshold"] == pytest.approx(metrics["baselines"][name]["threshold"])


def test_a_missing_heldout_slice_is_reported_as_skipped(tmp_path: Path) -> None:
    from tasks.evaluate import score_heldout

    block = score_heldout(tmp_path / "nope.npz", stand_in_scorer, tmp_path / "model", {}, 0.85, 0.003)
    assert block == {"skipped": f"{tmp_path / 'nope.npz'} not found"}
