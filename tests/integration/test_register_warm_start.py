"""Incremental retraining's fine-tune on tiny synthetic features: it really starts from the
champion's weights (not a fresh net), writes what the train stage writes, and refuses weights
that do not fit the net params.yaml builds."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.model_fixtures import write_features

pytestmark = pytest.mark.integration


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum(((a[k].float() - b[k].float()) ** 2).sum() for k in a if a[k].is_floating_point()) ** 0.5)


def _net_state(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}


def test_finetune_starts_from_the_champion(tmp_path: Path, repo_root: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from adfilter.config import load_params
    from models.registry import build_from_spec
    from tasks.retrain import RetrainError, finetune
    from tasks.train import train

    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["profile"] = "ci"
    raw["profiles"]["ci"].setdefault("train", {}).update({"max_epochs": 1})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    write_features(tmp_path, sizes={"train": 64, "val": 32, "test": 16})
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ADFILTER_MLFLOW_RUN_ID", raising=False)
    params = load_params("params.yaml")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports/best_params.json").write_text(
        json.dumps({"lr": 1e-3, "dropout": 0.1, "feature_dim": 48}))

    train(params)                                   # the champion
    champion = tmp_path / "champion"
    shutil.copytree(tmp_path / "artifacts/model", champion)
    before = _net_state(champion / "model.ckpt")
    config = json.loads((champion / "config.json").read_text())

    report = finetune(params, champion, source="models:/ad-filter/1")

    assert report["warm_start"]["from"] == "models:/ad-filter/1"
    assert report["overrides"]["feature_dim"] == 48      # the champion's tuned width, not params'
    assert report["overrides"]["lr"] == pytest.approx(1e-3 * params.register.retrain.lr_factor)
    assert report["epochs"] == params.register.retrain.epochs
    assert json.loads((tmp_path / "reports/train.json").read_text())["warm_start"] == report["warm_start"]
    written = json.loads((tmp_path / "artifacts/model/config.json").read_text())
    assert written["warm_start"]["from"] == "models:/ad-filter/1" and written["net"] == config["net"]
    after = _net_state(tmp_path / "artifacts/model/model.ckpt")
    torch.manual_seed(123)
    fresh = build_from_spec(config["net"]).state_dict()
    moved = _distance(after, before)
    assert 0.0 < moved < 0.25 * _distance(fresh, before), (moved, _distance(fresh, before))

    # weights of another architecture are refused, naming what to do
    wider = dataclasses.replace(params, model=dataclasses.replace(params.model, fusion_layers=2))
    with pytest.raises(RetrainError, match="do not fit the net"):
        finetune(wider, champion)
