"""Stage `tune`: an Optuna TPE study over learning rate, dropout and feature dimension.

Each trial fits the multimodal net for `tune.epochs_per_trial` epochs on a stratified subset
of the train split and reports the validation metric `tune.metric` after every epoch; Optuna's
MedianPruner stops trials that fall behind (through `optuna_integration`'s Lightning callback).
The best trial's `lr`, `dropout` and `feature_dim` go to `reports/best_params.json`, which
`train` reads. Plots of the optimisation history and the parameter importances go to
`reports/tune/`. Every trial is a nested MLflow run under one parent run per worker.

Workers share a study through one RDB storage (`tune.storage`): start more with
`python -m tasks.tune --worker 1`, `--worker 2`, ... next to the DVC stage (worker 0); each
seeds its sampler from `seed`, its index and the trials already in the study, so workers and
reruns do not propose the same points again. SQLite serves a few local workers; use
PostgreSQL for many or for several machines. The study name is `tune.study_name` plus a
fingerprint of the features, of every parameter that changes a trial's outcome and of the
code a trial runs (`TRIAL_CODE`), so trials on other data, another model or other training code
never mix into one study, and workers started from the same checkout, `params.yaml` and
features find each other. `tune.timeout` bounds each worker's search,
including a trial that is still running when it runs out (that trial counts as pruned).

`tune.enabled: false` (or `n_trials: 0`) skips the search: `best_params.json` then holds the
values in `params.yaml`, and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import sqlite3
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from adfilter.config import Params, TuneSpaceParams, load_params, to_dict
from adfilter.versioning import content_hash

log = logging.getLogger(__name__)

TUNED_KEYS = ("lr", "dropout", "feature_dim")
FEATURE_FILES = ("train.npz", "val.npz")
# Keys that change how long a worker searches or where it stores trials, not what a trial gives.
_NOT_IN_FINGERPRINT = ("enabled", "n_trials", "timeout", "storage", "study_name", "sqlite_timeout")
# The code a trial runs (the tune stage's own deps in dvc.yaml): a trial fitted by other code
# is a trial of another model, and its value says nothing about this one's.
TRIAL_CODE = ("tasks/tune.py", "tasks/train.py", "models/net.py", "models/registry.py",
              "models/lit.py", "models/data.py", "models/calibration.py")
PROJECT_ROOT = Path(__file__).resolve().parents[1]

T = TypeVar("T")
# (trial, MLflow run id of the trial, deadline or None) -> the trial's value
Objective = Callable[[Any, str, "float | None"], float]


class TuneError(RuntimeError):
    """A study that cannot run: missing features, a metric the model does not log."""


# --------------------------------------------------------------------------- study


def study_name_for(params: Params, features_dir: Path) -> str:
    """`tune.study_name` + a fingerprint of the features and the params a trial depends on."""
    missing = [f for f in FEATURE_FILES if not (features_dir / f).is_file()]
    if missing:
        raise TuneError(
            f"{features_dir}: {', '.join(missing)} not found; run the featurize stage first "
            "(dvc repro featurize)"
        )
    resolved = to_dict(params)
    tune = {k: v for k, v in resolved["tune"].items() if k not in _NOT_IN_FINGERPRINT}
    basis = {
        "seed": resolved["seed"],
        "tune": tune,
        "model": resolved.get("model"),
        "train": resolved.get("train"),
        "features": content_hash([features_dir / f for f in FEATURE_FILES], features_dir),
        "code": content_hash([PROJECT_ROOT / f for f in TRIAL_CODE], PROJECT_ROOT),
    }
    digest = hashlib.sha256(json.dumps(basis, sort_keys=True, default=str).encode()).hexdigest()
    return f"{params.tune.study_name}-{digest[:10]}"


def _retry(what: str, fn: Callable[[], T], attempts: int = 5) -> T:
    import sqlalchemy.exc

    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError) as exc:
            # Two workers creating the same fresh SQLite schema or study at once: the loser
            # sees "table already exists" or a unique-key clash; the winner's work is there now.
            if attempt == attempts:
                raise
            log.warning("%s failed (%s); retrying (%d/%d)", what, exc.orig, attempt, attempts)
            time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")


def _sqlite_file(url: str) -> Path | None:
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # not an SQLAlchemy URL; the library that opens it reports that
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


@contextlib.contextmanager
def sqlite_init_lock(url: str) -> Iterator[None]:
    """Serialise first-time schema creation of one SQLite file across worker processes.

    Optuna and MLflow each create (MLflow: migrate) their schema on first connection; two
    workers doing it at once on a fresh file collide. Other databases pass straight through.
    """
    path = _sqlite_file(url)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    # The lock file lives outside the checkout so that it never shows up in git or DVC.
    with open(Path(tempfile.gettempdir()) / f"adfilter-sqlite-{key}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def open_storage(url: str, sqlite_timeout: float) -> Any:
    """An Optuna RDB storage; SQLite gets WAL and a lock timeout so a few workers can share it."""
    import optuna

    engine_kwargs: dict[str, Any] = {}
    path = _sqlite_file(url)
    with sqlite_init_lock(url):
        if path is not None:
            engine_kwargs = {"connect_args": {"timeout": sqlite_timeout}}
            # WAL lets readers and one writer work at once; the mode is stored in the file.
            with contextlib.closing(sqlite3.connect(path, timeout=sqlite_timeout)) as con:
                con.execute("PRAGMA journal_mode=WAL")
        return _retry(
            f"opening Optuna storage {_safe_url(url)}",
            lambda: optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs),
        )


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL is reported by RDBStorage itself
        return url


def sampler_seed(seed: int, worker: int, trials_before: int) -> int:
    """A TPE seed per (seed, worker, trials already in the study).

    Seeded TPE draws its first points from its own random stream, so two workers, or a rerun
    joining a study that has trials, would otherwise propose the very same points again.
    """
    return int(np.random.SeedSequence([seed, worker, trials_before]).generate_state(1)[0])


def create_study(params: Params, study_name: str, worker: int = 0) -> Any:
    """The shared study (created by whichever worker comes first), with a seeded TPE sampler."""
    import optuna

    cfg = params.tune
    storage = open_storage(cfg.storage, cfg.sqlite_timeout)
    study = _retry(
        f"creating or loading study {study_name}",
        lambda: optuna.create_study(
            storage=storage,
            study_name=study_name,
            direction=cfg.direction,
            pruner=optuna.pruners.MedianPruner(
                n_startup_trials=cfg.pruner_startup_trials,
                n_warmup_steps=cfg.pruner_warmup_epochs,
            ),
            load_if_exists=True,
        ),
    )
    before = len(study.get_trials(deepcopy=False))
    study.sampler = optuna.samplers.TPESampler(seed=sampler_seed(params.seed, worker, before))
    return study


def suggest(trial: Any, space: TuneSpaceParams) -> dict[str, Any]:
    """One point of the search space, as `fit_model` overrides."""
    lr_low, lr_high = space.lr
    drop_low, drop_high = space.dropout
    return {
        "lr": trial.suggest_float("lr", lr_low, lr_high, log=True),
        "dropout": trial.suggest_float("dropout", drop_low, drop_high),
        "feature_dim": trial.suggest_categorical("feature_dim", list(space.feature_dim)),
    }


def check_space(space: TuneSpaceParams, num_heads: int = 1) -> None:
    """Fail at start, naming the key, on a space the sampler or the net cannot use."""
    for key in ("lr", "dropout"):
        bounds = getattr(space, key)
        if len(bounds) != 2 or not bounds[0] < bounds[1]:
            raise TuneError(f"params.yaml: 'tune.space.{key}' must be [low, high] with low < high")
    if space.lr[0] <= 0:
        raise TuneError("params.yaml: 'tune.space.lr' is sampled on a log scale; low must be > 0")
    if not space.feature_dim or any(d <= 0 for d in space.feature_dim):
        raise TuneError("params.yaml: 'tune.space.feature_dim' must list positive widths")
    odd = [d for d in space.feature_dim if d % num_heads]
    if odd:
        raise TuneError(
            f"params.yaml: 'tune.space.feature_dim' {odd} are not multiples of model.num_heads "
            f"{num_heads}; the net's attention needs them to be"
        )


def subset_indices(labels: np.ndarray, subset: float, seed: int) -> np.ndarray:
    """Train rows for a trial: a stratified sample (`subset` <= 1 a fraction, > 1 a count)."""
    from sklearn.model_selection import train_test_split

    n = int(labels.size)
    if subset <= 0:
        raise TuneError("params.yaml: 'tune.subset' must be > 0 (a fraction <= 1 or a count)")
    size = n if subset >= n else (round(subset * n) if subset <= 1 else int(subset))
    if size >= n:
        return np.arange(n)
    classes, counts = np.unique(labels, return_counts=True)
    stratify = labels if len(classes) > 1 and counts.min() >= 2 and size >= len(classes) else None
    keep, _ = train_test_split(
        np.arange(n), train_size=size, random_state=seed, stratify=stratify
    )
    return np.sort(keep)


# --------------------------------------------------------------------------- outputs


def _atomic_write_text(path: Path, text: str) -> None:
    # Several workers may finish at once; a reader never sees half a file.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def save_plots(study: Any, plots_dir: Path) -> dict[str, str]:
    """History and importance PNGs; importance is skipped (with the reason) below 2 trials."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    plots_dir.mkdir(parents=True, exist_ok=True)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    written: dict[str, str] = {}
    plots = {"optimization_history": ovm.plot_optimization_history}
    if len(complete) >= 2:
        plots["param_importances"] = ovm.plot_param_importances
    else:
        reason = f"parameter importance needs >= 2 completed trials, the study has {len(complete)}"
        log.info("no importance plot: %s", reason)
        written["param_importances"] = f"skipped: {reason}"
        (plots_dir / "param_importances.png").unlink(missing_ok=True)  # not a stale one
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                ax = plot(study)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.tight_layout()
            path = plots_dir / f"{name}.png"
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".png", dir=plots_dir)
            os.close(fd)
            fig.savefig(tmp, dpi=100)
            os.replace(tmp, path)
            plt.close(fig)
            written[name] = str(path)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            # e.g. every completed trial has the same value: importances are undefined.
            log.warning("plot %s not written: %s", name, exc)
            written[name] = f"skipped: {exc}"
    return written


