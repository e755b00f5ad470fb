"""ad_filter_drift: daily drift check; triggers `ad_filter_retrain` when the SHAP feature
importance distribution has shifted by more than the threshold (15%).

`drift` runs the monitoring job (`tasks/drift.py`: SHAP importance of the serving prediction
log's recent window against the reference), which writes `reports/drift.json` ({"shift",
"threshold", "retrain", "window"}) and returns it; `trigger_retrain` starts the retrain DAG
with the reason, the shift and the window in its conf. The trigger is non-deferrable and does not wait (the
deferrable and reset modes have known bugs in Airflow 3).
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import chain, dag, task

PROJECT = os.environ.get("ADFILTER_PROJECT_DIR") or str(Path(__file__).resolve().parents[1])


def _orchestrate():
    import sys

    if PROJECT not in sys.path:
        sys.path.insert(0, PROJECT)
    from tasks import orchestrate

    return orchestrate


DEFAULT_ARGS = {
    "owner": "adfilter",
    "retries": 2,
    "retry_delay": timedelta(minutes=1),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=15),
}


@dag(
    dag_id="ad_filter_drift",
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    render_template_as_native_obj=True,
    tags=["adfilter", "monitoring"],
    doc_md=__doc__,
)
def ad_filter_drift() -> None:
    @task
    def drift() -> dict:
        orchestrate = _orchestrate()
        from tasks.drift import drift as measure

        return orchestrate.run_drift(PROJECT, measure)

    @task.short_circuit
    def retrain_needed(report: dict) -> bool:
        return bool(report["retrain"])

    trigger = TriggerDagRunOperator(
        task_id="trigger_retrain",
        trigger_dag_id="ad_filter_retrain",
        conf={
            "reason": "drift",
            "shift": "{{ ti.xcom_pull(task_ids='drift')['shift'] }}",
            "window": "{{ ti.xcom_pull(task_ids='drift')['window'] }}",
        },
        wait_for_completion=False,
        deferrable=False,
    )

    report = drift()
    chain(report, retrain_needed(report), trigger)


ad_filter_drift()
