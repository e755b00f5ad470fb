"""Incremental retraining (the `ad_filter_retrain` DAG): new labels and ad variants in, the
champion's weights fine-tuned on them.

`merge_feedback` builds the next raw snapshot's source in `register.retrain.incoming_dir`:
the current snapshot (`data/raw`), relabelled where moderators said otherwise in the serving
feedback store (`register.retrain.feedback_store`, the `feedback` table of `serving.store`;
the latest label per post wins), plus the labelled posts dropped into
`register.retrain.variants_dir` (CSV, JSONL or Parquet with id, text, image, label; a row
without a label takes the feedback's label for its id), plus `rendered_variants` freshly
rendered ad images (a new seed each day). `merge_step` then points `ingest` at it (`source:
path`), so `dvc repro ingest` makes it a new DVC data version. The store keeps features, not
posts, so feedback on a post that is in neither the snapshot nor the drop folder cannot become
training data; it is counted as `unmatched` in the report.

`finetune` starts from the champion's trained weights (the registered version's `checkpoint`
artifact) instead of a fresh initialisation and trains `register.retrain.epochs` epochs at
the champion's learning rate times `lr_factor`, with the champion's tuned sizes. It writes
what the train stage writes (`artifacts/model/`, `reports/train.json`); `finetune_step` then
records that with `dvc commit train`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd

from adfilter.config import Params, load_params, to_dict
from adfilter.schema import COLUMNS, IMAGE_ONLY, slice_of

log = logging.getLogger("tasks.retrain")

POSTS: Final = "posts.parquet"
MERGE_REPORT: Final = "merge.json"
TABLE_SUFFIXES: Final = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


class RetrainError(RuntimeError):
    """Inputs the retraining cannot use: no snapshot, an unreadable drop file, no champion weights."""


# --------------------------------------------------------------------------- merge


def read_feedback_labels(url: str) -> pd.DataFrame:
    """`post_id, label, created_at` of the latest moderator label per post in the store at `url`."""
    if not url:
        return pd.DataFrame(columns=["post_id", "label", "created_at"])
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and not Path(parsed.database).is_file():
        log.info("feedback store %s does not exist yet: no feedback to merge", url)
        return pd.DataFrame(columns=["post_id", "label", "created_at"])
    from serving.store import read_feedback

    fb = read_feedback(url)
    fb = fb[fb["post_id"].notna() & fb["label"].isin([0, 1])]
    fb = fb.sort_values(["created_at", "id"]).drop_duplicates("post_id", keep="last")
    return fb[["post_id", "label", "created_at"]].reset_index(drop=True)


def _read_table(path: Path) -> pd.DataFrame:
    kind = TABLE_SUFFIXES.get(path.suffix.lower())
    try:
        if kind == "csv":
            return pd.read_csv(path, dtype={"id": str}, keep_default_na=False)
        if kind == "jsonl":
            return pd.read_json(path, lines=True, dtype={"id": str})
        return pd.read_parquet(path)
    except Exception as exc:
        raise RetrainError(f"{path}: cannot read this {kind} file ({exc}); fix or remove it") from exc


def read_variants(variants_dir: Path) -> pd.DataFrame:
    """Every table in `variants_dir` (image paths made relative to it resolved to absolute)."""
    variants_dir = Path(variants_dir)
    frames = []
    files = sorted(p for p in variants_dir.glob("*") if p.suffix.lower() in TABLE_SUFFIXES) \
        if variants_dir.is_dir() else []
    for path in files:
        table = _read_table(path)
        if "id" not in table.columns or not {"text", "image"} & set(table.columns):
            raise RetrainError(f"{path}: needs an 'id' column and a 'text' or 'image' column; "
                               f"it has {', '.join(map(str, table.columns))}")
        table = table.copy()
        table["id"] = table["id"].astype(str)
        table["text"] = table["text"].fillna("").astype(str) if "text" in table else ""
        images = table["image"].fillna("").astype(str) if "image" in table else pd.Series([""] * len(table))
        table["image"] = [str((path.parent / p).resolve()) if p and not Path(p).is_absolute() else p
                          for p in images]
        # An empty cell or a value that is not 0/1 means "no label yet" (feedback may give one).
        label = pd.to_numeric(table["label"], errors="coerce") if "label" in table else np.nan
        table["label"] = pd.Series(label, index=table.index).where(lambda v: v.isin([0, 1]))
        table["source_file"] = path.name
        frames.append(table)
    if not frames:
        return pd.DataFrame(columns=["id", "text", "image", "label", "source_file"])
    return pd.concat(frames, ignore_index=True)


def render_variants(n: int, seed: int, size: int, out_dir: Path) -> pd.DataFrame:
    """`n` new image-only ad posts rendered with `seed` (styles and categories in turn)."""
    from adfilter.sample.build import render_post_image
    from adfilter.sample.categories import CATEGORIES, sensitivity_of
    from adfilter.sample.render import AD_STYLES

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        category, style = CATEGORIES[i % len(CATEGORIES)], AD_STYLES[(i // len(CATEGORIES)) % len(AD_STYLES)]
        path = out_dir / f"variant_{seed}_{i:04d}.png"
        render_post_image(seed, i, category, style, size).save(path)
        rows.append({"id": f"v{seed}_{i:04d}", "text": "", "image": str(path.resolve()), "label": 1,
                     "sensitivity": sensitivity_of(category), "slice": IMAGE_ONLY})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def merge_feedback(
    params: Params,
    raw_dir: Path = Path("data/raw"),
    out_dir: Path | None = None,
    feedback: pd.DataFrame | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Write `out_dir/posts.parquet` (+ `images/`, `merge.json`): the next snapshot's source."""
    rp = params.register.retrain
    raw_dir = Path(raw_dir)
    out_dir = Path(out_dir or rp.incoming_dir)
    if not (raw_dir / POSTS).is_file():
        raise RetrainError(f"{raw_dir / POSTS} not found: retraining starts from the current "
                           f"snapshot; run the ingest stage first (dvc repro ingest)")
    base = pd.read_parquet(raw_dir / POSTS)
    base["image"] = [str(Path(p).resolve()) if p else "" for p in base["image"].fillna("").astype(str)]
    labels = feedback if feedback is not None else read_feedback_labels(rp.feedback_store)
    by_id = dict(zip(labels["post_id"].astype(str), labels["label"].astype(int), strict=True))

    relabelled = base["id"].astype(str).map(by_id)
    changed = relabelled.notna() & (relabelled != base["label"])
    base.loc[changed, "label"] = relabelled[changed].astype(int)
    # A post relabelled clean has no ad sensitivity; one relabelled an ad gets the ingest default.
    base.loc[changed, "sensitivity"] = np.where(base.loc[changed, "label"] == 1, 0.5, 0.0)

    variants = read_variants(Path(rp.variants_dir))
    if len(variants):
        from_feedback = variants["label"].isna() & variants["id"].isin(by_id)
        variants.loc[from_feedback, "label"] = variants.loc[from_feedback, "id"].map(by_id)
    unlabelled = variants[variants["label"].isna()] if len(variants) else variants
    variants = variants[variants["label"].notna()].copy() if len(variants) else variants
    if len(variants):
        variants["label"] = variants["label"].astype(int)
        given = (pd.to_numeric(variants["sensitivity"], errors="coerce") if "sensitivity" in variants
                 else pd.Series(np.nan, index=variants.index))
        variants["sensitivity"] = given.fillna(0.5 * variants["label"]).astype(float)
        if "slice" not in variants:
            variants["slice"] = ""
        variants["slice"] = [
            s if isinstance(s, str) and s else slice_of(bool(t.strip()), bool(im), y == 1, y == 1)
            for s, t, im, y in zip(variants["slice"], variants["text"], variants["image"],
                                   variants["label"], strict=True)
        ]

    out_dir.mkdir(parents=True, exist_ok=True)
    seed = seed if seed is not None else int(dt.date.today().strftime("%Y%m%d"))
    with tempfile.TemporaryDirectory(prefix="adfilter-variants-") as tmp:
        rendered = render_variants(rp.rendered_variants, seed, params.ingest.sample.image_size, Path(tmp))
        merged = pd.concat([base[list(COLUMNS)], variants[list(COLUMNS)] if len(variants) else None,
                            rendered], ignore_index=True)
        merged = merged.drop_duplicates("id", keep="last").reset_index(drop=True)
        images = _copy_images(merged["image"].tolist(), out_dir / "images")
    merged["image"] = images
    merged["text"] = merged["text"].fillna("").astype(str)
    merged.to_parquet(out_dir / POSTS, index=False)

    known = set(base["id"].astype(str)) | set(variants["id"].astype(str) if len(variants) else [])
    report = {
        "posts": len(merged),
        "from_snapshot": len(base),
        "feedback_labels": len(labels),
        "relabelled": int(changed.sum()),
        "unmatched_feedback": int(sum(1 for pid in by_id if pid not in known)),
        "new_labelled_posts": len(variants),
        "unlabelled_variants_skipped": len(unlabelled),
        "rendered_variants": len(rendered),
        "render_seed": seed,
        "ads": int(merged["label"].sum()),
        "written": str(out_dir / POSTS),
    }
    (out_dir / MERGE_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    log.info("merged %d posts into %s: %d relabelled from %d feedback labels (%d unmatched), "
             "%d new labelled posts, %d rendered ad variants", report["posts"], out_dir / POSTS,
             report["relabelled"], report["feedback_labels"], report["unmatched_feedback"],
             report["new_labelled_posts"], report["rendered_variants"])
    return report


def _copy_images(paths: list[str], images_dir: Path) -> list[str]:
    """Copy each image under `images_dir` (unique names); paths relative to its parent."""
    shutil.rmtree(images_dir, ignore_errors=True)
    images_dir.mkdir(parents=True)
    out = []
    for i, src in enumerate(paths):
        if not src:
            out.append("")
            continue
        source = Path(src)
        if not source.is_file():
            out.append(src)  # validate quarantines it, naming the path
            continue
        name = f"{i:06d}_{source.name}"
        shutil.copyfile(source, images_dir / name)
        out.append(f"{images_dir.name}/{name}")
    return out


def merge_step(project: str | Path, conf: Mapping[str, Any], mlflow_run_id: str | None = None) -> dict[str, Any]:
    """merge_feedback in `project`, then point `ingest` at the merged file (the DAG's task)."""
    from tasks import orchestrate

    project = Path(project)
    with contextlib.chdir(project):
        params = load_params("params.yaml")
        report = merge_feedback(params)
        incoming = Path(params.register.retrain.incoming_dir) / POSTS
        orchestrate.set_params("params.yaml", {
            "ingest.source": "path",
            "ingest.path.file": incoming.as_posix(),
            "ingest.path.format": "parquet",
            "ingest.path.columns": {c: c for c in COLUMNS},
        })
    if mlflow_run_id:
        orchestrate.tag_run(project, mlflow_run_id, {
            "retrain.reason": conf.get("reason"), "retrain.shift": conf.get("shift"),
            "retrain.window": conf.get("window"), "retrain.merge": report,
        })
    return report


# --------------------------------------------------------------------------- fine-tune


def _warm_start_callback(state: Mapping[str, Any], source: str) -> Any:
    from lightning.pytorch.callbacks import Callback

    class WarmStart(Callback):
        """Loads the champion's weights into the freshly built net before the first step."""

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            try:
                pl_module.net.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise RetrainError(
                    f"the weights of {source} do not fit the net params.yaml builds now (model "
                    f"params or feature sizes changed since it was trained): {str(exc)[:600]}; "
                    f"run ad_filter_train for a fresh model instead"
                ) from exc
            log.info("warm start: loaded %d tensors from %s", len(state), source)

    return WarmStart()


def finetune(
    params: Params,
    init_dir: Path,
    features_dir: Path = Path("data/features"),
    featurizer_dir: Path = Path("artifacts/featurizer"),
    out_dir: Path = Path("artifacts/model"),
    report_path: Path = Path("reports/train.json"),
    mlflow_run_id: str | None = None,
    source: str = "",
) -> dict[str, Any]:
    """Fine-tune the weights in `init_dir` (train's `model.ckpt` + `config.json`) on the features."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import MLFlowLogger

    from adfilter.config import flatten
    from adfilter.versioning import provenance
    from models.net import INPUT_NAMES, OUTPUT_NAMES, count_parameters
    from tasks.train import (
        INPUT_CONVENTIONS,
        EpochHistory,
        apply_overrides,
        calibrate_checkpoint,
        datamodule_from_params,
        fit_model,
        read_feature_dims,
    )

    started = time.perf_counter()
    init_dir, out_dir = Path(init_dir), Path(out_dir)
    for name in ("model.ckpt", "config.json"):
        if not (init_dir / name).is_file():
            raise RetrainError(f"{init_dir / name} not found: the champion's checkpoint artifact is incomplete")
    champion_config = json.loads((init_dir / "config.json").read_text())
    ckpt = torch.load(init_dir / "model.ckpt", map_location="cpu", weights_only=True)
    state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    # Fine-tune the raw ad head; Platt scaling is fitted afresh on val afterwards.
    state.update(ad_logit_scale=torch.ones(()), ad_logit_bias=torch.zeros(()))
    rp = params.register.retrain
    overrides = dict(champion_config.get("overrides") or {})
    base_lr = float(overrides.get("lr", params.train.lr))
    overrides["lr"] = base_lr * rp.lr_factor
    tuned = apply_overrides(params, overrides)
    L.seed_everything(params.seed, workers=True, verbose=False)

    datamodule = datamodule_from_params(tuned, Path(features_dir))
    sizes = datamodule.input_sizes()
    feature_dims = read_feature_dims(Path(featurizer_dir), sizes)
    logger = MLFlowLogger(experiment_name=params.mlflow.experiment, tracking_uri=params.mlflow.tracking_uri,
                          run_id=mlflow_run_id, log_model=False,
                          tags={"stage": "finetune", "profile": params.profile})
    prov = provenance()
    warm = {"from": source or str(init_dir), "champion_epoch": ckpt.get("epoch"),
            "lr": overrides["lr"], "lr_factor": rp.lr_factor, "epochs": rp.epochs}
    with contextlib.suppress(Exception):  # params already logged by an earlier try of this run
        logger.log_hyperparams({**flatten(to_dict(tuned)), **flatten({"warm_start": warm})})
    config = {
        "feature_dims": feature_dims, "image_size": sizes["image_size"],
        "max_seq_tokens": sizes["max_seq_tokens"], "input_names": list(INPUT_NAMES),
        "output_names": list(OUTPUT_NAMES), "inputs": INPUT_CONVENTIONS,
        "score_weights": to_dict(params.model.score_weights), "threshold": params.model.threshold,
        "overrides": overrides, "provenance": prov, "warm_start": warm,
    }
    with tempfile.TemporaryDirectory(prefix="adfilter-finetune-") as tmp:
        module, trainer = fit_model(
            params, datamodule, overrides=overrides, max_epochs=rp.epochs, logger=logger,
            callbacks=[_warm_start_callback(state, warm["from"])], checkpoint_dir=Path(tmp),
            config=config, enable_progress_bar=False,
        )
        checkpoint = next(c for c in trainer.callbacks if isinstance(c, ModelCheckpoint))
        best = torch.load(checkpoint.best_model_path or checkpoint.last_model_path,
                          map_location="cpu", weights_only=False)
    slim = {k: best[k] for k in ("state_dict", "epoch", "global_step", "pytorch-lightning_version", "adfilter")
            if k in best}
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(slim, out_dir / "model.ckpt")
    calibration = calibrate_checkpoint(params, module.net, slim, datamodule, out_dir / "model.ckpt")
    parameters = {"total": count_parameters(module.net)}
    (out_dir / "config.json").write_text(
        json.dumps({**module.config, "parameter_count": parameters}, indent=2, default=str) + "\n")
    history = next(c for c in trainer.callbacks if isinstance(c, EpochHistory)).history
    best_value = checkpoint.best_model_score
    report = {
        "epochs": len(history), "max_epochs": rp.epochs, "warm_start": warm,
        "seconds_this_run": round(time.perf_counter() - started, 1),
        "best": {"epoch": int(slim.get("epoch", -1)), "monitor": checkpoint.monitor,
                 "value": None if best_value is None else float(best_value)},
        "history": history, "parameter_count": parameters, "overrides": overrides,
        "calibration": calibration,
        "train_posts": len(datamodule.datasets["train"]), "val_posts": len(datamodule.datasets["val"]),
        "mlflow_run_id": logger.run_id, "data_version": prov.get("data_version"),
    }
    report_path = Path(report_path)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    log.info("fine-tuned %s for %d epochs (lr %.3g) in %.1f s; wrote %s and %s", warm["from"],
             len(history), overrides["lr"], report["seconds_this_run"], out_dir, report_path)
    return report


def finetune_step(project: str | Path, mlflow_run_id: str | None = None) -> dict[str, Any]:
    """Fine-tune the champion in its own process and record it as the train stage's output;
    without a champion, train from scratch (`dvc repro train`)."""
    from tasks import orchestrate
    from tasks.register import CHAMPION, CHECKPOINT, _alias_version, _client, artifact_of_version

    project = Path(project)
    with contextlib.chdir(project):
        params = load_params("params.yaml")
        champion = _alias_version(_client(params), params.mlflow.registered_model, CHAMPION)
        init_dir = artifact_of_version(params, champion, CHECKPOINT) if champion else None
    if init_dir is None:
        log.warning("no champion in the registry: training from scratch instead of fine-tuning")
        return {"warm_start": None, **orchestrate.repro("train", project, mlflow_run_id)}
    started = time.perf_counter()
    source = f"models:/{params.mlflow.registered_model}/{champion}"
    orchestrate.run_module("tasks.retrain", project,
                           ["finetune", "--init", str(init_dir), "--source", source], mlflow_run_id)
    orchestrate.commit("train", project)
    report = orchestrate.read_report(project, "train.json")
    return {"warm_start": source, "epochs": report.get("epochs"), "best": report.get("best"),
            "seconds": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> None:
    from adfilter.logs import setup_logging

    parser = argparse.ArgumentParser(prog="python -m tasks.retrain", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    sub = parser.add_subparsers(dest="step", required=True)
    sub.add_parser("merge", help="merge feedback and new variants into the next snapshot's source")
    p = sub.add_parser("finetune", help="fine-tune a checkpoint folder on the current features")
    p.add_argument("--init", required=True, help="folder with model.ckpt + config.json (train's output)")
    p.add_argument("--source", default="", help="where the weights came from, for the record")
    args = parser.parse_args(argv)
    setup_logging()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    params = load_params(args.params)
    if args.step == "merge":
        merge_feedback(params)
    else:
        finetune(params, Path(args.init), mlflow_run_id=os.environ.get("ADFILTER_MLFLOW_RUN_ID"),
                 source=args.source)


if __name__ == "__main__":
    main()
