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
    spam_text_ad_image_fraction: float  # spam text + image posts whose image advertises too
    image_ad_fraction: float
    hard_negative_fraction: float
    image_size: int
    max_texts: int


@dataclass(frozen=True)
class PathSourceParams:
    """A user's own posts: one CSV, JSONL or Parquet file plus images relative to it.

    `columns` maps our names (text, image, label; optional id, sensitivity, slice) to the
    file's column names; leave text or image out when the file has no such column.
    """

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
    max_group_fraction: float       # a duplicate group larger than this share of posts is warned about


@dataclass(frozen=True)
class TextFeatureParams:
    word_ngram_range: list[int]
    char_ngram_range: list[int]
    max_features_word: int
    max_features_char: int
    svd_dim: int
    margins: list[str]              # supervised n-gram models whose margins join the tfidf block
    margin_folds: int               # train rows get out-of-fold margins from this many folds
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
    net_image_size: int
    qr_max_side: int


@dataclass(frozen=True)
class FeaturizeParams:
    text: TextFeatureParams
    image: ImageFeatureParams


@dataclass(frozen=True)
class TextAttackParams:
    """textattack recipes of the `text_attack` source (see `adfilter.augment.text`)."""

    recipes: dict[str, float]       # recipe name -> weight; names in adfilter.augment.text.RECIPES
    pct_words_to_swap: float
    variants_per_call: int          # variants of one parent per textattack call, at most


@dataclass(frozen=True)
class ObfuscationParams:
    """Spammers' obfuscation families of the `obfuscation` source (training families only)."""

    families: dict[str, float]      # family name -> weight; names in adfilter.augment.text.FAMILIES
    max_families: int               # families stacked on one variant: 1..max_families
    rate: float                     # share of the eligible words a family rewrites
    max_attempts: int               # redraws of a variant that normalises back to its parent


@dataclass(frozen=True)
class ImageAugmentParams:
    """The torchvision.transforms.v2 pipeline (see `adfilter.augment.images`)."""

    transforms: dict[str, float]    # transform name -> probability it is applied (fixed order)
    max_side: int                   # parents are shrunk to this side at most before transforming
    batch_size: int                 # variants featurised per call


@dataclass(frozen=True)
class GanParams:
    """The conditional feature-space GAN of the `gan` source (see `models.gan`)."""

    noise_dim: int
    hidden_dim: int
    epochs: int
    batch_size: int
    lr: float
    moment_weight: float            # weight of the batch moment-matching term in the generator loss
    min_step: float                 # a variant moves at least this far from its parent (RMS, in std units)
    max_step: float                 # ... and each feature at most this far
    step_weight: float              # weight of the min_step hinge in the generator loss
    basis_dim: int                  # dense blocks move along their top principal directions only
    holdout_fraction: float         # train posts kept from the GAN for the quality check
    sensitivity_boost: float        # an ad is drawn as a condition with weight 1 + boost * sensitivity
    max_c2st_auc: float             # no sample is used when a classifier tells fake from real better
    knn_k: int                      # a sample must fall inside some real ad's k-NN ball
    max_rounds: int                 # generation rounds to replace samples that fail the k-NN check


@dataclass(frozen=True)
class HeldoutParams:
    """The `obfuscated_ads_heldout` slice: families never used in training (adfilter.augment.heldout)."""

    text_families: dict[str, float]
    image_families: dict[str, float]
    max_families: int
    variants_per_ad: int


@dataclass(frozen=True)
class AblationParams:
    """The augmentation ablation, on a cheap proxy of the net (see `tasks.augment`)."""

    enabled: bool
    steps: int                      # optimiser steps per configuration, the same for every one
    batch_size: int
    hidden_dim: int
    lr: float
    seeds: list[int]                # every configuration is trained once per seed


@dataclass(frozen=True)
class AugmentParams:
    """The `augment` stage: train split only; originals + variants in data/augmented/train.npz."""

    enabled: bool                   # false: the augmented set is the train split alone
    expansion_factor: float         # augmented rows / original train rows, originals included
    expansion_range: list[float]    # [low, high]; the stage fails when the measured factor is outside
    mix: dict[str, float]           # source -> share of the added rows: text_attack, obfuscation, image_transform, gan
    ad_parent_share: float          # share of text and image variants whose parent is an ad
    text_attack: TextAttackParams
    obfuscation: ObfuscationParams
    image: ImageAugmentParams
    gan: GanParams
    heldout: HeldoutParams
    ablation: AblationParams


@dataclass(frozen=True)
class EvaluateTargetParams:
    """The issue's acceptance targets, checked on the test split in `reports/metrics.json`."""

    min_accuracy: float
    max_false_kill_rate: float
    min_hidden_image_ad_recall: float


