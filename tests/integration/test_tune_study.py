"""The tune stage's parts that need no training: skipping, study names, subsets, plots."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from adfilter.config import Params, params_from_dict
from tasks.tune import (
    TuneError,
    check_space,
    create_study,
    save_plots,
    study_name_for,
    subset_indices,
    tune,
)
from tests.model_fixtures import write_features

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _params(tmp: Path, **tune_overrides) -> Params:
    """The ci profile with `tune_overrides` applied on top of it."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["tune"]["storage"] = f"sqlite:///{tmp / 'optuna.db'}"
    params = params_from_dict(raw, profile="ci")
    return dataclasses.replace(params, tune=dataclasses.replace(params.tune, **tune_overrides))


def test_disabled_tuning_writes_the_params_values_that_train_reads(tmp_path: Path) -> None:
    from tasks.train import read_best_params

    params = _params(tmp_path, enabled=False)
    out = tmp_path / "reports/best_params.json"
    result = tune(params, tmp_path / "no-features", tmp_path / "no-featurizer", out,
                  tmp_path / "reports/tune")
    written = json.loads(out.read_text())
    assert written == result
    assert written["source"] == "params" and "tune.enabled is false" in written["reason"]
    assert read_best_params(out) == {"lr": params.train.lr, "dropout": params.model.dropout,
                                     "feature_dim": params.model.feature_dim}
    assert "tune.enabled is false" in (tmp_path / "reports/tune/skipped.txt").read_text()

    zero = _params(tmp_path, n_trials=0)
    assert "n_trials is 0" in tune(zero, tmp_path, tmp_path, out, tmp_path / "t")["reason"]


def test_study_name_follows_data_and_model_not_worker_settings(tmp_path: Path) -> None:
    features, _ = write_features(tmp_path, sizes={"train": 12, "val": 6, "test": 6})
    params = _params(tmp_path)
    name = study_name_for(params, features)
    assert name.startswith("ad-filter-")
    more = _params(tmp_path, n_trials=50, timeout=9, storage="postgresql://h/db")
    assert study_name_for(more, features) == name
    wider = dataclasses.replace(params, model=dataclasses.replace(params.model, num_heads=4))
    assert study_name_for(wider, features) != name
    write_features(tmp_path / "other", sizes={"train": 13, "val": 6, "test": 6})
    assert study_name_for(params, tmp_path / "other/data/features") != name
    with pytest.raises(TuneError, match="train.npz, val.npz not found.*featurize"):
        study_name_for(params, tmp_path / "empty")


