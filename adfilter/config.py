"""Typed, frozen parameters loaded from `params.yaml`, the project's only configuration.

`params.yaml` holds the default profile at the top level and named overrides under
`profiles:`; the top-level `profile` key (or the `profile=` argument) picks one. Every key
must be known and of the declared type: a typo or a wrong type fails at start, naming the
key and the file, instead of silently falling back to a default hidden in code.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ParamsError(ValueError):
    """A `params.yaml` that cannot be turned into `Params`."""


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class MlflowParams:
    tracking_uri: str
    experiment: str
    registered_model: str


@dataclass(frozen=True)
class SampleParams:
    """The embedded multimodal sample (see `adfilter.sample`)."""

    n_text_only: int
    n_text_image: int
    n_image_only: int
    hidden_image_ad_fraction: float
    image_ad_fraction: float
    hard_negative_fraction: float
    image_size: int
    max_texts: int


@dataclass(frozen=True)
class PathSourceParams:
    """A user's own posts: one CSV, JSONL or Parquet file plus images relative to it."""

    file: str
    format: Literal["auto", "csv", "jsonl", "parquet"]
    columns: dict[str, str]


@dataclass(frozen=True)
class IngestParams:
    source: Literal["sample", "path"]
    sample: SampleParams
    path: PathSourceParams


@dataclass(frozen=True)
class ValidateParams:
    max_text_chars: int
    max_image_bytes: int
    max_image_pixels: int
    min_image_side: int
    allowed_image_formats: list[str]
    max_reject_fraction: float


@dataclass(frozen=True)
class SplitParams:
    train: float
    val: float
    test: float
    phash_max_distance: int


@dataclass(frozen=True)
class TextFeatureParams:
    word_ngram_range: list[int]
    char_ngram_range: list[int]
    max_features_word: int
    max_features_char: int
    svd_dim: int
    embedder: str
    embed_batch_size: int
    max_seq_tokens: int


@dataclass(frozen=True)
class ImageFeatureParams:
    image_size: int
    sift_max_keypoints: int
    sift_vocab_size: int
    sift_kmeans_sample: int
    hsv_bins: list[int]


@dataclass(frozen=True)
class FeaturizeParams:
    text: TextFeatureParams
    image: ImageFeatureParams


@dataclass(frozen=True)
class Params:
    profile: str
    seed: int
    mlflow: MlflowParams
    ingest: IngestParams
    validate: ValidateParams
    split: SplitParams
    featurize: FeaturizeParams


# --------------------------------------------------------------------------- loading


def load_params(path: str | Path = "params.yaml", profile: str | None = None) -> Params:
    """Load `path`, apply the selected profile's overrides and check every key and type."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: parameters file not found (run from the repository root?)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    return params_from_dict(raw, source=str(path), profile=profile)


def params_from_dict(
    raw: Any, source: str = "<dict>", profile: str | None = None
) -> Params:
    """Build `Params` from a parsed `params.yaml` document (see `load_params`)."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    profiles = raw.pop("profiles", {}) or {}
    if not isinstance(profiles, dict):
        raise ParamsError(f"{source}: 'profiles' must be a mapping of profile name to overrides")
    chosen = profile if profile is not None else raw.get("profile", "default")
    if chosen != "default":
        if chosen not in profiles:
            known = ", ".join(["default", *sorted(profiles)])
            raise ParamsError(f"{source}: unknown profile '{chosen}'; known profiles: {known}")
        _merge(raw, profiles[chosen], source, f"profiles.{chosen}")
    raw["profile"] = chosen
    return _build(Params, raw, source, "")


def selected_profile(path: str | Path = "params.yaml") -> str:
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    return str(raw.get("profile", "default"))


def to_dict(params: Any) -> dict[str, Any]:
    """The resolved parameters as plain data, for MLflow, checkpoints and exported models."""
    return dataclasses.asdict(params)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`: the shape `mlflow.log_params` wants."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _merge(base: dict, override: Any, source: str, where: str) -> None:
    if not isinstance(override, dict):
        raise ParamsError(f"{source}: '{where}' must be a mapping of overrides")
    for key, value in override.items():
        if key not in base:
            raise ParamsError(
                f"{source}: unknown key '{where}.{key}': a profile may only override keys "
                f"that exist at the top level"
            )
        if isinstance(value, dict) and isinstance(base[key], dict) and not _is_free_mapping(key):
            _merge(base[key], value, source, f"{where}.{key}")
        else:
            base[key] = value


def _is_free_mapping(key: str) -> bool:
    # Mappings whose keys are data, not schema: a profile replaces them whole.
    return key in {"columns"}


def _build(cls: type, data: Any, source: str, where: str) -> Any:
    label = where or "<top level>"
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: '{label}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ParamsError(
            f"{source}: unknown key '{key}'; known keys under '{label}': {', '.join(sorted(fields))}"
        )
    missing = sorted(fields - set(data))
    if missing:
        key = f"{where}.{missing[0]}" if where else missing[0]
        raise ParamsError(f"{source}: missing key '{key}'")
    values = {}
    for name in fields:
        key = f"{where}.{name}" if where else name
        values[name] = _convert(hints[name], data[name], source, key)
    return cls(**values)


def _convert(tp: Any, value: Any, source: str, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, source, key)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ParamsError(f"{source}: '{key}' is {value!r}; allowed values: {allowed}")
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return _convert(option, value, source, key)
            except ParamsError as exc:
                errors.append(str(exc))
        names = " or ".join(_type_name(a) for a in args)
        raise ParamsError(f"{source}: '{key}' must be {names}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{source}: '{key}' must be a list, got {type(value).__name__}")
        return [_convert(args[0], v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{source}: '{key}' must be a mapping, got {type(value).__name__}")
        return {
            _convert(args[0], k, source, f"{key} (key)"): _convert(args[1], v, source, f"{key}.{k}")
            for k, v in value.items()
        }
    if tp is type(None):
        if value is not None:
            raise ParamsError(f"{source}: '{key}' must be null, got {value!r}")
        return None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{source}: '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{source}: '{key}' must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{source}: '{key}' must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{source}: '{key}' must be a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise ParamsError(f"{source}: '{key}' has an unsupported declared type {tp!r}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))
