"""The registry and the promotion gate on real parts: a fitted FeaturePipeline, traced TorchScript
models, a SQLite MLflow registry and a fresh-process smoke test.

The bundles are small on purpose: the net is a linear read-out of the MiniLM sentence embedding
(fitted with sklearn on real SMS texts), so a "good" bundle really separates ads from clean posts
and a "worse" one (the read-out reversed) really does not; the gate has to find that out itself.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from adfilter.config import Params, load_params, params_from_dict, to_dict

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


class LinearReadout(nn.Module):
    """ad_logit = embedding . w + b for posts with text, a fixed low logit otherwise."""

    def __init__(self, w: np.ndarray, b: float) -> None:
        super().__init__()
        self.register_buffer("w", torch.as_tensor(w, dtype=torch.float32))
        self.register_buffer("b", torch.tensor(float(b)))

    def forward(self, token_ids, image, tfidf, sent_emb, sift_bow, hsv, qr, has_text, has_image):
        text_logit = sent_emb @ self.w + self.b
        image_logit = 4.0 * qr[:, 0] - 3.0 + 0.0 * image.mean(dim=(1, 2, 3))
        ad_logit = torch.where(has_text, text_logit, image_logit)
        p_ad = torch.sigmoid(ad_logit)
        sensitivity = 0.8 * p_ad
        score = torch.clamp(0.85 * p_ad + 0.15 * sensitivity, 0.0, 1.0)
        return ad_logit, sensitivity, score


def gate_params(tmp: Path, **register_overrides: object) -> Params:
    """The ci profile, with the default profile's (strict) register section and a local registry."""
    default = to_dict(load_params(ROOT / "params.yaml", profile="default"))
    data = to_dict(load_params(ROOT / "params.yaml", profile="ci"))
    data["register"] = default["register"]
    for key, value in register_overrides.items():
        section, name = key.split("__")
        data["register"][section][name] = value
    data["mlflow"]["tracking_uri"] = f"sqlite:///{tmp / 'mlflow.db'}"
    data["profile"] = "default"
    return dataclasses.replace(params_from_dict(data, profile="default"), profile="ci")