@dataclass(frozen=True)
class EvaluateParams:
    baselines: list[str]            # names from models.baselines.BASELINES
    max_fpr: float                  # recall_at_fpr is the best recall with FPR <= this
    baseline_val_fpr: float         # a baseline's deployed threshold: FPR <= this on val
    calibration_bins: int
    targets: EvaluateTargetParams


@dataclass(frozen=True)
class GateParams:
    """The fastText gate in front of the deep model (see `models.gate`)."""

    epoch: int
    lr: float
    word_ngrams: int
    minn: int
    maxn: int
    dim: int
    bucket: int
    min_count: int
    thread: int                     # 1 = deterministic training
    seed: int
    max_recall_loss: float          # recall the cascade may lose against the deep model alone
    block: bool                     # false: the gate only allows, so it can add no false kill
    safety_logit: float             # thresholds moved this far (logit) from the exact val fit


@dataclass(frozen=True)
class TuneSpaceParams:
    """Optuna's search space. `feature_dim` is a list of choices the net's fusion width accepts."""

    lr: list[float]                 # [low, high], sampled log-uniformly
    dropout: list[float]            # [low, high]
    feature_dim: list[int]          # categorical choices


@dataclass(frozen=True)
class TuneParams:
    """The `tune` stage: an Optuna TPE study that workers share through one RDB storage."""

    enabled: bool                   # false (or n_trials 0): best_params.json from params as they are
    n_trials: int                   # per worker process
    timeout: int                    # seconds per worker, running trial included; 0 = none
    storage: str                    # SQLAlchemy URL; PostgreSQL for parallel workers
    study_name: str                 # a fingerprint of data and params is appended
    sqlite_timeout: float           # seconds a worker waits for SQLite's write lock
    subset: float                   # train posts per trial: <= 1 a fraction, > 1 a count
    epochs_per_trial: int
    metric: str                     # validation metric the trial reports and the pruner watches
    direction: Literal["maximize", "minimize"]
    pruner_startup_trials: int
    pruner_warmup_epochs: int
    space: TuneSpaceParams


@dataclass(frozen=True)
class TritonParams:
    """The Triton model repository written by `export` (backend `pytorch_libtorch`)."""

    model_name: str
    max_batch_size: int
    preferred_batch_size: list[int]
    max_queue_delay_microseconds: int
    instance_kind: Literal["KIND_CPU", "KIND_GPU"]
    instance_count: int


@dataclass(frozen=True)
class ExportParams:
    """The `export` stage: TorchScript model, parity and fresh-process checks, gate, Triton."""

    trace_batch_size: int           # the traced batch mixes text-only, image-only and both
    parity_atol: float              # max |traced - eager| allowed; the stage fails above it
    parity_posts: int               # test posts first, topped up from val and train
    parity_batch_sizes: list[int]   # batch sizes of the parity run, unlike the trace batch
    latency_batch_sizes: list[int]
    latency_repeats: int
    triton: TritonParams


@dataclass(frozen=True)
class VisionParams:
    """The image branch: a timm EfficientNet (see `models.net.VisionBranch`)."""

    backbone: str                   # any timm EfficientNet name, e.g. efficientnet_b0
    pretrained: bool                # true downloads timm weights: needs a network or a warm cache


@dataclass(frozen=True)
class TextEncoderParams:
    """The text branch: an ALBERT encoder over the featurizer's WordPiece `token_ids`."""

    pretrained: str                 # "" = build from the sizes below; else a name or local path
    vocab_size: int                 # must cover the featurizer's tokenizer (MiniLM: 30522)
    embedding_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int


@dataclass(frozen=True)
class ScoreWeightParams:
    ad: float
    sensitivity: float


@dataclass(frozen=True)
class ModelParams:
    """The multimodal net, built by name from `models.registry`."""

    name: str
    feature_dim: int                # fusion width; a multiple of num_heads
    num_heads: int
    fusion_layers: int              # joint self-attention blocks after the cross-attention
    dropout: float
    vision: VisionParams
    text: TextEncoderParams
    score_weights: ScoreWeightParams
    threshold: float                # a post is blocked when score > threshold


@dataclass(frozen=True)
class FocalParams:
    alpha: float                    # weight of the positive class; -1 = no weighting
    gamma: float


@dataclass(frozen=True)
class BatchFinderParams:
    """Lightning's batch-size finder, used when `train.batch_size` is `auto`."""

    mode: Literal["power", "binsearch"]
    init_val: int
    max_trials: int
    steps_per_trial: int


@dataclass(frozen=True)
class EarlyStoppingParams:
    monitor: Literal["val_loss", "val_auprc"]
    patience: int
    min_delta: float


