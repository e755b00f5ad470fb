"""Two `python -m tasks.tune` workers share one Optuna study through one SQLite file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from tests.model_fixtures import write_features

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _workspace(tmp_path: Path) -> Path:
    write_features(tmp_path, sizes={"train": 48, "val": 24, "test": 12})
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["profile"] = "ci"
    raw["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw["tune"]["storage"] = f"sqlite:///{tmp_path / 'optuna.db'}"
    ci = raw["profiles"]["ci"]
    ci["tune"].update(n_trials=2, epochs_per_trial=1, timeout=0, subset=1.0)
    ci["train"].update(batch_size=16, num_threads=1)  # two workers on two cores
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return tmp_path


def test_two_workers_share_one_sqlite_study(tmp_path: Path) -> None:
    ws = _workspace(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "MPLBACKEND": "Agg", "ADFILTER_LOG_LEVEL": "WARNING"}
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "tasks.tune", "--worker", str(i)],
            cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in (0, 1)
    ]
    outputs = [w.communicate(timeout=240) for w in workers]
    for i, (w, (out, err)) in enumerate(zip(workers, outputs, strict=True)):
        assert w.returncode == 0, f"worker {i} failed:\n{out}\n{err[-4000:]}"
        assert "database is locked" not in err, f"worker {i}:\n{err[-4000:]}"

    best = json.loads((ws / "reports/best_params.json").read_text())
    study = optuna.load_study(study_name=best["study_name"], storage=f"sqlite:///{ws / 'optuna.db'}")
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 4
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    assert all(t.state in finished for t in trials)
    workers_seen = {t.user_attrs["worker"].rsplit(":", 1)[-1] for t in trials}
    assert workers_seen == {"w0", "w1"}
    # The pruning callback reported each epoch's validation metric to its trial.
    for t in trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert t.intermediate_values == {0: pytest.approx(t.value)}

    # The file names the study's best trial and its values, whichever worker wrote it last.
    assert best["source"] == "optuna"
    assert best["trials"]["complete"] + best["trials"].get("pruned", 0) >= 2
    best_trial = study.trials[best["best_trial"]]
    assert best_trial.state == optuna.trial.TrialState.COMPLETE
    assert {k: best[k] for k in ("lr", "dropout", "feature_dim")} == best_trial.params
    space = yaml.safe_load((ws / "params.yaml").read_text())["profiles"]["ci"]["tune"]["space"]
    assert best["feature_dim"] in space["feature_dim"]
    assert 1e-5 <= best["lr"] <= 1e-3 and 0.1 <= best["dropout"] <= 0.5
    assert (ws / "reports/tune/optimization_history.png").stat().st_size > 0

    # Every trial is a nested MLflow run under its worker's parent run.
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ad-filter").experiment_id])
    parents = {r.info.run_id for r in runs if r.data.tags.get("stage") == "tune"}
    children = [r for r in runs if "optuna.trial" in r.data.tags]
    assert len(parents) == 2 and len(children) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == parents
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {r.info.run_id for r in children}