def _trial_counts(study: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    return counts


def untuned_values(params: Params) -> dict[str, Any]:
    """`lr`, `dropout` and `feature_dim` as `params.yaml` sets them (what train uses untuned)."""
    from tasks.train import untuned_values as from_params

    return from_params(params)


# --------------------------------------------------------------------------- the stage


def tune(
    params: Params,
    features_dir: Path = Path("data/features"),
    featurizer_dir: Path = Path("artifacts/featurizer"),
    out_path: Path = Path("reports/best_params.json"),
    plots_dir: Path = Path("reports/tune"),
    worker: int = 0,
) -> dict[str, Any]:
    """Run this worker's trials of the shared study; write and return the best params."""
    cfg = params.tune
    started = time.perf_counter()
    if not cfg.enabled or cfg.n_trials == 0:
        why = "tune.enabled is false" if not cfg.enabled else "tune.n_trials is 0"
        result = {
            **untuned_values(params),
            "source": "params",
            "reason": f"{why}: train uses the values in params.yaml",
            "profile": params.profile,
        }
        _atomic_write_text(out_path, json.dumps(result, indent=2) + "\n")
        _atomic_write_text(plots_dir / "skipped.txt", f"no tuning plots: {why}\n")
        log.info("tuning skipped (%s); %s holds the params.yaml values %s", why, out_path,
                 {k: result[k] for k in TUNED_KEYS})
        return result

    check_space(cfg.space, params.model.num_heads)
    study_name = study_name_for(params, features_dir)
    study = create_study(params, study_name, worker)
    before = len(study.trials)
    log.info("study %s on %s: %d trials so far; worker %d runs up to %d (timeout %s)",
             study_name, _safe_url(cfg.storage), before, worker, cfg.n_trials,
             f"{cfg.timeout}s" if cfg.timeout else "none")

    with tempfile.TemporaryDirectory(prefix="adfilter-tune-") as scratch:
        objective = make_objective(params, features_dir, featurizer_dir, Path(scratch))
        _run_study(params, study, study_name, objective, worker)

    result = _summarise(params, study, study_name, worker, before, time.perf_counter() - started)
    result["plots"] = save_plots(study, plots_dir)
    _atomic_write_text(out_path, json.dumps(result, indent=2) + "\n")
    log.info("best params %s (%s = %s, trial %s) written to %s",
             {k: result[k] for k in TUNED_KEYS}, cfg.metric, result.get("best_value"),
             result.get("best_trial"), out_path)
    return result


def _run_study(
    params: Params, study: Any, study_name: str, objective: Objective, worker: int
) -> None:
    import mlflow
    import optuna

    cfg = params.tune
    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    with sqlite_init_lock(params.mlflow.tracking_uri):
        mlflow.set_experiment(params.mlflow.experiment)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with mlflow.start_run(run_name=f"tune-{study_name}-w{worker}"):
        mlflow.set_tags({"stage": "tune", "optuna.study": study_name, "optuna.worker": worker,
                         "profile": params.profile})
        mlflow.log_params({f"tune.{k}": v for k, v in _flat_tune(params).items()})
        study.set_user_attr("mlflow_experiment", params.mlflow.experiment)
        # The same clock as Optuna's `timeout`, which starts with `optimize`.
        deadline = time.perf_counter() + cfg.timeout if cfg.timeout else None
        study.optimize(
            lambda trial: _traced_trial(trial, objective, worker, deadline),
            n_trials=cfg.n_trials,
            timeout=cfg.timeout or None,
            gc_after_trial=True,
            show_progress_bar=True,
        )
        counts = _trial_counts(study)
        mlflow.log_metrics({f"trials_{k}": float(v) for k, v in counts.items()})
        try:
            mlflow.log_metric("best_value", float(study.best_value))
        except ValueError:
            pass


def _flat_tune(params: Params) -> dict[str, Any]:
    from adfilter.config import flatten

    return flatten(to_dict(params.tune))


def _traced_trial(
    trial: Any, objective: Objective, worker: int, deadline: float | None
) -> float:
    """One trial inside its own nested MLflow run, whatever its end: complete, pruned, failed."""
    import mlflow
    import optuna

    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}:w{worker}")
    # Ended by hand, not with `with`: leaving a `with` block after the child has ended would
    # end the parent run instead.
    run = mlflow.start_run(run_name=f"trial-{trial.number}", nested=True,
                           tags={"optuna.trial": str(trial.number), "optuna.worker": str(worker)})
    trial.set_user_attr("mlflow_run_id", run.info.run_id)
    status, t0 = "FAILED", time.perf_counter()
    try:
        value = objective(trial, run.info.run_id, deadline)
        mlflow.log_params(trial.params)
        mlflow.log_metrics({"objective": value, "seconds": time.perf_counter() - t0})
        mlflow.set_tag("optuna.state", "COMPLETE")
        status = "FINISHED"
        log.info("trial %d: %.4f with %s (%.1fs)", trial.number, value, trial.params,
                 time.perf_counter() - t0)
        return value
    except optuna.TrialPruned:
        mlflow.log_params(trial.params)
        mlflow.log_metric("seconds", time.perf_counter() - t0)
        mlflow.set_tag("optuna.state", "PRUNED")
        status = "KILLED"
        log.info("trial %d pruned after %.1fs (%s)", trial.number, time.perf_counter() - t0,
                 trial.params)
        raise
    finally:
        mlflow.end_run(status)