@dataclass(frozen=True)
class TrainParams:
    """Lightning training of the multimodal net (see `tasks.train`)."""

    max_epochs: int
    batch_size: int | Literal["auto"]
    batch_finder: BatchFinderParams
    lr: float
    weight_decay: float
    warmup_fraction: float          # share of all optimiser steps spent in linear warmup
    gradient_clip_val: float        # 0 = no clipping
    loss: Literal["focal", "bce"]
    focal: FocalParams
    sensitivity_weight: float       # weight of the sensitivity MSE against the ad loss
    calibration: Literal["platt", "none"]  # Platt scaling of the ad head on val after training
    oversample: bool                # WeightedRandomSampler towards positive_share
    positive_share: float
    early_stopping: EarlyStoppingParams
    precision: Literal["auto", "32", "bf16-mixed", "16-mixed"]  # auto: mixed where native
    accelerator: str                # auto | cpu | gpu | ...
    devices: int | str              # a count, or "auto"
    strategy: str                   # auto | ddp | ...
    num_nodes: int
    num_threads: int                # torch threads per process; 0 = cores / processes
    num_workers: int                # DataLoader workers
    limit_train_batches: int | float  # an int is a count of batches, a float a fraction
    limit_val_batches: int | float
    log_every_n_steps: int


@dataclass(frozen=True)
class ServeBatchParams:
    """Micro-batching in front of the deep model: a batch runs at `max_size` posts or after
    `max_wait_ms`, whichever comes first."""

    max_size: int
    max_wait_ms: float
    max_queue: int                  # posts waiting for the deep model; beyond it requests get 503


@dataclass(frozen=True)
class ServeStoreParams:
    """The prediction and feedback store, written off the request path (see `serving.store`)."""

    url: str                        # SQLAlchemy URL: sqlite:///file.db, postgresql://...
    queue_size: int                 # rows waiting for the writer; beyond it a request gets 503
    write_batch: int                # rows per transaction
    flush_interval_ms: float
    store_image_small: bool         # also keep the CNN input image in the feature blob
    gate_feature_fraction: float    # share of gate-decided posts whose features are computed for drift


@dataclass(frozen=True)
class ServeReloadParams:
    poll_seconds: float             # how often the registry alias is checked; 0 = never
    admin_token_env: str            # env variable holding the POST /admin/reload token


@dataclass(frozen=True)
class ServeBenchParams:
    """`make bench`: HTTP load from a separate process against the cascade and the deep model."""

    requests: int                   # per mode
    concurrency: int                # requests in flight
    max_seconds: float              # per mode; the run stops at whichever limit comes first
    warmup_requests: int
    clean_share: float              # share of clean posts in the load mix
    image_share: float              # share of posts with an image in the load mix
    seed: int
    rates_rps: list[float]          # open-loop phases: Poisson arrivals at each of these rates
    rate_seconds: float             # ... for this long each


@dataclass(frozen=True)
class ServeParams:
    """The online cascade: fastText gate, then the TorchScript model (see `serving/`)."""

    host: str
    port: int
    bundle: str                     # a bundle folder, or models:/<name>@<alias> in the registry
    cache_dir: str                  # where registry versions are downloaded to
    cascade: bool                   # false: every post goes to the deep model
    gate_low: float | None          # null: the bundle's calibrated threshold (gate.json)
    gate_high: float | None
    max_posts_per_request: int
    max_body_bytes: int
    torch_threads: int              # 0 = CPU cores - 1, at least 1
    device: Literal["auto", "cpu", "cuda"]
    torchscript_optimize: bool      # TorchScript's profiling executor (re-optimises per batch size)
    batch: ServeBatchParams
    store: ServeStoreParams
    reload: ServeReloadParams
    bench: ServeBenchParams


@dataclass(frozen=True)
class PromotionParams:
    """How a challenger compares with the champion on the frozen evaluation set."""

    recall_tolerance: float         # challenger recall_at_fpr may be this much below the champion's
    false_kill_tolerance: float     # ... and its false-kill rate this much above
    max_false_kill_rate: float      # a ceiling for every challenger, champion or not


@dataclass(frozen=True)
class FloorParams:
    """What the first model must reach to become champion (there is nothing to compare with)."""

    min_recall_at_fpr: float
    min_accuracy: float


@dataclass(frozen=True)
class SmokeParams:
    """Infrastructure check: `model.pt` loaded by a fresh process that imports only torch."""

    latency_budget_ms: float        # p95 over the smoke posts of each one's best one-post pass
    repeats: int                    # timed one-post passes per smoke post (the best counts)
    atol: float                     # its outputs vs the same bundle scored in-process
    timeout_s: int


