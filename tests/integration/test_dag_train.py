"""`ad_filter_train` end to end with `dag.test()` on the ci profile, in a fresh git + DVC workspace:
every stage really runs, and the run ends with a new `ad-filter` version in the workspace's MLflow
registry, with the right alias and tags, logged into the DAG run's one MLflow run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import dvc_bin, make_workspace

pytestmark = [pytest.mark.integration, pytest.mark.long]

# Runs in its own interpreter, so Airflow's settings (read at import) point at this test's home.
# (`get_bagged_dag` parses the DAG folder and serializes the DAG to the metadata DB, as `airflow
# dags test` does; dag.test() needs it there.)
DAG_TEST = r"""
import json, sys
from airflow.utils.cli import get_bagged_dag
dag = get_bagged_dag(None, "ad_filter_train")
run = dag.test(run_conf=json.loads(sys.argv[1]))
print("DAGRUN", run.run_id, run.state)
"""

CONF = {"profile": "ci", "data_source": "sample", "epochs": 1, "tuning_trials": 1, "promote": True}


def _env(home: Path, ws: Path) -> dict[str, str]:
    venv_bin = str(Path(dvc_bin()).parent)
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "AIRFLOW_HOME": str(home),
           "AIRFLOW__CORE__DAGS_FOLDER": str(ws / "dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for key in ("ADFILTER_PROJECT_DIR", "ADFILTER_MLFLOW_RUN_ID", "ADFILTER_PROMOTE"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="module")
def dag_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    ws = make_workspace(tmp_path_factory.mktemp("dagws"), profile="ci")
    home = tmp_path_factory.mktemp("airflow-home")
    env = _env(home, ws)
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True,
                   capture_output=True, timeout=300)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", DAG_TEST, json.dumps(CONF)],
                          cwd=ws, env=env, capture_output=True, text=True, timeout=1500)
    seconds = time.perf_counter() - started
    log = proc.stdout + proc.stderr
    (tmp_path_factory.getbasetemp() / "dag_test.log").write_text(log)
    assert proc.returncode == 0, log[-6000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("DAGRUN "))
    _, run_id, state = line.split(" ")
    return {"ws": ws, "run_id": run_id, "state": state, "seconds": seconds, "log": log}


def _client(ws: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    return mlflow.MlflowClient()


def test_dag_run_succeeds_and_registers_a_version(dag_run: dict) -> None:
    assert dag_run["state"] == "success", dag_run["log"][-6000:]
    print(f"ad_filter_train on the ci profile took {dag_run['seconds']:.0f} s (dag.test)")
    ws = dag_run["ws"]
    client = _client(ws)
    model = client.get_registered_model("ad-filter")
    versions = client.search_model_versions("name = 'ad-filter'")
    assert [str(v.version) for v in versions] == ["1"]
    version = versions[0]
    aliases = {k: str(v) for k, v in model.aliases.items()}
    report = json.loads((ws / "reports/register.json").read_text())
    assert aliases["challenger"] == "1"
    decision = version.tags["gate.decision"]
    assert decision in ("promoted", "refused")
    if decision == "promoted":
        assert aliases["champion"] == "1"
        assert json.loads(model.tags["champion_history"]) == ["1"]
    else:
        assert "champion" not in aliases and version.tags["gate.reasons"]

    manifest = json.loads((ws / "data/raw/manifest.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws, capture_output=True, text=True).stdout.strip()
    assert version.tags["data_version"] == manifest["data_version"]
    assert version.tags["git_commit"] == head
    assert version.tags["profile"] == "ci"
    assert version.tags["eval_set_version"] == json.loads((ws / "data/evalset/manifest.json").read_text())["version"]
    assert float(version.tags["test.recall_at_fpr"]) >= 0.0
    assert report["version"] == "1" and report["run_id"] == version.run_id

    # one MLflow run for the DAG run: training, registration and the gate all in it
    run = client.get_run(version.run_id)
    assert run.data.tags["airflow.dag_id"] == "ad_filter_train"
    assert run.data.tags["airflow.dag_run_id"] == dag_run["run_id"]
    assert run.data.tags["gate.decision"] == decision
    assert run.data.params["train.max_epochs"] == "1"      # the trigger form's epochs
    assert run.data.params["profile"] == "ci"
    assert "test_recall_at_fpr" in run.data.metrics and "val_auprc" in run.data.metrics
    assert run.data.tags["data_version"] == manifest["data_version"]
    assert run.info.status == "FINISHED"
    experiment = client.get_experiment(run.info.experiment_id)
    assert len(client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.`airflow.dag_run_id` = '{dag_run['run_id']}'")) == 1


def test_rerun_skips_finished_stages(dag_run: dict) -> None:
    """DVC's cache: with nothing changed, every stage is skipped and nothing is re-registered."""
    ws = dag_run["ws"]
    out = subprocess.run([dvc_bin(), "status"], cwd=ws, env=_env(ws, ws), capture_output=True, text=True)
    assert out.returncode == 0 and "up to date" in out.stdout, out.stdout + out.stderr