def _deadline_callback(trial: Any, deadline: float, timeout: int) -> Any:
    """Ends the trial as pruned at the first batch (train or validation) after `deadline`.

    Lightning's `Timer` stops gracefully, which still runs the epoch's whole validation; a
    trial that cannot finish in the budget has nothing to compare, so it stops at once, the
    way Optuna's pruning callback stops a trial: by raising `TrialPruned`.
    """
    import optuna
    from lightning.pytorch.callbacks import Callback

    class Deadline(Callback):
        def _check(self, trainer: Any) -> None:
            if time.perf_counter() > deadline:
                note = f"tune.timeout ({timeout}s) reached in epoch {trainer.current_epoch}"
                trial.set_user_attr("stopped", note)
                raise optuna.TrialPruned(note)

        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            self._check(trainer)

        def on_validation_batch_start(self, trainer: Any, *args: Any) -> None:
            self._check(trainer)

    return Deadline()


def make_objective(
    params: Params, features_dir: Path, featurizer_dir: Path, scratch: Path
) -> Objective:
    """`objective(trial, mlflow_run_id, deadline)`: fit on the trial subset, return the last
    `tune.metric`.

    `deadline` (a `time.perf_counter()` value, or None) stops a running trial when the
    worker's `tune.timeout` is spent: Optuna's own timeout is only checked between trials, and
    one wide trial on CPU can outlast the whole budget. Such a trial counts as pruned.
    """
    import lightning as L
    from lightning.pytorch.loggers import MLFlowLogger
    from optuna_integration import PyTorchLightningPruningCallback

    from models.data import load_npz
    from tasks.train import datamodule_from_params, fit_model, read_feature_dims

    cfg = params.tune
    # One process per trial: DDP would relaunch this module; parallel trials come from more
    # workers (one per device), not from one trial spread over devices.
    single = {"train.devices": 1, "train.strategy": "auto", "train.num_nodes": 1}
    labels = load_npz(features_dir / "train.npz")["label"]
    rows = subset_indices(labels, cfg.subset, params.seed)
    datamodule = datamodule_from_params(params, features_dir, train_subset=rows)
    read_feature_dims(featurizer_dir, datamodule.input_sizes())
    log.info("trials train on %d of %d train posts (%d ads), %d epochs each",
             rows.size, labels.size, int(labels[rows].sum()), cfg.epochs_per_trial)

    def objective(trial: Any, run_id: str, deadline: float | None) -> float:
        overrides = suggest(trial, cfg.space)
        L.seed_everything(params.seed + trial.number, workers=True, verbose=False)
        logger = MLFlowLogger(experiment_name=params.mlflow.experiment,
                              tracking_uri=params.mlflow.tracking_uri, run_id=run_id,
                              log_model=False)
        callbacks: list[Any] = [PyTorchLightningPruningCallback(trial, monitor=cfg.metric)]
        if deadline is not None:
            callbacks.append(_deadline_callback(trial, deadline, cfg.timeout))
        _, trainer = fit_model(
            params, datamodule, overrides={**single, **overrides}, callbacks=callbacks,
            max_epochs=cfg.epochs_per_trial, logger=logger, enable_progress_bar=False,
            default_root_dir=scratch,
        )
        value = trainer.callback_metrics.get(cfg.metric)
        if value is None:
            raise TuneError(
                f"tune.metric '{cfg.metric}' was not logged by the model; logged metrics: "
                f"{', '.join(sorted(trainer.callback_metrics))}; set tune.metric in params.yaml"
            )
        return float(value)

    return objective


