"""What the Airflow DAGs' tasks share: run a DVC stage in the project folder, apply a DAG run's
trigger-form values to `params.yaml`, and keep one MLflow run per DAG run.

Every pipeline task runs `dvc repro <stage>` in the project folder, so a rerun after a failure
skips the stages whose inputs did not change, and the DVC stage and the Airflow task run the
same `python -m tasks.<stage>`. DVC takes a repository lock, so the stages of one DAG run go
one after another (and the DAGs allow one active run each).

Trigger-form values are written into `params.yaml` (into the selected profile's overrides when a
profile other than `default` is active) before the stages run, the way `dvc exp run
--set-param` does: `params.yaml` stays the only configuration, and `dvc.lock` records the values
each output was made with. Empty form fields leave `params.yaml` as it is.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

log = logging.getLogger("tasks.orchestrate")

PROJECT_ENV: Final = "ADFILTER_PROJECT_DIR"
RUN_ID_ENV: Final = "ADFILTER_MLFLOW_RUN_ID"
KEEP: Final = "params.yaml"  # the trigger form's "leave as configured" choice
DAG_ID_TAG: Final = "airflow.dag_id"
DAG_RUN_TAG: Final = "airflow.dag_run_id"


class OrchestrationError(RuntimeError):
    """A stage that failed, or a trigger-form value that params.yaml cannot take."""


# --------------------------------------------------------------------------- the project


def project_dir(default: str | Path | None = None) -> Path:
    """`$ADFILTER_PROJECT_DIR`, else `default` (the checkout the DAG files live in)."""
    path = Path(os.environ.get(PROJECT_ENV) or default or ".").resolve()
    if not (path / "dvc.yaml").is_file() or not (path / "params.yaml").is_file():
        raise OrchestrationError(
            f"{path} holds no dvc.yaml and params.yaml; set ${PROJECT_ENV} to the adfilter checkout"
        )
    return path


def dvc_stages(project: str | Path) -> list[str]:
    """The stage names in `dvc.yaml`, in file order."""
    import yaml

    data = yaml.safe_load((Path(project) / "dvc.yaml").read_text()) or {}
    return list((data.get("stages") or {}).keys())


def _env(mlflow_run_id: str | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    # The stage commands say `python`; it must be this interpreter's, wherever Airflow runs.
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "MPLBACKEND": "Agg"}
    env.pop("PYTHONPATH", None)
    if mlflow_run_id:
        env[RUN_ID_ENV] = mlflow_run_id
    env.update(extra or {})
    return env


def _dvc() -> str:
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.exists() else (shutil.which("dvc") or "dvc")


def _run(cmd: list[str], project: Path, env: Mapping[str, str], what: str,
         timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    started = time.perf_counter()
    log.info("%s: %s (in %s)", what, " ".join(cmd), project)
    proc = subprocess.run(cmd, cwd=project, env=dict(env), capture_output=True, text=True, timeout=timeout)
    for line in (proc.stdout + proc.stderr).splitlines()[-60:]:
        log.info("  %s", line)
    if proc.returncode != 0:
        raise OrchestrationError(
            f"{what} failed in {project} (exit {proc.returncode}, {time.perf_counter() - started:.0f} s); "
            f"the last lines:\n{(proc.stdout + proc.stderr).strip()[-3000:]}"
        )
    return proc


def repro(
    stage: str,
    project: str | Path,
    mlflow_run_id: str | None = None,
    single_item: bool = False,
    extra_env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """`dvc repro [--single-item] [--force] <stage>` in `project`; small metadata for XCom.

    `single_item` runs only this stage if it changed, without looking upstream (the retrain
    DAG uses it after recording a fine-tuned model with `commit`). `force` runs it even when
    DVC sees no change (ingest of a source file DVC does not track, such as merged feedback).
    """
    project = Path(project)
    started = time.perf_counter()
    cmd = [_dvc(), "repro", *(["--single-item"] if single_item else []),
           *(["--force"] if force else []), stage]
    proc = _run(cmd, project, _env(mlflow_run_id, extra_env), f"dvc repro {stage}", timeout)
    out = proc.stdout + proc.stderr
    ran = re.findall(r"Running stage '([^']+)'", out)
    skipped = re.findall(r"Stage '([^']+)' didn't change, skipping", out)
    return {"stage": stage, "ran": ran, "skipped": skipped,
            "seconds": round(time.perf_counter() - started, 1)}


def ingest_stage(project: str | Path, mlflow_run_id: str | None = None) -> dict[str, Any]:
    """`dvc repro ingest`, forced for `ingest.source: path` (dvc.yaml does not track that file,
    so a changed file under the same name would otherwise be skipped); then `dvc push`. The
    later stages run only if the new snapshot differs. XCom: the data version."""
    from adfilter.config import load_params

    project = Path(project)
    source = load_params(project / "params.yaml").ingest.source
    result = repro("ingest", project, mlflow_run_id, force=source == "path")
    return {**result, "source": source, "data_version": data_version(project), "pushed": push(project)}


def commit(stage: str, project: str | Path) -> dict[str, Any]:
    """`dvc commit --force <stage>`: record outputs made outside `dvc repro` (a fine-tune)."""
    _run([_dvc(), "commit", "--force", stage], Path(project), _env(), f"dvc commit {stage}")
    return {"stage": stage, "committed": True}


def push(project: str | Path) -> bool:
    """`dvc push` to the default remote, if one is configured; a missing remote is not an error."""
    project = Path(project)
    remote = subprocess.run([_dvc(), "remote", "default"], cwd=project, env=_env(),
                            capture_output=True, text=True)
    if remote.returncode != 0 or not remote.stdout.strip():
        log.info("no default DVC remote in %s; the data stays in the local cache", project)
        return False
    _run([_dvc(), "push", "--quiet"], project, _env(), "dvc push")
    return True


def run_module(module: str, project: str | Path, args: list[str] | None = None,
               mlflow_run_id: str | None = None, timeout: float | None = None) -> None:
    """`python -m <module> [args]` in `project`: steps that train launch their own process."""
    _run([sys.executable, "-m", module, *(args or [])], Path(project), _env(mlflow_run_id),
         f"python -m {module}", timeout)


# --------------------------------------------------------------------------- trigger form -> params


def trigger_overrides(conf: Mapping[str, Any]) -> dict[str, Any]:
    """The params.yaml keys the `ad_filter_train` trigger form sets (empty fields set nothing)."""
    out: dict[str, Any] = {}
    source = conf.get("data_source") or KEEP
    if source == "sample":
        out["ingest.source"] = "sample"
    elif source == "path":
        file = str(conf.get("data_path") or "").strip()
        if not file:
            raise OrchestrationError("data_source is 'path' but data_path is empty: name the CSV, "
                                     "JSONL or Parquet file of your posts")
        out["ingest.source"] = "path"
        out["ingest.path.file"] = file
    elif source != KEEP:
        raise OrchestrationError(f"data_source '{source}': use {KEEP}, sample or path")
    if conf.get("tuning_trials") is not None:
        out["tune.n_trials"] = int(conf["tuning_trials"])
    if conf.get("epochs") is not None:
        out["train.max_epochs"] = int(conf["epochs"])
    if conf.get("skip_tuning"):
        out["tune.enabled"] = False
    return out


def set_params(path: str | Path, overrides: Mapping[str, Any], profile: str | None = None) -> dict[str, Any]:
    """Write `overrides` (dotted keys) into `path`, keeping its comments and layout.

    `profile` (if given and not `default`) becomes the top-level `profile`, and the overrides go
    under `profiles.<profile>` so they win over that profile's own values. The result must load
    with `adfilter.config.load_params`, or the file is left as it was and the error raised.
    """
    from ruamel.yaml import YAML

    from adfilter.config import load_params

    path = Path(path)
    original = path.read_text(encoding="utf-8")
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    doc = yaml.load(original)
    if profile and profile != KEEP:
        doc["profile"] = profile
    active = str(doc.get("profile", "default"))
    written: dict[str, Any] = {}
    for key, value in overrides.items():
        parts = key.split(".")
        node = doc if active == "default" else doc.setdefault("profiles", {}).setdefault(active, {})
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
        written[key if active == "default" else f"profiles.{active}.{key}"] = value
    buf = io.StringIO()
    yaml.dump(doc, buf)
    path.write_text(buf.getvalue(), encoding="utf-8")
    try:
        load_params(path)
    except Exception:
        path.write_text(original, encoding="utf-8")
        raise
    return {"profile": active, "written": written}


def configure(project: str | Path, conf: Mapping[str, Any]) -> dict[str, Any]:
    """Apply the trigger form to `project/params.yaml`; returns what was written (for XCom)."""
    project = Path(project)
    overrides = trigger_overrides(conf)
    profile = conf.get("profile") or KEEP
    if not overrides and profile == KEEP:
        from adfilter.config import selected_profile

        log.info("trigger form leaves params.yaml as it is")
        return {"profile": selected_profile(project / "params.yaml"), "written": {}}
    result = set_params(project / "params.yaml", overrides, profile)
    log.info("params.yaml: profile %s; set %s", result["profile"], result["written"])
    return result


# --------------------------------------------------------------------------- one MLflow run per DAG run


def _tracking(project: Path) -> tuple[Any, Any]:
    import mlflow

    from adfilter.config import load_params

    params = load_params(project / "params.yaml")
    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    return mlflow, params


def start_run(project: str | Path, dag_id: str, dag_run_id: str, conf: Mapping[str, Any]) -> str:
    """The MLflow run of this DAG run: created by the first try, found again by retries."""
    project = Path(project)
    with contextlib.chdir(project):  # a relative sqlite:/// URI and ./mlruns resolve in the project
        mlflow, params = _tracking(project)
        client = mlflow.MlflowClient()
        experiment = mlflow.set_experiment(params.mlflow.experiment)
        found = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{DAG_ID_TAG}` = '{dag_id}' and tags.`{DAG_RUN_TAG}` = '{dag_run_id}'",
            max_results=1,
        )
        if found:
            log.info("resuming MLflow run %s of DAG run %s", found[0].info.run_id, dag_run_id)
            return found[0].info.run_id
        from adfilter.versioning import git_commit

        run = client.create_run(
            experiment.experiment_id, run_name=f"{dag_id} {dag_run_id}",
            tags={DAG_ID_TAG: dag_id, DAG_RUN_TAG: dag_run_id, "profile": params.profile,
                  "trigger_conf": json.dumps(dict(conf), default=str)[:5000],
                  "git_commit": git_commit(project) or "unknown",
                  "mlflow.source.name": f"airflow:{dag_id}"},
        )
    log.info("MLflow run %s for DAG run %s", run.info.run_id, dag_run_id)
    return run.info.run_id


def tag_run(project: str | Path, run_id: str, tags: Mapping[str, Any]) -> None:
    project = Path(project)
    with contextlib.chdir(project):
        mlflow, _ = _tracking(project)
        client = mlflow.MlflowClient()
        for key, value in tags.items():
            client.set_tag(run_id, key, json.dumps(value, default=str)[:5000]
                           if isinstance(value, (dict, list)) else str(value)[:5000])


def end_run(project: str | Path, run_id: str, status: str = "FINISHED",
            tags: Mapping[str, Any] | None = None) -> None:
    project = Path(project)
    if tags:
        tag_run(project, run_id, tags)
    with contextlib.chdir(project):
        mlflow, _ = _tracking(project)
        mlflow.MlflowClient().set_terminated(run_id, status=status)


def read_report(project: str | Path, name: str) -> dict[str, Any]:
    path = Path(project) / "reports" / name
    return json.loads(path.read_text()) if path.is_file() else {}


def data_version(project: str | Path) -> str | None:
    from adfilter.versioning import data_version as version

    try:
        return version(Path(project) / "data/raw")
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------- register / promote


def register_stage(project: str | Path, mlflow_run_id: str, single_item: bool = False) -> dict[str, Any]:
    """`dvc repro register` without the gate (the DAG's `promote` task runs it): the version."""
    result = repro("register", project, mlflow_run_id, single_item=single_item,
                   extra_env={"ADFILTER_PROMOTE": "0"})
    report = read_report(project, "register.json")
    summary = {**result, **{k: report.get(k) for k in ("model", "version", "run_id", "champion", "challenger")},
               "pushed": push(project)}
    if report.get("run_id") and report["run_id"] != mlflow_run_id:
        # DVC found nothing changed: the version registered earlier is this run's result too.
        tag_run(project, mlflow_run_id, {"registered_version": report.get("version"),
                                         "registered_by_run": report.get("run_id")})
    return summary


def promote(project: str | Path, mlflow_run_id: str | None, version: str | None = None,
            enabled: bool = True) -> dict[str, Any]:
    """The promotion gate for `version` (default: the challenger); small metadata for XCom."""
    project = Path(project)
    if not enabled:
        log.info("promotion switched off in the trigger form; the challenger stays a challenger")
        if mlflow_run_id:
            end_run(project, mlflow_run_id, tags={"gate.decision": "not requested"})
        return {"decision": "not requested", "promoted": False}
    with contextlib.chdir(project):
        from adfilter.config import load_params
        from tasks import register as reg

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        report = reg.promote(load_params("params.yaml"), version)
    print(reg.format_decision(report))
    summary = {k: report.get(k) for k in ("model", "version", "decision", "promoted", "reasons",
                                          "compared_with", "champion_before", "eval_set_version")}
    if mlflow_run_id:
        end_run(project, mlflow_run_id, tags={"gate.decision": report["decision"],
                                              "gate.version": report["version"],
                                              "gate.reasons": "; ".join(report.get("reasons", []))})
    return summary


# --------------------------------------------------------------------------- drift


DRIFT_REPORT: Final = "reports/drift.json"
DRIFT_THRESHOLD: Final = 0.15


def run_drift(project: str | Path, measure: Any | None = None) -> dict[str, Any]:
    """Run the monitoring job `measure` (`tasks.drift.drift`) in `project`, which writes
    `reports/drift.json`; then that report, as `read_drift_report` gives it. Without a drift
    step the report on disk is used as it stands."""
    project = Path(project)
    if measure is None:
        log.warning("no drift step given; reading %s as it stands", project / DRIFT_REPORT)
        return {"ran": False, **read_drift_report(project)}
    started = time.perf_counter()
    with contextlib.chdir(project):
        from adfilter.config import load_params

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        result = measure(load_params("params.yaml"), report_path=Path(DRIFT_REPORT), progress=False)
    report = read_drift_report(project)
    return {"ran": True, "seconds": round(time.perf_counter() - started, 1),
            "reason": str(result.get("reason", ""))[:500], **report}


def read_drift_report(project: str | Path) -> dict[str, Any]:
    """`reports/drift.json` ({"shift", "threshold", "retrain", ...}) as the drift DAG needs it."""
    path = Path(project) / DRIFT_REPORT
    if not path.is_file():
        log.warning("%s not found: no drift measured yet, so no retraining is triggered", path)
        return {"shift": None, "threshold": DRIFT_THRESHOLD, "retrain": False, "window": None,
                "reason": f"{DRIFT_REPORT} not found"}
    report = json.loads(path.read_text())
    shift = report.get("shift")
    threshold = float(report.get("threshold", DRIFT_THRESHOLD))
    retrain = report.get("retrain")
    if retrain is None:
        retrain = shift is not None and float(shift) > threshold
    window = report.get("window")
    if isinstance(window, dict):
        window = f"{window.get('start')}..{window.get('end')}"
    out = {"shift": None if shift is None else float(shift), "threshold": threshold,
           "retrain": bool(retrain), "window": None if window is None else str(window)}
    log.info("drift: shift %s (threshold %s) -> %s", out["shift"], threshold,
             "retrain" if out["retrain"] else "no retraining")
    return out