def _posts(tmp: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train and test posts: real SMS texts, and a few rendered images for the image paths."""
    from adfilter.sample.build import render_post_image
    from adfilter.sample.sms import load_sms_corpus

    sms = load_sms_corpus()
    rng = np.random.default_rng(0)
    ham = sms[sms["label"] == 0].sample(200, random_state=0)
    spam = sms[sms["label"] == 1].sample(90, random_state=0)
    texts = pd.concat([ham, spam]).sample(frac=1.0, random_state=1).reset_index(drop=True)
    images_dir = tmp / "data/raw/images"
    images_dir.mkdir(parents=True)
    rows = []
    for i, r in texts.iterrows():
        rows.append({"id": f"t{i:04d}", "text": r["text"], "image": "", "label": int(r["label"]),
                     "sensitivity": float(r["sensitivity"]), "slice": "text_only"})
    for i in range(12):
        ad = i % 2 == 1
        img = render_post_image(7, i, "promotion" if ad else "clean", "qr" if ad else "plain", 96)
        path = images_dir / f"i{i:03d}.png"
        img.save(path)
        rows.append({"id": f"i{i:03d}", "text": "", "image": path.relative_to(tmp).as_posix(),
                     "label": int(ad), "sensitivity": 0.5 if ad else 0.0, "slice": "image_only"})
    posts = pd.DataFrame(rows)
    test_mask = rng.random(len(posts)) < 0.4
    return posts[~test_mask].reset_index(drop=True), posts[test_mask].reset_index(drop=True)


def _bundle(root: Path, name: str, featurizer_dir: Path, net: nn.Module) -> Path:
    out = root / "bundles" / name
    out.mkdir(parents=True)
    shutil.copytree(featurizer_dir, out / "featurizer")
    n, dims = 3, json.loads((featurizer_dir / "meta.json").read_text())["feature_dims"]
    example = (
        torch.zeros(n, dims["token_ids"], dtype=torch.int64),
        torch.zeros(n, 3, dims["image_small"], dims["image_small"]),
        torch.zeros(n, dims["tfidf"]), torch.randn(n, dims["sent_emb"]),
        torch.zeros(n, dims["sift_bow"]), torch.zeros(n, dims["hsv"]), torch.zeros(n, dims["qr"]),
        torch.tensor([True, False, True]), torch.tensor([False, True, True]),
    )
    traced = torch.jit.trace(net.eval(), example)
    config = {"threshold": 0.85, "feature_dims": dims, "bundle": name}
    torch.jit.save(traced, str(out / "model.pt"), _extra_files={"config.json": json.dumps(config)})
    (out / "export.json").write_text(json.dumps({"parity": {"max_abs_diff": 0.0}}))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A project folder with a test split, a featurizer and three bundles: good, worse, broken."""
    from sklearn.linear_model import LogisticRegression

    from adfilter.features import FeaturePipeline

    tmp = tmp_path_factory.mktemp("registry")
    train, test = _posts(tmp)
    (tmp / "data/split").mkdir(parents=True)
    test.to_parquet(tmp / "data/split/test.parquet", index=False)
    (tmp / "data/raw/manifest.json").write_text(json.dumps({"data_version": "sha256:00000000deadbeef"}))
    # The floors the first model must reach, stated here so the test does not drift with params.yaml.
    params = gate_params(tmp, floors__min_recall_at_fpr=0.75, floors__min_accuracy=0.9,
                         behaviour__n_posts=20)
    featurizer = FeaturePipeline.fit(train, params.featurize, seed=0, image_root=tmp)
    featurizer_dir = featurizer.save(tmp / "artifacts/featurizer")

    with_text = train[train["text"] != ""]
    emb = featurizer.featurize_posts(with_text["text"].tolist(), [None] * len(with_text))["sent_emb"]
    lr = LogisticRegression(C=10.0, max_iter=2000).fit(emb, with_text["label"])
    w, b = lr.coef_[0] * 3.0, float(lr.intercept_[0]) * 3.0
    # a weaker read-out: fitted on a few dozen posts only
    few = with_text.groupby("label").head(60)
    weak = LogisticRegression(C=10.0, max_iter=2000).fit(
        featurizer.featurize_posts(few["text"].tolist(), [None] * len(few))["sent_emb"], few["label"])

    bundles = {
        "weak": _bundle(tmp, "weak", featurizer_dir, LinearReadout(weak.coef_[0] * 3.0, float(weak.intercept_[0]) * 3.0)),
        "good": _bundle(tmp, "good", featurizer_dir, LinearReadout(w, b)),
        "worse": _bundle(tmp, "worse", featurizer_dir, LinearReadout(-w, -b)),
    }
    broken = tmp / "bundles/broken"
    shutil.copytree(bundles["good"], broken)
    (broken / "model.pt").write_bytes(b"this is not a TorchScript archive")
    bundles["broken"] = broken
    return {"root": tmp, "params": params, "bundles": bundles, "featurizer": featurizer_dir}


def _register(world: dict, name: str, monkeypatch: pytest.MonkeyPatch) -> dict:
    from tasks import register as reg

    monkeypatch.chdir(world["root"])
    monkeypatch.delenv(reg.RUN_ID_ENV, raising=False)
    return reg.register(world["params"], export_dir=world["bundles"][name],
                        model_dir=world["root"] / "no-checkpoint", reports_dir=world["root"] / "reports")


def _client(world: dict):
    import mlflow

    mlflow.set_tracking_uri(world["params"].mlflow.tracking_uri)
    return mlflow.MlflowClient()


def _aliases(world: dict) -> dict[str, str]:
    return {k: str(v) for k, v in _client(world).get_registered_model("ad-filter").aliases.items()}


def test_gate_sequence(world: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """First model on floors; a worse one refused; a broken one refused; a better one promoted;
    rollback restores the previous champion. One registry, in order, as in production."""
    from tasks import register as reg

    params = world["params"]

    # 1. the first model: no champion, judged on the absolute floors
    first = _register(world, "weak", monkeypatch)
    assert first["version"] == "1" and _aliases(world) == {"challenger": "1"}
    tags = _client(world).get_model_version("ad-filter", "1").tags
    assert tags["data_version"] == "sha256:00000000deadbeef"
    assert tags["eval_set_version"].startswith("sha256:")
    assert tags["gate.decision"] == "pending"
    decision = reg.promote(params)
    assert decision["decision"] == "promoted", decision["reasons"]
    assert decision["compared_with"] is None
    assert decision["infrastructure"]["passed"] and decision["infrastructure"]["foreign_modules"] == []
    assert decision["infrastructure"]["max_abs_diff_batch"] <= params.register.smoke.atol
    assert decision["behaviour"]["passed"]
    weak_recall = decision["challenger_metrics"]["overall"]["recall_at_fpr"]
    assert weak_recall >= params.register.floors.min_recall_at_fpr
    assert _aliases(world) == {"challenger": "1", "champion": "1"}
    assert _client(world).get_model_version("ad-filter", "1").tags["gate.decision"] == "promoted"

    # 2. a worse challenger is refused, with reasons naming what it missed
    _register(world, "worse", monkeypatch)
    refused = reg.promote(params)
    assert refused["decision"] == "refused" and refused["compared_with"] == "1"
    worse_recall = refused["challenger_metrics"]["overall"]["recall_at_fpr"]
    assert worse_recall < weak_recall - params.register.promotion.recall_tolerance
    assert refused["checks"]["recall_vs_champion"] is False
    assert any("recall at FPR" in r and "vs champion" in r for r in refused["reasons"])
    assert any(r.startswith("behaviour: minimum functionality") for r in refused["reasons"])
    assert _aliases(world)["champion"] == "1" and _aliases(world)["challenger"] == "2"
    tags = _client(world).get_model_version("ad-filter", "2").tags
    assert tags["gate.decision"] == "refused" and "recall at FPR" in tags["gate.reasons"]
    assert tags["gate.check.recall_vs_champion"] == "failed"
    assert "REFUSED" in reg.format_decision(refused)

    # 3. a challenger whose artifact does not load is refused by the infrastructure check
    _register(world, "broken", monkeypatch)
    broken = reg.promote(params)
    assert broken["decision"] == "refused"
    assert broken["checks"] == {"infrastructure": False}
    assert any(r.startswith("infrastructure:") and "does not load" in r for r in broken["reasons"])
    assert _aliases(world)["champion"] == "1"

    # 4. a better challenger is promoted over the champion
    better = _register(world, "good", monkeypatch)
    promoted = reg.promote(params, better["version"])
    assert promoted["decision"] == "promoted", promoted["reasons"]
    assert promoted["compared_with"] == "1"
    good_recall = promoted["challenger_metrics"]["overall"]["recall_at_fpr"]
    assert good_recall >= promoted["champion_metrics"]["overall"]["recall_at_fpr"]
    assert promoted["challenger_metrics"]["overall"]["false_kill_rate"] <= 0.003
    assert _aliases(world)["champion"] == better["version"] == "4"
    model = _client(world).get_registered_model("ad-filter")
    assert json.loads(model.tags[reg.HISTORY_TAG]) == ["1", "4"]

    # the champion is loadable by alias, as the server and users load it
    import mlflow.pyfunc

    loaded = mlflow.pyfunc.load_model("models:/ad-filter@champion")
    out = loaded.predict(pd.DataFrame({"text": [reg.OBVIOUS_ADS[0], reg.OBVIOUS_CLEAN[0]], "image": ["", ""]}))
    assert out["blocked"].tolist() == [True, False]

    # 5. rollback moves champion back to the previous champion, recorded
    back = reg.rollback(params, reason="complaints about v4")
    assert (back["from"], back["to"]) == ("4", "1")
    assert _aliases(world)["champion"] == "1"
    tags = _client(world).get_model_version("ad-filter", "4").tags
    assert tags["rolled_back_to"] == "1" and tags["rolled_back_reason"] == "complaints about v4"
    with pytest.raises(reg.RegisterError, match="nothing to roll back to"):
        reg.rollback(params)


def test_eval_set_is_frozen_and_checked(world: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks import register as reg

    monkeypatch.chdir(world["root"])
    posts, manifest = reg.ensure_eval_set(world["params"])
    again, manifest_again = reg.ensure_eval_set(world["params"])
    assert manifest_again["version"] == manifest["version"] and len(again) == len(posts)
    assert all(Path(p).is_file() for p in posts["image"] if p)
    tampered = world["root"] / "tampered"
    shutil.copytree(world["root"] / world["params"].register.eval_set, tampered)
    table = pd.read_parquet(tampered / reg.EVAL_POSTS)
    table.loc[0, "label"] = 1 - table.loc[0, "label"]
    table.to_parquet(tampered / reg.EVAL_POSTS, index=False)
    with pytest.raises(reg.RegisterError, match="was modified"):
        reg.load_eval_set(tampered)