def _summarise(
    params: Params, study: Any, study_name: str, worker: int, before: int, seconds: float
) -> dict[str, Any]:
    cfg = params.tune
    counts = _trial_counts(study)
    base = {
        "study_name": study_name,
        "storage": _safe_url(cfg.storage),
        "metric": cfg.metric,
        "direction": cfg.direction,
        "trials": counts,
        "worker": {"index": worker, "new_trials": len(study.trials) - before,
                   "seconds": round(seconds, 1)},
        "profile": params.profile,
    }
    try:
        best = study.best_trial
    except ValueError:
        log.warning("study %s has no completed trial (%s); best_params.json falls back to the "
                    "params.yaml values: raise tune.timeout or tune.n_trials", study_name, counts)
        return {**untuned_values(params), "source": "params",
                "reason": "no completed trial", **base}
    return {
        **{k: best.params[k] for k in TUNED_KEYS},
        "source": "optuna",
        "best_value": best.value,
        "best_trial": best.number,
        **base,
    }


def main(argv: list[str] | None = None) -> None:
    from adfilter.logs import setup_logging

    parser = argparse.ArgumentParser(prog="python -m tasks.tune", description=__doc__.split("\n")[0])
    parser.add_argument("--worker", type=int, default=0,
                        help="index of this worker (extra workers share the study; default 0)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    setup_logging()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    tune(load_params(args.params), worker=args.worker)


if __name__ == "__main__":
    main()
