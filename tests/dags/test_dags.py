"""The DAG files as Airflow's DAG processor sees them: no import errors, the ids, schedules,
retries and trigger-form Params the product promises, wiring in the right order, fast parsing."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAGS = ROOT / "dags"
DAG_IDS = {"ad_filter_train", "ad_filter_retrain", "ad_filter_drift"}


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS), safe_mode=False)


def test_no_import_errors_and_the_three_dags(dagbag) -> None:
    assert dagbag.import_errors == {}
    assert set(dagbag.dag_ids) == DAG_IDS


def test_schedules(dagbag) -> None:
    from airflow.sdk.definitions.timetables._cron import CronMixin
    from airflow.sdk.definitions.timetables._delta import DeltaMixin
    from airflow.sdk.definitions.timetables.simple import NullTimetable

    assert isinstance(dagbag.dags["ad_filter_train"].timetable, NullTimetable)  # UI-triggered only
    retrain = dagbag.dags["ad_filter_retrain"].timetable
    assert isinstance(retrain, DeltaMixin) and retrain.delta == timedelta(days=14)
    drift = dagbag.dags["ad_filter_drift"].timetable
    assert isinstance(drift, CronMixin) and drift.expression == "0 0 * * *"
    for dag_id in DAG_IDS:
        dag = dagbag.dags[dag_id]
        assert dag.catchup is False and dag.max_active_runs == 1, dag_id


def test_every_task_retries_with_backoff(dagbag) -> None:
    for dag_id in DAG_IDS:
        for t in dagbag.dags[dag_id].tasks:
            assert t.retries >= 2, (dag_id, t.task_id)
            assert t.retry_exponential_backoff, (dag_id, t.task_id)
            assert t.retry_delay >= timedelta(seconds=30), (dag_id, t.task_id)


def test_train_dag_params_build_the_trigger_form(dagbag) -> None:
    params = dagbag.dags["ad_filter_train"].params
    assert set(params.keys()) == {"data_source", "data_path", "profile", "tuning_trials", "epochs",
                                  "skip_tuning", "promote"}
    schema = {k: params.get_param(k).schema for k in params.keys()}
    assert schema["data_source"]["enum"] == ["params.yaml", "sample", "path"]
    assert {"default", "ci", "gpu"} <= set(schema["profile"]["enum"])
    assert schema["tuning_trials"]["type"] == ["null", "integer"]
    assert schema["epochs"]["minimum"] == 1
    assert schema["skip_tuning"]["type"] == schema["promote"]["type"] == "boolean"
    resolved = params.validate()
    assert resolved["promote"] is True and resolved["skip_tuning"] is False
    assert resolved["epochs"] is None and resolved["data_source"] == "params.yaml"
    # the form refuses what params.yaml could not take
    from airflow.sdk import Param
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError):
        Param(schema["epochs"].get("default"), **schema["epochs"]).resolve(0)
    with pytest.raises(ParamValidationError):
        Param("params.yaml", **schema["data_source"]).resolve("s3")


def test_retrain_dag_takes_a_reason(dagbag) -> None:
    params = dagbag.dags["ad_filter_retrain"].params
    assert {"reason", "shift", "window", "promote"} <= set(params.keys())
    assert params.validate()["reason"] == "scheduled"


def _chain(dag) -> list[str]:
    """Task ids from the root along the single path downstream (the DAGs are chains)."""
    order, seen = [], set()
    current = [t for t in dag.tasks if not t.upstream_task_ids]
    while current:
        assert len(current) == 1, [t.task_id for t in current]
        task = current[0]
        order.append(task.task_id)
        seen.add(task.task_id)
        nxt = [dag.get_task(i) for i in task.downstream_task_ids]
        # a task joined by a later one (XCom) is not the next step; the chain's next step is the
        # one all of whose upstreams are already done
        current = [t for t in nxt if t.upstream_task_ids <= seen]
        current = [t for t in current if not any(
            o is not t and t.task_id in o.upstream_task_ids for o in current)]
    return order


def test_train_chain_runs_every_stage_in_pipeline_order(dagbag) -> None:
    from tests.conftest import ROOT as project

    order = _chain(dagbag.dags["ad_filter_train"])
    expected = ["configure", "start_run", "ingest", "validate", "split", "featurize", "tune",
                "train", "evaluate", "export", "register", "promote"]
    import yaml

    has_augment = "augment" in (yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    if has_augment:
        expected.insert(expected.index("tune"), "augment")
    assert order == expected


def test_retrain_and_drift_chains(dagbag) -> None:
    retrain = _chain(dagbag.dags["ad_filter_retrain"])
    assert retrain[:3] == ["start_run", "merge_feedback", "ingest"]
    assert retrain[-5:] == ["finetune", "evaluate", "export", "register", "promote"]
    drift = dagbag.dags["ad_filter_drift"]
    assert _chain(drift) == ["drift", "retrain_needed", "trigger_retrain"]
    trigger = drift.get_task("trigger_retrain")
    assert trigger.trigger_dag_id == "ad_filter_retrain"
    assert trigger.deferrable is False and trigger.wait_for_completion is False
    assert trigger.conf["reason"] == "drift" and {"shift", "window"} <= set(trigger.conf)


@pytest.mark.parametrize("name", sorted(p.name for p in DAGS.glob("ad_filter_*.py")))
def test_dag_file_parses_fast_and_imports_nothing_heavy(name: str) -> None:
    """Parse each file in a fresh interpreter after Airflow itself is imported, as the DAG
    processor does: under 2 s, and without torch, pandas, sklearn or mlflow."""
    code = (
        "import sys, time, importlib.util\n"
        "import airflow.sdk\n"
        "from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator\n"
        f"spec = importlib.util.spec_from_file_location('dagfile', {str(DAGS / name)!r})\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "t0 = time.perf_counter(); spec.loader.exec_module(mod); dt = time.perf_counter() - t0\n"
        "heavy = [m for m in ('torch', 'pandas', 'sklearn', 'mlflow', 'lightning', 'tasks') if m in sys.modules]\n"
        "print('RESULT', dt, ','.join(heavy) or '-')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    result = next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))
    _, seconds, heavy = result.split(" ")
    assert float(seconds) < 2.0, f"{name} took {float(seconds):.2f} s to parse"
    assert heavy == "-", f"{name} imports {heavy} at parse time"
