"""Real Airflow, as a user drives it: `airflow standalone` (API server, scheduler, DAG processor,
triggerer) on loopback in a temporary AIRFLOW_HOME, the project's DAGs from a fresh workspace;
log in, unpause and trigger `ad_filter_train` through REST API v2 with a conf (what the UI's
trigger form sends), wait for success, check the MLflow registry, shut everything down."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import dvc_bin, make_workspace

pytestmark = pytest.mark.e2e

CONF = {"data_source": "sample", "profile": "ci", "skip_tuning": True, "epochs": 1, "promote": True}
START_TIMEOUT_S = 300
RUN_TIMEOUT_S = 1500


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, check, timeout: float, proc: subprocess.Popen, log: Path, every: float = 2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"airflow standalone exited ({proc.returncode}) while waiting for {what}:\n"
                        f"{log.read_text()[-4000:]}")
        result = check()
        if result:
            return result
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def airflow(tmp_path_factory: pytest.TempPathFactory):
    import httpx

    ws = make_workspace(tmp_path_factory.mktemp("e2ews"), profile="ci")
    home = tmp_path_factory.mktemp("airflow-home")
    port = _free_port()
    venv_bin = str(Path(dvc_bin()).parent)
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "AIRFLOW_HOME": str(home),
           "AIRFLOW__CORE__DAGS_FOLDER": str(ws / "dags"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW__API__PORT": str(port),
           # task processes report to the API server's execution API, on this port too
           "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
           "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for key in ("ADFILTER_PROJECT_DIR", "ADFILTER_MLFLOW_RUN_ID", "ADFILTER_PROMOTE"):
        env.pop(key, None)
    log = home / "standalone.log"
    with log.open("w") as out:
        proc = subprocess.Popen([f"{venv_bin}/airflow", "standalone"], cwd=home, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    try:
        passwords = home / "simple_auth_manager_passwords.json.generated"

        def healthy() -> bool:
            try:
                return passwords.is_file() and httpx.get(f"{base}/api/v2/monitor/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        _wait("the API server", healthy, START_TIMEOUT_S, proc, log)
        username, password = next(iter(json.loads(passwords.read_text()).items()))
        token = httpx.post(f"{base}/auth/token", json={"username": username, "password": password},
                           timeout=30).json()["access_token"]
        client = httpx.Client(base_url=f"{base}/api/v2", headers={"Authorization": f"Bearer {token}"},
                              timeout=30)
        yield {"client": client, "proc": proc, "log": log, "ws": ws,
               "startup_s": time.perf_counter() - started}
        client.close()
    finally:
        # The whole process group: standalone's API server, scheduler, DAG processor, triggerer.
        with_group = os.getpgid(proc.pid)
        os.killpg(with_group, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(with_group, signal.SIGKILL)
            proc.wait(timeout=30)
        time.sleep(1)
        with_group_alive = subprocess.run(["pgrep", "-g", str(with_group)], capture_output=True).stdout
        if with_group_alive.strip():
            os.killpg(with_group, signal.SIGKILL)


def test_trigger_from_the_api_like_the_ui_and_get_a_registered_model(airflow: dict) -> None:
    client, proc, log, ws = airflow["client"], airflow["proc"], airflow["log"], airflow["ws"]

    def dag_listed():
        r = client.get("/dags/ad_filter_train")
        return r.json() if r.status_code == 200 else None

    dag = _wait("the DAG processor to load ad_filter_train", dag_listed, START_TIMEOUT_S, proc, log)
    assert dag["is_paused"] is True
    details = client.get("/dags/ad_filter_train/details").json()
    assert set(details["params"]) == {"data_source", "data_path", "profile", "tuning_trials", "epochs",
                                      "skip_tuning", "promote"}
    assert client.patch("/dags/ad_filter_train", json={"is_paused": False}).json()["is_paused"] is False

    triggered = time.perf_counter()
    r = client.post("/dags/ad_filter_train/dagRuns", json={"logical_date": None, "conf": CONF})
    assert r.status_code == 200, r.text
    run_id = r.json()["dag_run_id"]
    assert r.json()["conf"] == CONF

    def finished():
        state = client.get(f"/dags/ad_filter_train/dagRuns/{run_id}").json()["state"]
        return state if state in ("success", "failed") else None

    state = _wait("the DAG run to finish", finished, RUN_TIMEOUT_S, proc, log, every=5.0)
    seconds = time.perf_counter() - triggered
    tis = client.get(f"/dags/ad_filter_train/dagRuns/{run_id}/taskInstances").json()["task_instances"]
    states = {t["task_id"]: t["state"] for t in tis}
    assert state == "success", f"{states}\n{log.read_text()[-4000:]}"
    assert all(s == "success" for s in states.values()), states
    print(f"Airflow up in {airflow['startup_s']:.0f} s; ad_filter_train (ci, {CONF}) ran in {seconds:.0f} s")

    xcom = client.get(f"/dags/ad_filter_train/dagRuns/{run_id}/taskInstances/promote/xcomEntries/return_value")
    assert xcom.status_code == 200, xcom.text

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    mc = mlflow.MlflowClient()
    version = mc.get_model_version_by_alias("ad-filter", "challenger")
    decision = version.tags["gate.decision"]
    assert decision in ("promoted", "refused") and version.tags["gate.reasons"]
    if decision == "promoted":
        assert str(mc.get_model_version_by_alias("ad-filter", "champion").version) == str(version.version)
    run = mc.get_run(version.run_id)
    assert run.data.tags["airflow.dag_run_id"] == run_id
    assert run.data.params["train.max_epochs"] == "1" and run.data.params["tune.enabled"] == "False"
