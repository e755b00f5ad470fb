"""ad_filter_train: the whole pipeline from the Airflow UI, from raw posts to a promoted model.

Trigger it with the form's Params (data source, profile, tuning trials, epochs, skip tuning,
promote). Each pipeline task runs its DVC stage in the project folder (`dvc repro <stage>`), so
a rerun after a failure skips every stage whose inputs did not change; artifacts pass by path,
XCom carries only small metadata (stage timings, the data version, the model version). One
MLflow run holds the whole DAG run: `start_run` creates it and every stage logs into it
through `$ADFILTER_MLFLOW_RUN_ID`.
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import Param, chain, dag, get_current_context, task

PROJECT = os.environ.get("ADFILTER_PROJECT_DIR") or str(Path(__file__).resolve().parents[1])
PROFILES = ["params.yaml", "default", "ci", "gpu"]


def _dvc_stages() -> set[str]:
    # A plain read of the stage names: the augment stage joins the chain once dvc.yaml has it.
    try:
        text = Path(PROJECT, "dvc.yaml").read_text()
    except OSError:
        return set()
    return set(re.findall(r"(?m)^  ([A-Za-z_][\w-]*):\s*$", text))


STAGES = [s for s in ("validate", "split", "featurize", "augment", "tune", "train", "evaluate", "export")
          if s != "augment" or "augment" in _dvc_stages()]


def _orchestrate():
    import sys

    if PROJECT not in sys.path:
        sys.path.insert(0, PROJECT)
    from tasks import orchestrate

    return orchestrate


def _mark_run_failed(context) -> None:
    run_id = context["ti"].xcom_pull(task_ids="start_run")
    if run_id:
        _orchestrate().end_run(PROJECT, run_id, "FAILED", {"failed_task": context["ti"].task_id})


DEFAULT_ARGS = {
    "owner": "adfilter",
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
    "on_failure_callback": _mark_run_failed,
}

PARAMS = {
    "data_source": Param("params.yaml", enum=["params.yaml", "sample", "path"], title="Data source",
                         description="params.yaml: as configured; sample: the embedded sample; "
                                     "path: your own file (below)"),
    "data_path": Param("", type="string", title="Data file (for source 'path')",
                       description="CSV, JSONL or Parquet of posts, relative to the project folder"),
    "profile": Param("params.yaml", enum=PROFILES, title="Params profile",
                     description="default fits a 2-core CPU, ci is tiny, gpu is full size"),
    "tuning_trials": Param(None, type=["null", "integer"], minimum=0, title="Tuning trials",
                           description="Optuna trials per worker; empty: as params.yaml says"),
    "epochs": Param(None, type=["null", "integer"], minimum=1, title="Epochs",
                    description="train.max_epochs; empty: as params.yaml says"),
    "skip_tuning": Param(False, type="boolean", title="Skip tuning",
                         description="train with params.yaml's values, no Optuna study"),
    "promote": Param(True, type="boolean", title="Promote",
                     description="run the promotion gate and move 'champion' if it passes"),
}


@dag(
    dag_id="ad_filter_train",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params=PARAMS,
    tags=["adfilter", "training"],
    doc_md=__doc__,
)
def ad_filter_train() -> None:
    @task
    def configure() -> dict:
        return _orchestrate().configure(PROJECT, get_current_context()["params"])

    @task
    def start_run(configured: dict) -> str:
        ctx = get_current_context()
        return _orchestrate().start_run(PROJECT, ctx["dag"].dag_id, ctx["run_id"], ctx["params"])

    @task
    def ingest(mlflow_run_id: str) -> dict:
        return _orchestrate().ingest_stage(PROJECT, mlflow_run_id)

    def stage(name: str):
        @task(task_id=name)
        def run_stage(mlflow_run_id: str) -> dict:
            return _orchestrate().repro(name, PROJECT, mlflow_run_id)

        return run_stage

    @task
    def register(mlflow_run_id: str) -> dict:
        return _orchestrate().register_stage(PROJECT, mlflow_run_id)

    @task
    def promote(mlflow_run_id: str, registered: dict) -> dict:
        enabled = bool(get_current_context()["params"]["promote"])
        return _orchestrate().promote(PROJECT, mlflow_run_id, registered.get("version"), enabled)

    run = start_run(configure())
    steps = [ingest(run), *[stage(name)(run) for name in STAGES]]
    registered = register(run)
    chain(*steps, registered, promote(run, registered))


ad_filter_train()