@dataclass(frozen=True)
class BehaviourParams:
    """Behavioural tests of the whole bundle (STYLE.md rule 7)."""

    n_posts: int                    # clean / ad text posts of the eval set used as bases
    max_flip_share: float           # clean posts whose decision a harmless edit may flip
    max_score_shift: float          # largest |score change| a harmless edit may cause
    min_directional_share: float    # posts whose score must rise when a phone + WeChat ask is added
    min_directional_delta: float    # ... by at least this much
    min_ad_block_share: float       # obvious ads that must be blocked
    min_clean_allow_share: float    # obvious clean posts that must be allowed


@dataclass(frozen=True)
class RetrainParams:
    """The `ad_filter_retrain` DAG: feedback and new ad variants, warm start from the champion."""

    feedback_store: str             # SQLAlchemy URL of the serving feedback store; "" = none
    variants_dir: str               # folder of new labelled posts (CSV/JSONL/Parquet + images)
    rendered_variants: int          # new ad images rendered with a fresh seed per retrain
    incoming_dir: str               # where the merged snapshot is written for `ingest`
    epochs: int
    lr_factor: float                # fine-tuning lr = the champion's lr * this


@dataclass(frozen=True)
class RegisterParams:
    """The `register` stage: MLflow registration, the promotion gate, rollback, retraining."""

    eval_set: str                   # frozen, versioned evaluation set; frozen from the test split when absent
    promote: bool                   # the stage also runs the gate (env ADFILTER_PROMOTE=0 skips it)
    promotion: PromotionParams
    floors: FloorParams
    smoke: SmokeParams
    behaviour: BehaviourParams
    retrain: RetrainParams


@dataclass(frozen=True)
class DriftSimulateParams:
    """`adfilter simulate`: scenario traffic pushed through the serving cascade into a store."""

    batch_size: int                 # posts per POST /v1/moderate request
    variant_share: float            # new-ad-variant: share of the ads that use the new tactic
    shift_share: float              # image-shift: share of the images that pass the new camera look
    feedback_share: float           # share of posts a simulated moderator labels (POST /v1/feedback)
    store_image_small: bool         # keep image_small in the store's blobs (the image branch's SHAP needs it)
    unseen_texts_from: str          # a table whose texts the traffic does not use (the train split); "" = none


@dataclass(frozen=True)
class DriftParams:
    """The drift job (`tasks.drift`, DAG `ad_filter_drift`): SHAP importance shift + Evidently."""

    store_url: str                  # "" = serve.store.url
    bundle: str                     # "" = serve.bundle (the model whose importance is watched)
    reference: str                  # reference folder; built from reference_splits when absent
    reference_splits: list[str]     # featurize outputs (npz) the fallback reference is drawn from
    reference_posts: int            # posts in the reference (all of them explained, once per model)
    population: Literal["deep", "all"]  # whose importance: the posts the deep model decides, or all traffic
    reference_texts: list[str]      # tables (id, text) of the reference posts, to route them through the gate
    window_hours: float             # the window: posts of the last N hours (0 = no time limit) ...
    window_posts: int               # ... and at most this many, the most recent
    min_posts: int                  # a window with fewer posts with features is reported, no trigger
    explain_posts: int              # window posts explained with SHAP (drawn by inverse sampling weight)
    explain_output: Literal["score", "ad_logit"]
    measure: Literal["signed", "abs"]  # cells: group x direction (toward ad / clean), or group
    by_kind: bool                   # distance within each post kind, averaged by traffic share
    background: Literal["reference", "mean"]  # "absent" = a random reference post of the same kind, or the mean row
    background_draws: int           # reference posts drawn as "absent" per explained post (averaged)
    max_exact_groups: int           # posts with more groups get sampled (antithetic permutation) values
    permutations: int               # orders sampled per post above max_exact_groups
    threshold: float                # retrain when the total variation distance is above this
    bootstrap: int                  # resamples for the noise estimate
    batch_size: int                 # model rows per forward pass
    pca_components: int             # Evidently summary: principal components per feature block
    log_mlflow: bool
    mlflow_experiment: str
    simulate: DriftSimulateParams


@dataclass(frozen=True)
class Params:
    profile: str
    seed: int
    mlflow: MlflowParams
    ingest: IngestParams
    validate: ValidateParams
    split: SplitParams
    featurize: FeaturizeParams
    augment: AugmentParams
    tune: TuneParams
    export: ExportParams
    evaluate: EvaluateParams
    gate: GateParams
    model: ModelParams
    train: TrainParams
    register: RegisterParams
    serve: ServeParams
    drift: DriftParams


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
