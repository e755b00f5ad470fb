"""The train stage for real on tiny synthetic features: MLflow, resume after a kill, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.model_fixtures import write_features

pytestmark = pytest.mark.integration


def _workspace(tmp_path: Path, repo_root: Path, train: dict | None = None,
               sizes: dict[str, int] | None = None) -> Path:
    """A folder like the repository root for the stage: params.yaml (ci profile) + features."""
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["profile"] = "ci"
    raw["profiles"]["ci"].setdefault("train", {}).update(train or {})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    write_features(tmp_path, sizes=sizes)
    return tmp_path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ADFILTER_MLFLOW_RUN_ID"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", ADFILTER_LOG_LEVEL="INFO")
    return env


def _start_train(cwd: Path, log_name: str) -> subprocess.Popen:
    log = (cwd / log_name).open("w")
    return subprocess.Popen([sys.executable, "-m", "tasks.train"], cwd=cwd, env=_env(),
                            stdout=log, stderr=subprocess.STDOUT)


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text()[-n:] if path.exists() else ""


def test_train_writes_model_config_report_and_mlflow_run(
    tmp_path: Path, repo_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    from adfilter.config import load_params
    from models.predict import load_net, predict_split
    from tasks.train import RUN_ID_ENV, resolve_precision, train

    ws = _workspace(tmp_path, repo_root, sizes={"train": 64, "val": 32, "test": 24})
    monkeypatch.chdir(ws)
    params = load_params("params.yaml")
    (ws / "reports").mkdir()
    (ws / "reports" / "best_params.json").write_text(
        json.dumps({"lr": 2e-3, "dropout": 0.2, "feature_dim": 48, "source": "optuna"}))

    # An Airflow DAG run creates the MLflow run first and hands its id down.
    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    experiment = mlflow.set_experiment(params.mlflow.experiment)
    run_id = mlflow.MlflowClient().create_run(experiment.experiment_id).info.run_id
    monkeypatch.setenv(RUN_ID_ENV, run_id)

    report = train(params)

    assert report["mlflow_run_id"] == run_id
    assert report["epochs"] == params.train.max_epochs == len(report["seconds_per_epoch"])
    assert report["best"]["epoch"] in range(report["epochs"])
    assert 0.0 <= report["best"]["val_auprc"] <= 1.0
    assert report["overrides"] == {"lr": 2e-3, "dropout": 0.2, "feature_dim": 48}
    assert report["precision_requested"] == params.train.precision
    assert report["precision"] == resolve_precision(params.train.precision, params.train.accelerator)
    assert json.loads((ws / "reports" / "train.json").read_text()) == report

    config = json.loads((ws / "artifacts" / "model" / "config.json").read_text())
    assert config["net"]["kwargs"]["feature_dim"] == 48
    assert config["params"]["train"]["lr"] == 2e-3
    assert config["feature_dims"]["tfidf"] == 16
    assert set(config["provenance"]) >= {"data_version", "git_commit"}
    assert config["parameter_count"]["total"] == report["parameter_count"]["total"]

    net, _ = load_net(ws / "artifacts" / "model")
    assert net.text_to_image.attn.embed_dim == 48
    frame = predict_split(ws / "artifacts" / "model", ws / "data" / "features" / "test.npz")
    assert list(frame.columns) == ["id", "p_ad", "sensitivity", "score"]
    assert len(frame) == 24 and np.isfinite(frame[["p_ad", "sensitivity", "score"]]).all().all()
    ckpt = torch.load(ws / "artifacts" / "model" / "model.ckpt", weights_only=True)
    assert "optimizer_states" not in ckpt
    calibration = report["calibration"]
    assert calibration["method"] == "platt" and calibration["posts"] == 32
    assert float(ckpt["state_dict"]["net.ad_logit_scale"]) == pytest.approx(calibration["scale"])
    assert float(ckpt["state_dict"]["net.ad_logit_bias"]) == pytest.approx(calibration["bias"])
    assert float(net.ad_logit_scale) == pytest.approx(calibration["scale"])
    assert json.loads(json.dumps(ckpt["adfilter"]["net"], default=str)) == config["net"]

    run = mlflow.MlflowClient().get_run(run_id)
    assert run.data.params["train.lr"] == "0.002"
    assert run.data.params["model.feature_dim"] == "48"
    assert "provenance.data_version" in run.data.params
    assert {"val_loss", "val_auprc", "train_loss_epoch"} <= set(run.data.metrics)
    history = mlflow.MlflowClient().get_metric_history(run_id, "val_auprc")
    assert len(history) == report["epochs"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "train")}
    assert {"train/model.ckpt", "train/config.json", "train/train.json"} <= artifacts


def test_train_resumes_from_last_checkpoint_after_a_kill(tmp_path: Path, repo_root: Path) -> None:
    # Enough epochs that a fast machine cannot finish them all between seeing the first
    # checkpoint and the kill; no early stopping, so the resumed run must reach max_epochs.
    max_epochs = 12
    ws = _workspace(tmp_path, repo_root,
                    train={"max_epochs": max_epochs, "early_stopping": {"patience": 100}},
                    sizes={"train": 96, "val": 16, "test": 8})
    last = ws / "artifacts" / "checkpoints" / "lightning" / "last.ckpt"

    first = _start_train(ws, "first.log")
    try:
        deadline = time.monotonic() + 120
        size = -1
        while time.monotonic() < deadline and first.poll() is None:
            if last.is_file() and last.stat().st_size == size > 0:
                break  # written and no longer growing
            size = last.stat().st_size if last.is_file() else -1
            time.sleep(0.05)
        assert first.poll() is None, f"first run ended before it could be killed:\n{_tail(ws / 'first.log')}"
        assert last.is_file(), f"no last.ckpt within 120 s:\n{_tail(ws / 'first.log')}"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    killed_at = torch.load(last, map_location="cpu", weights_only=False)["epoch"]
    state = json.loads((ws / "artifacts" / "checkpoints" / "run.json").read_text())
    assert state["complete"] is False
    assert not (ws / "reports" / "train.json").exists()
    assert killed_at < max_epochs - 1

    second = _start_train(ws, "second.log")
    assert second.wait(timeout=180) == 0, _tail(ws / "second.log")
    report = json.loads((ws / "reports" / "train.json").read_text())
    assert report["resumed_from"].endswith("last.ckpt")
    assert report["start_epoch"] == killed_at + 1 > 0
    assert report["epochs"] == max_epochs  # epochs before the kill come back from the checkpoint
    assert [r["epoch"] for r in report["history"]] == list(range(max_epochs))
    assert report["mlflow_run_id"] == state["mlflow_run_id"]
    assert json.loads((ws / "artifacts" / "checkpoints" / "run.json").read_text())["complete"]


def test_ddp_two_processes_on_cpu(tmp_path: Path, repo_root: Path) -> None:
    ws = _workspace(tmp_path, repo_root,
                    train={"accelerator": "cpu", "devices": 2, "strategy": "ddp", "max_epochs": 2},
                    sizes={"train": 64, "val": 16, "test": 8})
    proc = _start_train(ws, "ddp.log")
    assert proc.wait(timeout=180) == 0, _tail(ws / "ddp.log")
    report = json.loads((ws / "reports" / "train.json").read_text())
    assert report["world_size"] == 2
    assert report["torch_threads"] >= 1
    assert report["epochs"] == 2
    assert (ws / "artifacts" / "model" / "model.ckpt").is_file()
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in (ws / "ddp.log").read_text()
