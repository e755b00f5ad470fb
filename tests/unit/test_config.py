from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from adfilter.config import ParamsError, flatten, load_params, params_from_dict, to_dict


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def raw(params_yaml_text: str) -> dict:
    return yaml.safe_load(params_yaml_text)


def test_repository_params_load_for_every_profile(repo_root: Path, raw: dict) -> None:
    for profile in ["default", *raw["profiles"]]:
        params = load_params(repo_root / "params.yaml", profile=profile)
        assert params.profile == profile
        assert dataclasses.is_dataclass(params)


def test_params_are_frozen(repo_root: Path) -> None:
    params = load_params(repo_root / "params.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.seed = 3  # type: ignore[misc]


def test_unknown_key_is_named_with_the_file(tmp_path: Path, raw: dict) -> None:
    raw["split"]["trian"] = 0.7
    path = _write(tmp_path, raw)
    with pytest.raises(ParamsError, match=r"unknown key 'split\.trian'") as exc:
        load_params(path)
    assert str(path) in str(exc.value)


def test_wrong_type_is_named(tmp_path: Path, raw: dict) -> None:
    raw["validate"]["max_text_chars"] = "lots"
    with pytest.raises(ParamsError, match=r"'validate\.max_text_chars' must be an integer, got 'lots'"):
        load_params(_write(tmp_path, raw))


def test_bool_is_not_an_integer(raw: dict) -> None:
    raw["seed"] = True
    with pytest.raises(ParamsError, match="'seed' must be an integer"):
        params_from_dict(raw)


def test_integer_is_accepted_as_float(raw: dict) -> None:
    raw["split"]["train"] = 1
    assert params_from_dict(raw).split.train == 1.0


def test_literal_values_are_checked(raw: dict) -> None:
    raw["ingest"]["source"] = "s3"
    with pytest.raises(ParamsError, match=r"'ingest\.source' is 's3'; allowed values: 'sample', 'path'"):
        params_from_dict(raw)


def test_missing_key_is_named(raw: dict) -> None:
    del raw["split"]["val"]
    with pytest.raises(ParamsError, match=r"missing key 'split\.val'"):
        params_from_dict(raw)


def test_list_items_are_checked(raw: dict) -> None:
    raw["featurize"]["image"]["hsv_bins"] = [8, "four", 4]
    with pytest.raises(ParamsError, match=r"featurize\.image\.hsv_bins\[1\]"):
        params_from_dict(raw)


def test_profile_overrides_apply_and_keep_the_rest(raw: dict) -> None:
    base = params_from_dict(raw, profile="default")
    ci = params_from_dict(raw, profile="ci")
    assert ci.ingest.sample.n_text_only == raw["profiles"]["ci"]["ingest"]["sample"]["n_text_only"]
    assert ci.ingest.sample.n_text_only < base.ingest.sample.n_text_only
    assert ci.split == base.split


def test_unknown_profile_lists_the_known_ones(raw: dict) -> None:
    with pytest.raises(ParamsError, match="unknown profile 'tiny'; known profiles: default, ci, gpu"):
        params_from_dict(raw, profile="tiny")


def test_profile_may_not_invent_keys(raw: dict) -> None:
    raw["profiles"]["ci"]["split"] = {"shuffle": True}
    with pytest.raises(ParamsError, match=r"unknown key 'profiles\.ci\.split\.shuffle'"):
        params_from_dict(raw, profile="ci")


def test_profile_key_in_file_selects_the_profile(tmp_path: Path, raw: dict) -> None:
    raw["profile"] = "ci"
    assert load_params(_write(tmp_path, raw)).profile == "ci"


def test_invalid_yaml_and_missing_file_say_so(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: [1, 2\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_flatten_for_mlflow(repo_root: Path) -> None:
    flat = flatten(to_dict(load_params(repo_root / "params.yaml")))
    assert flat["split.train"] == 0.7
    assert flat["featurize.text.svd_dim"] > 0
    assert all(not isinstance(v, dict) for v in flat.values())


def test_cli_profile_sets_the_key_and_rejects_unknown(tmp_path: Path, params_yaml_text: str) -> None:
    from adfilter.cli import main

    path = tmp_path / "params.yaml"
    path.write_text(params_yaml_text)
    assert main(["--params", str(path), "profile", "ci"]) == 0
    assert load_params(path).profile == "ci"
    assert "# adfilter: the only configuration" in path.read_text()  # comments survive
    assert main(["--params", str(path), "profile", "huge"]) == 2
    assert load_params(path).profile == "ci"
