"""ad_filter_retrain: incremental retraining every 14 days, and on demand (the drift DAG).

Merges the moderators' labels from the serving feedback store and new ad variants with the
current snapshot into a new DVC data version, fine-tunes the champion's weights on it (warm
start), and judges the result against the champion with the same promotion gate as
`ad_filter_train`. Trigger it with a `reason` in the conf (the drift DAG adds `shift` and
`window`). After the fine-tune is recorded with `dvc commit train`, the later stages run with
`dvc repro --single-item`, so DVC does not retrain from scratch behind it.
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import Param, chain, dag, get_current_context, task

PROJECT = os.environ.get("ADFILTER_PROJECT_DIR") or str(Path(__file__).resolve().parents[1])


def _dvc_stages() -> set[str]:
    try:
        text = Path(PROJECT, "dvc.yaml").read_text()
    except OSError:
        return set()
    return set(re.findall(r"(?m)^  ([A-Za-z_][\w-]*):\s*$", text))


DATA_STAGES = [s for s in ("validate", "split", "featurize", "augment")
               if s != "augment" or "augment" in _dvc_stages()]


def _tasks():
    import sys

    if PROJECT not in sys.path:
        sys.path.insert(0, PROJECT)
    from tasks import orchestrate, retrain

    return orchestrate, retrain


def _mark_run_failed(context) -> None:
    run_id = context["ti"].xcom_pull(task_ids="start_run")
    if run_id:
        _tasks()[0].end_run(PROJECT, run_id, "FAILED", {"failed_task": context["ti"].task_id})


DEFAULT_ARGS = {
    "owner": "adfilter",
    "retries": 2,
    "retry_delay": timedelta(minutes=1),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=15),
    "on_failure_callback": _mark_run_failed,
}

PARAMS = {
    "reason": Param("scheduled", type="string", title="Reason",
                    description="why this retrain runs: scheduled, drift, a ticket ..."),
    "shift": Param(None, type=["null", "number"], title="Importance shift (from the drift DAG)"),
    "window": Param(None, type=["null", "string"], title="Drift window (from the drift DAG)"),
    "promote": Param(True, type="boolean", title="Promote",
                     description="run the promotion gate and move 'champion' if it passes"),
}


@dag(
    dag_id="ad_filter_retrain",
    schedule=timedelta(days=14),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params=PARAMS,
    tags=["adfilter", "retraining"],
    doc_md=__doc__,
)
def ad_filter_retrain() -> None:
    @task
    def start_run() -> str:
        ctx = get_current_context()
        return _tasks()[0].start_run(PROJECT, ctx["dag"].dag_id, ctx["run_id"], ctx["params"])

    @task
    def merge_feedback(mlflow_run_id: str) -> dict:
        return _tasks()[1].merge_step(PROJECT, get_current_context()["params"], mlflow_run_id)

    @task
    def ingest(mlflow_run_id: str) -> dict:
        return _tasks()[0].ingest_stage(PROJECT, mlflow_run_id)

    def stage(name: str, single_item: bool = False):
        @task(task_id=name)
        def run_stage(mlflow_run_id: str) -> dict:
            return _tasks()[0].repro(name, PROJECT, mlflow_run_id, single_item=single_item)

        return run_stage

    @task
    def finetune(mlflow_run_id: str) -> dict:
        return _tasks()[1].finetune_step(PROJECT, mlflow_run_id)

    @task
    def register(mlflow_run_id: str) -> dict:
        return _tasks()[0].register_stage(PROJECT, mlflow_run_id, single_item=True)

    @task
    def promote(mlflow_run_id: str, registered: dict) -> dict:
        enabled = bool(get_current_context()["params"]["promote"])
        return _tasks()[0].promote(PROJECT, mlflow_run_id, registered.get("version"), enabled)

    run = start_run()
    data = [ingest(run), *[stage(name)(run) for name in DATA_STAGES]]
    after = [stage(name, single_item=True)(run) for name in ("evaluate", "export")]
    registered = register(run)
    chain(merge_feedback(run), *data, finetune(run), *after, registered, promote(run, registered))


ad_filter_retrain()