def test_study_name_follows_the_code_a_trial_runs(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.tune as tune_module

    features, _ = write_features(tmp_path, sizes={"train": 12, "val": 6, "test": 6})
    params = _params(tmp_path)
    checkout = tmp_path / "checkout"
    for rel in tune_module.TRIAL_CODE:
        (checkout / rel).parent.mkdir(parents=True, exist_ok=True)
        (checkout / rel).write_text(f"# {rel}\n")
    monkeypatch.setattr(tune_module, "PROJECT_ROOT", checkout)
    name = study_name_for(params, features)
    assert study_name_for(params, features) == name
    (checkout / "models/net.py").write_text("# another net\n")
    assert study_name_for(params, features) != name


def test_subset_is_stratified_and_takes_fraction_or_count() -> None:
    labels = np.array([1] * 20 + [0] * 80)
    rows = subset_indices(labels, 0.25, seed=0)
    assert rows.size == 25 and labels[rows].sum() == 5
    assert np.all(np.diff(rows) > 0)
    rows = subset_indices(labels, 40, seed=0)
    assert rows.size == 40 and labels[rows].sum() == 8
    assert subset_indices(labels, 1.0, seed=0).size == 100
    assert subset_indices(labels, 500, seed=0).size == 100
    np.testing.assert_array_equal(subset_indices(labels, 0.3, 1), subset_indices(labels, 0.3, 1))
    with pytest.raises(TuneError, match="tune.subset"):
        subset_indices(labels, 0, seed=0)


def test_space_is_checked() -> None:
    from adfilter.config import TuneSpaceParams

    check_space(TuneSpaceParams([1e-5, 1e-3], [0.1, 0.5], [128, 256]))
    with pytest.raises(TuneError, match="tune.space.lr"):
        check_space(TuneSpaceParams([1e-3, 1e-5], [0.1, 0.5], [128]))
    with pytest.raises(TuneError, match="log scale"):
        check_space(TuneSpaceParams([0.0, 1e-3], [0.1, 0.5], [128]))
    with pytest.raises(TuneError, match="feature_dim"):
        check_space(TuneSpaceParams([1e-5, 1e-3], [0.1, 0.5], []))
    with pytest.raises(TuneError, match=r"\[100\] are not multiples of model.num_heads 8"):
        check_space(TuneSpaceParams([1e-5, 1e-3], [0.1, 0.5], [128, 100]), num_heads=8)


def test_workers_load_one_study_with_their_own_sampler_seed(tmp_path: Path) -> None:
    params = _params(tmp_path)
    first = create_study(params, "shared", worker=0)
    second = create_study(params, "shared", worker=1)
    assert first._study_id == second._study_id
    assert isinstance(first.pruner, optuna.pruners.MedianPruner)
    draws = []
    for study in (first, second):
        trial = study.ask()
        draws.append(trial.suggest_float("lr", 1e-5, 1e-3, log=True))
        study.tell(trial, 0.5)
    assert draws[0] != draws[1]
    assert len(optuna.load_study(study_name="shared", storage=params.tune.storage).trials) == 2
    # Worker 0 again (a rerun joining the study) does not replay its first point.
    rerun = create_study(params, "shared", worker=0)
    assert rerun.ask().suggest_float("lr", 1e-5, 1e-3, log=True) not in draws
    # ... while a fresh study with the same seed and worker does: the seed is deterministic.
    fresh = create_study(params, "fresh", worker=0)
    assert fresh.ask().suggest_float("lr", 1e-5, 1e-3, log=True) == draws[0]


def test_plots_skip_importance_below_two_completed_trials(tmp_path: Path) -> None:
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    study.optimize(lambda t: t.suggest_float("lr", 1e-5, 1e-3, log=True), n_trials=1)
    written = save_plots(study, tmp_path)
    assert (tmp_path / "optimization_history.png").stat().st_size > 0
    assert written["param_importances"].startswith("skipped: parameter importance needs >= 2")
    assert not (tmp_path / "param_importances.png").exists()

    study.optimize(lambda t: t.suggest_float("lr", 1e-5, 1e-3, log=True)
                   * t.suggest_float("dropout", 0.1, 0.5), n_trials=3)
    written = save_plots(study, tmp_path)
    assert (tmp_path / "param_importances.png").stat().st_size > 0
    assert written["param_importances"] == str(tmp_path / "param_importances.png")


@pytest.mark.parametrize("profile", ["default", "ci", "gpu"])
def test_every_profiles_space_fits_its_net(profile: str) -> None:
    from adfilter.config import load_params

    params = load_params(ROOT / "params.yaml", profile=profile)
    check_space(params.tune.space, params.model.num_heads)
    assert params.tune.epochs_per_trial >= 1


def test_a_trial_running_past_the_timeout_is_stopped_and_counted_as_pruned(tmp_path: Path) -> None:
    """Optuna checks `timeout` only between trials; the stage also stops a running trial."""
    features, featurizer = write_features(tmp_path, sizes={"train": 64, "val": 16, "test": 8})
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["tune"]["storage"] = f"sqlite:///{tmp_path / 'optuna.db'}"
    raw["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw["profiles"]["ci"]["train"].update(batch_size=4, num_threads=1)
    params = params_from_dict(raw, profile="ci")
    params = dataclasses.replace(params, tune=dataclasses.replace(
        params.tune, n_trials=3, timeout=1, epochs_per_trial=50, subset=1.0))
    out = tmp_path / "best_params.json"
    result = tune(params, features, featurizer, out, tmp_path / "plots")

    study = optuna.load_study(study_name=result["study_name"], storage=params.tune.storage)
    assert len(study.trials) == 1  # no new trial starts once the time is spent
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.user_attrs["stopped"].startswith("tune.timeout (1s) reached in epoch ")
    # Without a completed trial, train gets the params.yaml values, and the file says why.
    assert result["source"] == "params" and result["reason"] == "no completed trial"
    assert result["lr"] == params.train.lr and result["trials"] == {"pruned": 1}
    assert json.loads(out.read_text())["feature_dim"] == params.model.feature_dim
