"""Step `drift`: has the model's feature importance on live traffic moved away from its reference?

`drift(params, store_url, reference_path)` reads a window of recent predictions from the
prediction store (the posts of the last `drift.window_hours`, at most `drift.window_posts` of
them), explains a sample of them (`drift.explain_posts`) and the reference set with exact
group-level SHAP values of the served model (`adfilter.monitoring.groups`: seven named feature
groups, "absent" = taken from a reference post of the same kind), and compares the two
importance distributions with the total variation distance (`adfilter.monitoring.shift`),
within each kind of post (text only, image only, text and image; `drift.by_kind`) and averaged
with the kinds' shares of the window. The distribution is, per group, the share of the SHAP mass pushing posts toward "ad" and the share
pushing them toward "clean" (`drift.measure: signed`; `abs` is the plain normalised mean |SHAP|
per group, always reported as `shift_abs`). Above `drift.threshold` (0.15) the result says
`retrain: true`, with the reason, the shift and the window, which is what the `ad_filter_drift`
DAG passes to `ad_filter_retrain`. A window with fewer than `drift.min_posts` posts with
features is reported and triggers nothing, and so is a shift no larger than what sampling alone
reaches at the window's effective size (the 95th percentile of the reference's own resamples,
`noise.null_p95`): the window is then too noisy to tell. The bootstrap noise of the shift is
reported next to it.

Which posts count (`drift.population`): with `all` (the default) all traffic: the store keeps
the features of every post the deep model scored and of a share
`serve.store.gate_feature_fraction` of the posts the gate decided alone; each gate post with
features stands for 1 / that share of them, so the posts to explain are drawn with that
weight and the sample stands for all traffic, like the reference does. With `deep`, the posts
the deep model decides, on both sides: in the window those the gate deferred, in the
reference those the bundle's gate would defer, routed by their texts
(`drift.reference_texts`, see `reference_population`). Gate-decided posts are confident clean
texts the deep model never scores, and the few of them with features carry large weights:
leaving them out removes most of the sampling noise, but also the contrast between them and
the ads, which is where a new ad tactic that the model misses shows (README, Monitoring). A
reference whose texts cannot be found is compared as `all`. Evidently's data-drift report
always covers all traffic.

Next to the decision it writes, to `out_dir` (`reports/drift/`): an Evidently data-drift report
on summaries of the handcrafted features and the score (`evidently.html`, `evidently.json`),
the SHAP summary plot (`shap_summary.png`), the importance bars (`importance.png`) and the
explained window posts' SHAP values with their weights (`window_shap.npz`); the
result goes to `reports/drift.json` (`report_path`) and, with everything else, to MLflow
(experiment `drift.mlflow_experiment`).

`python -m tasks.drift` runs it from the repository root; `adfilter drift` is the same with
options.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd

from adfilter.config import Params, load_params

log = logging.getLogger("tasks.drift")

FEATURE_KINDS: Final = ("model", "sampled")
REFERENCE_DIR: Final = "reference"          # a reference stored inside a model bundle
SHAP_PLOT: Final = "shap_summary.png"
IMPORTANCE_PLOT: Final = "importance.png"
WINDOW_SHAP: Final = "window_shap.npz"    # the explained window posts' SHAP values and weights


class DriftError(RuntimeError):
    """A drift job that cannot run: no model, no reference, features that do not match."""


# --------------------------------------------------------------------------- helpers


def _redact(url: str) -> str:
    try:
        import sqlalchemy as sa

        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _iso(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return pd.Timestamp(value).isoformat()


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def load_bundle(params: Params, spec: str | None = None) -> Any:
    """The bundle the server would load for `spec` (default `drift.bundle`, else `serve.bundle`):
    a folder, or `models:/ad-filter@champion` downloaded into `serve.cache_dir`."""
    from serving.bundle import Bundle, fetch, parse_source

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = spec or params.drift.bundle or params.serve.bundle
    source = parse_source(spec)
    path, version, revision = fetch(source, params.mlflow.tracking_uri, params.serve.cache_dir)
    return Bundle.load(path, version, revision, source.spec, "cpu", params.model.threshold)


def model_predict(bundle: Any, output: str) -> Any:
    """`arrays -> output` of the bundle's TorchScript model (`score` or `ad_logit`), float64."""
    import torch

    index = {"ad_logit": 0, "sensitivity": 1, "score": 2}[output]

    def predict(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            out = bundle.model.module(*bundle.model.tensors(arrays))
        return out[index].double().cpu().numpy().reshape(-1)

    return predict


def _forward(predict: Any, arrays: Mapping[str, np.ndarray], batch_size: int) -> np.ndarray:
    n = len(arrays["has_text"])
    parts = []
    for s in range(0, n, batch_size):
        parts.append(predict({k: np.ascontiguousarray(v[s:s + batch_size]) for k, v in arrays.items()}))
    return np.concatenate(parts) if parts else np.zeros(0)


def _with_background(arrays: dict[str, np.ndarray], background: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inputs the store did not keep (image_small when serve.store.store_image_small is off)
    filled with their background value, so the model can run on the rest."""
    n = len(arrays["has_text"])
    out = dict(arrays)
    for key, value in background.items():
        if key not in out:
            out[key] = np.broadcast_to(value, (n, *value.shape)).copy()
    return out


def resolve_reference(
    params: Params, bundle: Any, reference_path: str | Path | None = None, rebuild: bool = False,
) -> Any:
    """The reference to compare with: `reference_path` if given, else the bundle's own
    `reference/` folder, else `drift.reference` (built from `drift.reference_splits` when it
    is absent, was drawn for another featurizer, or `rebuild` is set)."""
    from adfilter.monitoring.reference import (
        ReferenceError,
        build_reference,
        feature_dims,
        is_reference,
        load_reference,
    )

    expected = _featurizer_dims(bundle)
    if reference_path is not None:
        ref = load_reference(reference_path)
        _check_dims(feature_dims(ref.arrays), expected, f"reference {reference_path}")
        return ref
    own = Path(bundle.path) / REFERENCE_DIR
    if is_reference(own) and not rebuild:
        ref = load_reference(own)
        _check_dims(feature_dims(ref.arrays), expected, f"the bundle's reference {own}")
        return ref
    target = Path(params.drift.reference)
    if is_reference(target) and not rebuild:
        ref = load_reference(target)
        if _dims_match(feature_dims(ref.arrays), expected):
            return ref
        if ref.meta.get("origin") != "splits":
            _check_dims(feature_dims(ref.arrays), expected, f"reference {target}")
        log.warning("reference %s was drawn for another featurizer; rebuilding it", target)
    try:
        return build_reference(
            params.drift.reference_splits, target, params.drift.reference_posts, params.seed,
            empty_token_ids=_empty_tokens(bundle),
            extra_meta={"origin": "splits", "featurizer_dims": expected},
        )
    except ReferenceError as exc:
        raise DriftError(
            f"no drift reference: {bundle.path} has no {REFERENCE_DIR}/ folder, "
            f"{target} is not a reference, and it cannot be built ({exc})"
        ) from exc


def make_explainer(params: Params, bundle: Any, reference: Any, groups: list[str]) -> Any:
    """The group SHAP explainer of the bundle's model with the drift params' settings."""
    from adfilter.monitoring.groups import GroupExplainer

    cfg = params.drift
    return GroupExplainer(
        model_predict(bundle, cfg.explain_output), reference.background, groups, cfg.batch_size,
        baselines=reference.arrays if cfg.background == "reference" else None,
        draws=cfg.background_draws, seed=params.seed, max_exact_groups=cfg.max_exact_groups,
        permutations=cfg.permutations,
    )


def reference_explanation(
    params: Params, bundle: Any, reference: Any, groups: list[str], progress: bool = False,
) -> tuple[dict[str, np.ndarray], str]:
    """SHAP values and scores of every reference post for this model and these settings, from
    the reference folder's cache or computed (and cached) now; with the cache key."""
    cfg = params.drift
    model_hash = _file_hash(Path(bundle.path) / "model.pt")
    setting = (f"{model_hash}|{cfg.explain_output}|{','.join(groups)}|{cfg.background}|"
               f"{cfg.background_draws}|{cfg.max_exact_groups}|{cfg.permutations}|{params.seed}")
    key = hashlib.sha256(setting.encode()).hexdigest()[:16]
    cached = reference.cached(key)
    if cached is None:
        log.info("explaining the %d reference posts (once for this model)", reference.n)
        exp = make_explainer(params, bundle, reference, groups).explain(reference.arrays, progress)
        score = _forward(model_predict(bundle, "score"), reference.arrays, cfg.batch_size)
        cached = {"values": exp.values, "base": exp.base, "output": exp.output, "score": score,
                  "groups": np.asarray(groups)}
        reference.save_cached(key, cached)
    return cached, key


def build_reference_set(
    params: Params,
    bundle_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    sources: list[str] | None = None,
    explain: bool = True,
) -> Path:
    """Draw a reference for the bundle at `bundle_dir` (default: the one drift watches) from
    `sources` (default `drift.reference_splits`) into `out_dir` (default `drift.reference`).

    With `explain`, the reference's SHAP values for this model (all seven groups) are computed
    and cached in the folder too. The registration can call this with
    `out_dir=<bundle>/reference` so that the reference travels with the registered model;
    `drift` then finds it there."""
    from adfilter.monitoring.groups import GROUPS
    from adfilter.monitoring.reference import build_reference

    bundle = load_bundle(params, str(bundle_dir) if bundle_dir is not None else None)
    out = Path(out_dir) if out_dir is not None else Path(params.drift.reference)
    origin = "splits" if out_dir is None else "explicit"  # only "splits" ones are rebuilt at will
    reference = build_reference(
        sources or params.drift.reference_splits, out, params.drift.reference_posts, params.seed,
        empty_token_ids=_empty_tokens(bundle),
        extra_meta={"origin": origin, "featurizer_dims": _featurizer_dims(bundle),
                    "model_version": bundle.version},
    )
    if explain:
        # The drift job's first run then finds the reference's SHAP values ready.
        reference_explanation(params, bundle, reference, list(GROUPS), progress=True)
    return out


def _empty_tokens(bundle: Any) -> np.ndarray:
    return np.asarray(bundle.featurizer.encoder.token_ids([""])[0], dtype=np.int32)


def _featurizer_dims(bundle: Any) -> dict[str, list[int]]:
    dims = bundle.featurizer.feature_dims
    out = {k: [int(dims[k])] for k in ("tfidf", "sent_emb", "sift_bow", "hsv", "qr", "token_ids")}
    side = int(dims["image_small"])
    out["image_small"] = [side, side, 3]
    return out


def _dims_match(have: Mapping[str, list[int]], want: Mapping[str, list[int]]) -> bool:
    return all(list(have.get(k, want[k])) == list(want[k]) for k in want)


def _check_dims(have: Mapping[str, list[int]], want: Mapping[str, list[int]], what: str) -> None:
    bad = {k: (have.get(k), want[k]) for k in want if k in have and list(have[k]) != list(want[k])}
    if bad:
        raise DriftError(
            f"{what} does not match the model's featurizer (have vs want: {bad}); rebuild it for "
            f"this model (`adfilter drift --build-reference`)"
        )


# --------------------------------------------------------------------------- the window


def read_window(
    params: Params, store_url: str, since: datetime | str | None = None, limit: int | None = None,
    now: datetime | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The window's prediction rows (oldest first) and what the window was."""
    from serving.store import read_predictions

    cfg = params.drift
    if since is None and cfg.window_hours > 0:
        now = now or datetime.now(UTC).replace(tzinfo=None)
        since = now - timedelta(hours=cfg.window_hours)
    limit = limit if limit is not None else (cfg.window_posts or None)
    df = read_predictions(store_url, since=since, limit=limit)
    window = {
        "start": _iso(df["created_at"].min()) if len(df) else None,
        "end": _iso(df["created_at"].max()) if len(df) else None,
        "since": _iso(since) if since is not None else None,
        "limit": limit,
    }
    return df, window


def window_weights(df: pd.DataFrame, gate_feature_fraction: float) -> np.ndarray:
    """Inverse inclusion probability of each row with features: 1 for posts the deep model
    scored (all are kept), 1 / gate_feature_fraction for gate posts sampled for drift."""
    sampled = (df["features_kind"] == "sampled").to_numpy()
    weight = 1.0 / gate_feature_fraction if gate_feature_fraction > 0 else 1.0
    return np.where(sampled, weight, 1.0)


def _reference_texts(tables: list[str], ids: np.ndarray | None) -> tuple[list[str] | None, str]:
    """The text of every reference post (by id) from the `drift.reference_texts` tables, or
    None and why not."""
    if ids is None:
        return None, "the reference holds no post ids"
    found: dict[str, str] = {}
    missing_tables = []
    for table in tables:
        if not Path(table).is_file():
            missing_tables.append(table)
            continue
        frame = pd.read_parquet(table, columns=["id", "text"])
        found.update(zip(frame["id"].astype(str), frame["text"].fillna("").astype(str), strict=True))
    keys = [str(i) for i in ids]
    absent = [k for k in keys if k not in found]
    if absent:
        where = f"tables {tables}" + (f" ({missing_tables} missing)" if missing_tables else "")
        return None, f"{len(absent)} of {len(keys)} reference posts have no text in {where}"
    return [found[k] for k in keys], ""


def reference_population(params: Params, bundle: Any, reference: Any) -> tuple[np.ndarray, str, str]:
    """Which reference posts belong to the compared population (`drift.population`), the
    population used (`deep` or `all`) and what it is, in words.

    `deep`: the posts the bundle's cascade would send to the deep model (`serving.cascade.route`
    on the gate's score of each post's text, read from `drift.reference_texts`), the posts
    whose decisions the deep model makes. Gate-decided posts are confident clean texts the
    deep model never scores; kept for a small share of traffic (`gate_feature_fraction`) and
    weighted up, they add most of the sampling noise, but they also carry part of the signal
    (the contrast with the ads), so `all` stays the default (see the module docstring).
    Without the texts, all reference posts count (said in the log and in the result)."""
    n = reference.n
    if params.drift.population == "all":
        return np.ones(n, dtype=bool), "all", "all posts"
    texts, why = _reference_texts(params.drift.reference_texts, reference.arrays.get("id"))
    if texts is None:
        log.warning("drift.population is deep but %s: comparing all traffic with all reference "
                    "posts", why)
        return np.ones(n, dtype=bool), "all", f"all posts ({why})"
    from adfilter.features import normalize_text
    from serving.cascade import DEEP, route

    norm = [normalize_text(t) if t else "" for t in texts]
    has_text = np.array([bool(t) for t in norm], dtype=bool)
    has_image = np.asarray(reference.arrays["has_image"], dtype=bool)
    p_gate = np.full(n, 0.5)  # the server's stand-in for a post without text
    scored = [i for i in range(n) if has_text[i]]
    if scored:
        p_gate[scored] = bundle.gate.p_ad([norm[i] for i in scored])
    routes = route(p_gate, has_text, has_image, bundle.gate.low, bundle.gate.high)
    mask = np.array([r == DEEP for r in routes], dtype=bool)
    return mask, "deep", "posts the deep model decides"


# --------------------------------------------------------------------------- the job


def decide(shift: float, null_p95: float, threshold: float) -> tuple[bool, bool, str]:
    """(retrain, within_noise, verdict): retrain when the shift is above the threshold and above
    what sampling alone reaches at the window's size; a shift that sampling alone reaches is not
    evidence of change, whatever its size, and such a window is reported like a too-small one."""
    above = shift > threshold
    within_noise = shift <= null_p95
    retrain = above and not within_noise
    if retrain:
        verdict = f"is above the threshold {threshold:g}"
    elif above:
        verdict = (f"is above the threshold {threshold:g} but not above what sampling alone gives, "
                   f"so it triggers nothing (a larger window or serve.store.gate_feature_fraction "
                   f"makes it measurable)")
    else:
        verdict = f"is within the threshold {threshold:g}"
    return retrain, within_noise, verdict




def drift(
    params: Params,
    store_url: str | None = None,
    reference_path: str | Path | None = None,
    out_dir: Path = Path("reports/drift"),
    *,
    bundle: str | None = None,
    since: datetime | str | None = None,
    limit: int | None = None,
    report_path: Path | None = None,
    log_mlflow: bool | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure the SHAP importance shift of the store's recent window (see the module docstring).

    Returns (and writes to `report_path`, default `out_dir/../drift.json`) at least `shift`
    (None when the window is too small), `threshold`, `retrain`, `reason`, `n_window` (posts in
    the window), `n_features` (those with features), and `window` {`start`, `end`}."""
    from adfilter.monitoring.groups import GROUP_INPUT, available_groups
    from adfilter.monitoring.shift import (
        attribution_cells,
        bootstrap_shift,
        bootstrap_shift_by_kind,
        cell_names,
        importance_distribution,
        post_kinds,
        representative_sample,
        stratified_sample,
        total_variation,
    )
    from adfilter.monitoring.summary import (
        Summaries,
        evidently_report,
        plot_importance,
        plot_shap_summary,
    )
    from serving.store import stack_features

    started = time.perf_counter()
    timings: dict[str, float] = {}
    cfg = params.drift
    store_url = store_url or cfg.store_url or params.serve.store.url
    out_dir = Path(out_dir)
    report_path = Path(report_path) if report_path is not None else out_dir.parent / "drift.json"
    log_mlflow = cfg.log_mlflow if log_mlflow is None else log_mlflow

    t0 = time.perf_counter()
    df, window = read_window(params, store_url, since, limit)
    has_blob = df["features_kind"].isin(FEATURE_KINDS) & df["features"].notna()
    feat = df[has_blob].reset_index(drop=True)
    timings["read"] = time.perf_counter() - t0
    result: dict[str, Any] = {
        "shift": None,
        "threshold": cfg.threshold,
        "retrain": False,
        "reason": "",
        "n_window": int(len(df)),
        "n_features": int(len(feat)),
        "window": window,
        "store": _redact(store_url),
        "computed_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    n_population = int((feat["features_kind"] == "model").sum()) if cfg.population == "deep" else len(feat)
    if n_population < cfg.min_posts:
        which = "scored by the deep model" if cfg.population == "deep" else "with features"
        result["reason"] = (
            f"too few posts {which} in the window: {n_population} of {len(df)} posts "
            f"(drift.min_posts = {cfg.min_posts}); no shift measured, nothing triggered"
        )
        return _finish(params, result, out_dir, report_path, log_mlflow, started, timings, [])

    t0 = time.perf_counter()
    model_bundle = load_bundle(params, bundle)
    reference = resolve_reference(params, model_bundle, reference_path)
    try:
        arrays = stack_features(feat["features"])
    except ValueError as exc:  # blobs of different widths cannot be stacked
        raise DriftError(_MIXED_FEATURIZERS.format(detail=exc)) from exc
    rows = arrays.pop("row")
    feat = feat.iloc[rows].reset_index(drop=True)
    _check_window_dims(arrays, _featurizer_dims(model_bundle))
    timings["load"] = time.perf_counter() - t0
    result.update(model_version=model_bundle.version, bundle=str(model_bundle.path))

    groups = [g for g in available_groups(arrays) if GROUP_INPUT[g] in reference.arrays]
    missing = [g for g in GROUP_INPUT if g not in groups]
    if missing:
        log.warning(
            "groups %s are not in the window's features (serve.store.store_image_small is off?); "
            "they are not explained and take the baseline's value on both sides", missing)
    explainer = make_explainer(params, model_bundle, reference, groups)
    score_fn = model_predict(model_bundle, "score")

    # The reference is explained once per model and setting, and kept beside it.
    t0 = time.perf_counter()
    cached, key = reference_explanation(params, model_bundle, reference, groups, progress)
    result["reference"] = {"path": str(reference.directory), "posts": reference.n,
                           "built_at": reference.meta.get("built_at"),
                           "origin": reference.meta.get("origin"), "cached_key": key}
    timings["explain_reference"] = time.perf_counter() - t0

    ref_mask, used, population = reference_population(params, model_bundle, reference)
    if used == "deep":
        in_window = (feat["features_kind"] == "model").to_numpy()
    else:  # all traffic, or a reference without texts to route (then compared as all traffic)
        in_window = np.ones(len(feat), dtype=bool)
    result["population"] = {"name": used, "what": population, "window_posts": int(in_window.sum()),
                            "reference_posts": int(ref_mask.sum())}

    t0 = time.perf_counter()
    weights = window_weights(feat, params.serve.store.gate_feature_fraction)
    drawn, drawn_weights, drawn_strata = stratified_sample(
        np.where(in_window, weights, 0.0), cfg.explain_posts, params.seed)
    sample = _with_background({k: v[drawn] for k, v in arrays.items()}, reference.background)
    explainer.seed = params.seed + 1  # the window's baseline draws are independent of the reference's
    win_exp = explainer.explain(sample, progress=progress)
    win_values = win_exp.values
    timings["explain_window"] = time.perf_counter() - t0
    log.info("explained %d window posts with %d model rows", len(drawn), win_exp.evaluations)

    cells = cell_names(groups, cfg.measure)
    ref_values = cached["values"][ref_mask]
    win_cells = attribution_cells(win_values, cfg.measure)
    ref_cells = attribution_cells(ref_values, cfg.measure)
    kinds_detail = None
    if cfg.by_kind:
        estimate, kinds_detail = bootstrap_shift_by_kind(
            win_cells, ref_cells,
            post_kinds(sample["has_text"], sample["has_image"]),
            post_kinds(reference.arrays["has_text"], reference.arrays["has_image"])[ref_mask],
            cfg.bootstrap, params.seed, drawn_weights, drawn_strata)
    else:
        estimate = bootstrap_shift(win_cells, ref_cells, cfg.bootstrap, params.seed,
                                   drawn_weights, drawn_strata)
    p = importance_distribution(win_cells, drawn_weights)
    q = importance_distribution(ref_cells)
    p_abs = importance_distribution(np.abs(win_values), drawn_weights)
    q_abs = importance_distribution(np.abs(ref_values))
    change = {c: float(p[i] - q[i]) for i, c in enumerate(cells)}
    moved = sorted(change.items(), key=lambda kv: -abs(kv[1]))[:3]
    retrain, within_noise, verdict = decide(estimate.shift, estimate.null_p95, cfg.threshold)
    moved_text = ", ".join(f"{c} {v:+.3f}" for c, v in moved)
    result.update(
        shift=round(estimate.shift, 6),
        retrain=bool(retrain),
        within_noise=bool(within_noise),
        reason=(
            f"SHAP feature-importance shift {estimate.shift:.3f} (total variation distance, "
            f"{cfg.measure} importance over {len(cells)} cells"
            f"{', within each kind of post, weighted by its share' if cfg.by_kind else ''}; "
            f"bootstrap 90% interval "
            f"{estimate.low:.3f}-{estimate.high:.3f}, sampling alone gives up to "
            f"{estimate.null_p95:.3f}) {verdict}, over {population}: {int(in_window.sum())} "
            f"of the window's {len(df)} posts, {int(ref_mask.sum())} of the reference's; "
            f"largest moves: {moved_text}"
        ),
        noise=estimate.as_dict(),
        n_explained=int(len(drawn)),
        measure=cfg.measure,
        by_kind=bool(cfg.by_kind),
        **({"kinds": kinds_detail} if kinds_detail is not None else {}),
        background=cfg.background,
        cells={
            "names": cells,
            "window": {c: round(float(p[i]), 6) for i, c in enumerate(cells)},
            "reference": {c: round(float(q[i]), 6) for i, c in enumerate(cells)},
            "change": {c: round(v, 6) for c, v in change.items()},
        },
        importance={
            "groups": groups,
            "window": {g: round(float(p_abs[i]), 6) for i, g in enumerate(groups)},
            "reference": {g: round(float(q_abs[i]), 6) for i, g in enumerate(groups)},
        },
        shift_abs=round(total_variation(p_abs, q_abs), 6),
        groups_missing=missing,
        explain_output=cfg.explain_output,
        model_rows_evaluated=int(win_exp.evaluations),
    )

    # Evidently on the handcrafted-feature summaries and the score, over a representative
    # sample of the window's posts so that it stands for all traffic like the reference does.
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    current_rows = representative_sample(weights, None, params.seed + 1)
    current_arrays = {k: v[current_rows] for k, v in arrays.items()}
    # The store's score is the deep model's for the posts it scored; gate posts sampled for
    # drift were featurized but never scored, so the model scores them here.
    score = feat["score"].to_numpy(dtype=np.float64, na_value=np.nan)[current_rows].copy()
    need = (feat["features_kind"].to_numpy()[current_rows] != "model") | ~np.isfinite(score)
    if need.any():
        subset = {k: v[need] for k, v in _with_background(current_arrays, reference.background).items()}
        score[need] = _forward(score_fn, subset, cfg.batch_size)
    summaries = Summaries(reference.arrays, cfg.pca_components, params.seed)
    current = summaries.frame(current_arrays, score)
    ref_frame = summaries.frame(reference.arrays, cached["score"])
    try:
        result["evidently"] = evidently_report(ref_frame, current, out_dir, summaries.numerical)
    except Exception as exc:  # a report problem must not hide the drift decision
        log.exception("the Evidently report failed")
        result["evidently"] = {"error": f"{type(exc).__name__}: {exc}"}
    timings["evidently"] = time.perf_counter() - t0

    # The window's explained posts, for whoever wants to look closer than the distribution.
    np.savez_compressed(
        out_dir / WINDOW_SHAP, values=win_values, weights=drawn_weights, groups=np.asarray(groups),
        post_id=feat["post_id"].to_numpy()[drawn].astype(str),
        has_text=np.asarray(sample["has_text"], dtype=bool),
        has_image=np.asarray(sample["has_image"], dtype=bool))

    t0 = time.perf_counter()
    plots = [
        plot_shap_summary(win_values, groups, out_dir / SHAP_PLOT,
                          title=f"window of {len(df)} posts, {len(drawn)} explained"),
        plot_importance(q, p, cells, estimate.shift, cfg.threshold, out_dir / IMPORTANCE_PLOT,
                        noise=estimate.noise),
    ]
    timings["plots"] = time.perf_counter() - t0
    return _finish(params, result, out_dir, report_path, log_mlflow, started, timings, plots)


_MIXED_FEATURIZERS: Final = (
    "the window's stored features do not fit the model's featurizer ({detail}): its rows come "
    "from another featurizer (a model change inside the window); restrict the window with "
    "--since to the current model's traffic"
)


def _check_window_dims(arrays: Mapping[str, np.ndarray], dims: Mapping[str, list[int]]) -> None:
    bad = {k: (list(arrays[k].shape[1:]), list(want)) for k, want in dims.items()
           if k in arrays and list(arrays[k].shape[1:]) != list(want)}
    if bad:
        raise DriftError(_MIXED_FEATURIZERS.format(detail=f"stored vs model widths: {bad}"))


def _finish(
    params: Params,
    result: dict[str, Any],
    out_dir: Path,
    report_path: Path,
    log_mlflow: bool,
    started: float,
    timings: dict[str, float],
    plots: list[Path],
) -> dict[str, Any]:
    timings["total"] = time.perf_counter() - started
    result["seconds"] = {k: round(v, 2) for k, v in timings.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    result["reports"] = {
        "drift_json": str(report_path),
        **({"evidently_html": result["evidently"].get("html"),
            "evidently_json": result["evidently"].get("json")}
           if isinstance(result.get("evidently"), dict) and "html" in result["evidently"] else {}),
        "plots": [str(p) for p in plots],
    }
    if log_mlflow:
        result["mlflow"] = _log_mlflow(params, result, out_dir)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    (out_dir / "drift.json").write_text(json.dumps(result, indent=2, default=str) + "\n",
                                        encoding="utf-8")
    log.info("drift: %s", result["reason"])
    return result


def _log_mlflow(params: Params, result: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    """One MLflow run per drift job: metrics, the decision as tags, every report as artifacts."""
    try:
        import mlflow

        mlflow.set_tracking_uri(params.mlflow.tracking_uri)
        mlflow.set_experiment(params.drift.mlflow_experiment)
        end = (result.get("window") or {}).get("end") or result["computed_at"]
        with mlflow.start_run(run_name=f"drift {end}") as run:
            metrics = {"n_window": result["n_window"], "n_features": result["n_features"],
                       "retrain": int(bool(result["retrain"]))}
            if result.get("shift") is not None:
                metrics["shift"] = result["shift"]
                metrics.update({f"shift_{k}": v for k, v in result["noise"].items()
                                if k in ("noise", "low", "high", "null_p95")})
                metrics["shift_abs"] = result["shift_abs"]
                for side in ("window", "reference"):
                    metrics.update({f"importance_{side}_{g}": v
                                    for g, v in result["importance"][side].items()})
                    metrics.update({f"cell_{side}_{c.replace(':', '_')}": v
                                    for c, v in result["cells"][side].items()})
            ev = result.get("evidently") or {}
            if "drifted_columns" in ev:
                metrics["evidently_drifted_columns"] = ev["drifted_columns"]
                metrics["evidently_drifted_share"] = ev["drifted_share"]
            mlflow.log_metrics(metrics)
            mlflow.log_params({"threshold": params.drift.threshold,
                               "explain_posts": params.drift.explain_posts,
                               "explain_output": params.drift.explain_output,
                               "measure": params.drift.measure,
                               "by_kind": params.drift.by_kind,
                               "background": params.drift.background,
                               "background_draws": params.drift.background_draws,
                               "permutations": params.drift.permutations,
                               "window_hours": params.drift.window_hours,
                               "window_posts": params.drift.window_posts})
            mlflow.set_tags({"retrain": str(bool(result["retrain"])).lower(),
                             "model_version": str(result.get("model_version", "")),
                             "store": result["store"], "reason": result["reason"][:5000]})
            mlflow.log_dict(dict(result), "drift/drift.json")
            for name in ("evidently.html", "evidently.json", SHAP_PLOT, IMPORTANCE_PLOT):
                if (out_dir / name).is_file():
                    mlflow.log_artifact(str(out_dir / name), artifact_path="drift")
            return {"run_id": run.info.run_id, "experiment": params.drift.mlflow_experiment,
                    "tracking_uri": _redact(params.mlflow.tracking_uri)}
    except Exception as exc:  # the decision stands even when the tracking server is down
        log.warning("logging the drift run to MLflow failed: %s", exc)
        return {"error": f"{type(exc).__name__}: {exc}"}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    from adfilter.logs import setup_logging

    parser = argparse.ArgumentParser(prog="python -m tasks.drift", description=__doc__.split("\n")[0])
    parser.add_argument("--store", default=None, help="SQLAlchemy URL (default: drift.store_url, "
                        "else serve.store.url)")
    parser.add_argument("--reference", default=None, help="a reference folder")
    parser.add_argument("--out", default="reports/drift", help="report folder")
    args = parser.parse_args(argv)
    setup_logging()
    result = drift(load_params("params.yaml"), args.store, args.reference, Path(args.out))
    print(json.dumps({k: result[k] for k in ("shift", "threshold", "retrain", "reason")}, indent=2))


if __name__ == "__main__":
    main()
