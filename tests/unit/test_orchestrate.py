"""What the DAG tasks share: trigger form -> params.yaml, and the drift report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from adfilter.config import ParamsError, load_params
from tasks.orchestrate import (
    OrchestrationError,
    configure,
    read_drift_report,
    set_params,
    trigger_overrides,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    return tmp_path


def test_trigger_overrides_map_form_fields_to_params_keys() -> None:
    assert trigger_overrides({"data_source": "params.yaml", "epochs": None, "tuning_trials": None,
                              "skip_tuning": False}) == {}
    assert trigger_overrides({"data_source": "path", "data_path": "posts.csv", "epochs": 3,
                              "tuning_trials": 0, "skip_tuning": True}) == {
        "ingest.source": "path", "ingest.path.file": "posts.csv", "train.max_epochs": 3,
        "tune.n_trials": 0, "tune.enabled": False}
    with pytest.raises(OrchestrationError, match="data_path is empty"):
        trigger_overrides({"data_source": "path", "data_path": " "})


def test_empty_form_leaves_params_yaml_byte_for_byte(project: Path) -> None:
    before = (project / "params.yaml").read_bytes()
    out = configure(project, {"data_source": "params.yaml", "profile": "params.yaml", "epochs": None})
    assert out["written"] == {}
    assert (project / "params.yaml").read_bytes() == before


def test_overrides_go_into_the_selected_profile_and_keep_comments(project: Path) -> None:
    text_before = (project / "params.yaml").read_text()
    out = configure(project, {"profile": "ci", "epochs": 1, "skip_tuning": True})
    assert out == {"profile": "ci", "written": {"profiles.ci.train.max_epochs": 1,
                                                "profiles.ci.tune.enabled": False}}
    params = load_params(project / "params.yaml")
    assert params.profile == "ci" and params.train.max_epochs == 1 and params.tune.enabled is False
    assert params.model.feature_dim == load_params(ROOT / "params.yaml", profile="ci").model.feature_dim
    text = (project / "params.yaml").read_text()
    comments = [line for line in text_before.splitlines() if line.strip().startswith("#")]
    assert all(c in text for c in comments)
    # the default profile (top level) is untouched
    assert load_params(project / "params.yaml", profile="default").train.max_epochs == \
        load_params(ROOT / "params.yaml", profile="default").train.max_epochs


def test_a_value_params_yaml_refuses_leaves_the_file_as_it_was(project: Path) -> None:
    before = (project / "params.yaml").read_text()
    with pytest.raises(ParamsError, match="train.max_epochs"):
        set_params(project / "params.yaml", {"train.max_epochs": "many"})
    assert (project / "params.yaml").read_text() == before


def test_drift_report(tmp_path: Path) -> None:
    missing = read_drift_report(tmp_path)
    assert missing["retrain"] is False and missing["shift"] is None
    (tmp_path / "reports").mkdir()
    report = tmp_path / "reports/drift.json"
    report.write_text(json.dumps({"shift": 0.21, "threshold": 0.15, "retrain": True,
                                  "window": {"start": "2026-12-01", "end": "2026-12-02"}}))
    assert read_drift_report(tmp_path) == {"shift": 0.21, "threshold": 0.15, "retrain": True,
                                           "window": "2026-12-01..2026-12-02"}
    report.write_text(json.dumps({"shift": 0.1, "threshold": 0.15}))
    assert read_drift_report(tmp_path)["retrain"] is False
    report.write_text(json.dumps({"shift": 0.2}))
    assert read_drift_report(tmp_path)["retrain"] is True
