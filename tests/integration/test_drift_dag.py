"""`ad_filter_drift` through `dag.test()`: it triggers `ad_filter_retrain` on a shifted store and
not on a stable one.

The world (tiny trained read-out model, featurizer, gate, reference source) and the scenario
traffic come from `test_drift_pipeline`; each scenario gets its own project folder whose
`params.yaml` points the drift job at that scenario's store, and the DAG runs in its own
interpreter with `ADFILTER_PROJECT_DIR` set to it and a throw-away Airflow home.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import dvc_bin
from tests.integration.test_drift_pipeline import _simulate, build_world

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

DAG_TEST = r"""
from airflow.utils.cli import get_bagged_dag
dag = get_bagged_dag(None, "ad_filter_drift")
run = dag.test()
print("DAGRUN", run.run_id, run.state)
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build_world(tmp_path_factory.mktemp("drift-dag"))


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("airflow-home")
    venv_bin = str(Path(dvc_bin()).parent)
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "AIRFLOW_HOME": str(home),
           "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    env.pop("ADFILTER_MLFLOW_RUN_ID", None)
    for cmd in (["db", "migrate"], ["dags", "reserialize"]):  # the trigger's target must be known
        subprocess.run([sys.executable, "-m", "airflow", *cmd], env=env, check=True,
                       capture_output=True, timeout=300)
    return env


def _project(world: dict[str, Any], name: str, store_url: str) -> Path:
    project = world["tmp"] / f"project-{name}"
    project.mkdir()
    data = yaml.safe_load(world["params_file"].read_text())
    data["drift"]["store_url"] = store_url
    (project / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return project


def _airflow_json(env: dict[str, str], *args: str) -> Any:
    proc = subprocess.run([sys.executable, "-m", "airflow", *args, "-o", "json"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in reversed(proc.stdout.splitlines()):  # log lines come first; the table is JSON
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    raise AssertionError(f"no JSON in `airflow {' '.join(args)}`: {proc.stdout[-2000:]}")


@pytest.mark.parametrize(("scenario", "retrain"), [("stable", False), ("image-shift", True)])
def test_drift_dag_triggers_retraining_only_on_a_shifted_store(
    world: dict[str, Any], airflow_env: dict[str, str], scenario: str, retrain: bool
) -> None:
    url, sim = _simulate(world, scenario, seed=1)
    assert sim["rows_written"] > 0
    project = _project(world, scenario, url)
    env = {**airflow_env, "ADFILTER_PROJECT_DIR": str(project)}
    before = _airflow_json(env, "dags", "list-runs", "ad_filter_retrain")

    proc = subprocess.run([sys.executable, "-c", DAG_TEST], cwd=project, env=env,
                          capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    _, run_id, state = next(ln for ln in proc.stdout.splitlines() if ln.startswith("DAGRUN ")).split()
    assert state == "success", log[-6000:]

    report = json.loads((project / "reports" / "drift.json").read_text())
    assert report["retrain"] is retrain, report.get("reason")
    assert (report["shift"] > 0.15) is retrain

    states = {row["task_id"]: row["state"] for row in
              _airflow_json(env, "tasks", "states-for-dag-run", "ad_filter_drift", run_id)}
    assert states["drift"] == "success"
    assert states["retrain_needed"] == "success"
    assert states["trigger_retrain"] == ("success" if retrain else "skipped")

    after = _airflow_json(env, "dags", "list-runs", "ad_filter_retrain")
    assert len(after) - len(before) == (1 if retrain else 0)
    if retrain:
        new = next(r for r in after if r["run_id"] not in {b["run_id"] for b in before})
        conf = _run_conf(env, "ad_filter_retrain", new["run_id"])
        assert conf["reason"] == "drift"
        assert float(conf["shift"]) == pytest.approx(report["shift"], abs=1e-6)
        assert conf["window"]


def _run_conf(env: dict[str, str], dag_id: str, run_id: str) -> dict[str, Any]:
    """The conf a DAG run was created with (`airflow dags list-runs` leaves it out)."""
    import sqlite3

    with sqlite3.connect(Path(env["AIRFLOW_HOME"]) / "airflow.db") as db:
        row = db.execute("SELECT conf FROM dag_run WHERE dag_id = ? AND run_id = ?",
                         (dag_id, run_id)).fetchone()
    assert row is not None, f"no run {run_id} of {dag_id} in the metadata DB"
    conf = row[0]
    return json.loads(conf) if isinstance(conf, (str, bytes)) else dict(conf or {})
