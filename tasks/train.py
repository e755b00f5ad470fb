"""Stage `train`: the multimodal net, fitted with Lightning on the featurize stage's arrays.

Reads `data/features/{train,val}.npz`, `artifacts/featurizer/meta.json` and, when the tuning
stage has written it, `reports/best_params.json` (its `lr`, `dropout` and `feature_dim`
override params.yaml). Writes:

- `artifacts/model/model.ckpt`: the best epoch's weights (monitor `train.early_stopping`), a
  Lightning checkpoint without optimiser state, with the config below under `adfilter`;
- `artifacts/model/config.json`: the net's spec (name + constructor arguments), the resolved
  params, feature dims, input conventions and provenance; `models.predict.load_net` reads it;
- `reports/train.json`: epochs, seconds per epoch, best validation metrics, parameter count.

Checkpoints (best + last) live in `artifacts/checkpoints/lightning/`. A run that was killed resumes from
its `last.ckpt` when started again with the same params and features (and continues the same
MLflow run); any other start begins afresh. `ADFILTER_MLFLOW_RUN_ID` (or `mlflow_run_id`)
makes the run log into an existing MLflow run, e.g. the one an Airflow DAG run created.

Several devices or nodes: set `train.strategy: ddp` and `train.devices`; Lightning relaunches
this module once per extra process, hence the `__main__` guard.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    TQDMProgressBar,
)
from lightning.pytorch.loggers import Logger, MLFlowLogger
from lightning.pytorch.tuner import Tuner
from lightning.pytorch.utilities import rank_zero_only

from adfilter.config import Params, flatten, load_params, params_from_dict, to_dict
from adfilter.versioning import content_hash, provenance
from models.calibration import IDENTITY, CalibrationError, calibration_report, fit_platt
from models.data import PostFeaturesDataModule
from models.lit import MONITOR_MODE, AdFilterModule
from models.net import INPUT_NAMES, OUTPUT_NAMES, count_parameters, net_inputs
from models.registry import build_from_spec, net_spec, rebuild_spec

log = logging.getLogger(__name__)

RUN_ID_ENV = "ADFILTER_MLFLOW_RUN_ID"
# What `reports/best_params.json` may set, and where each value goes in params.yaml.
TUNED_KEYS: dict[str, str] = {
    "lr": "train.lr",
    "dropout": "model.dropout",
    "feature_dim": "model.feature_dim",
}
RUN_STATE = "run.json"
CKPT_SUBDIR = "lightning"  # ModelCheckpoint wants a folder of its own
INPUT_CONVENTIONS = {
    "token_ids": "int64 [B, L], WordPiece ids of the normalised text, 0 = padding",
    "image": "float32 [B, 3, S, S], RGB in [0, 1] (image_small / 255, NCHW); mean/std inside",
    "tfidf": "float32 [B, D]", "sent_emb": "float32 [B, 384]", "sift_bow": "float32 [B, D]",
    "hsv": "float32 [B, D]", "qr": "float32 [B, 1]",
    "has_text": "bool [B]", "has_image": "bool [B]",
}


class TrainError(RuntimeError):
    """Inputs that do not fit together: features vs featurizer, overrides vs params."""


# --------------------------------------------------------------------------- params


def untuned_values(params: Params) -> dict[str, Any]:
    """`lr`, `dropout` and `feature_dim` as params.yaml sets them."""
    return {"lr": params.train.lr, "dropout": params.model.dropout,
            "feature_dim": params.model.feature_dim}


def apply_overrides(params: Params, overrides: Mapping[str, Any] | None) -> Params:
    """`params` with `overrides` applied: tuned names (`lr`, ...) or dotted keys (`train.lr`).

    The result goes through the same strict loader as params.yaml, so a wrong key or type
    fails naming it.
    """
    if not overrides:
        return params
    data = to_dict(params)
    for key, value in overrides.items():
        path = TUNED_KEYS.get(key, key).split(".")
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                raise TrainError(
                    f"override '{key}': no section '{part}' in params; use one of "
                    f"{', '.join(TUNED_KEYS)} or a dotted params.yaml key such as train.lr"
                )
            node = node[part]
        if path[-1] not in node:
            raise TrainError(
                f"override '{key}': params.yaml has no key '{'.'.join(path)}'; use one of "
                f"{', '.join(TUNED_KEYS)} or a dotted params.yaml key such as train.lr"
            )
        node[path[-1]] = value
    data["profile"] = "default"  # the profile is already applied; keep the loader from re-applying
    merged = params_from_dict(data, source="overrides", profile="default")
    return dataclasses.replace(merged, profile=params.profile)


def read_best_params(path: Path) -> dict[str, Any]:
    """The tuned values in `path` (other keys there describe the study and are not params)."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    missing = [k for k in TUNED_KEYS if k not in data]
    if missing:
        raise TrainError(f"{path}: lacks {missing}; re-run the tune stage (dvc repro tune)")
    return {k: data[k] for k in TUNED_KEYS}


def read_feature_dims(featurizer_dir: Path, sizes: Mapping[str, Any]) -> dict[str, int]:
    """The featurizer's `feature_dims`, checked against the arrays actually in train.npz."""
    meta_path = featurizer_dir / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: run the featurize stage first")
    declared = json.loads(meta_path.read_text(encoding="utf-8")).get("feature_dims", {})
    found = sizes["feature_dims"]
    # The featurizer also declares the image side and the sequence length it wrote.
    shapes = {"image_small": sizes["image_size"], "token_ids": sizes["max_seq_tokens"]}
    wrong = {k: (declared.get(k), v) for k, v in found.items() if declared.get(k) != v}
    wrong |= {k: (declared[k], v) for k, v in shapes.items() if k in declared and declared[k] != v}
    if wrong:
        raise TrainError(
            f"{meta_path} and the feature arrays disagree on widths (meta, npz): {wrong}; "
            f"re-run the featurize stage so both come from one fit"
        )
    return dict(found)


def configure_threads(params: Params) -> int:
    """torch threads per process: `train.num_threads`, or the cores shared by the processes."""
    train = params.train
    if train.num_threads > 0:
        threads = train.num_threads
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        processes = train.devices if isinstance(train.devices, int) else 1
        threads = max(1, (cores or 1) // max(1, processes))
    torch.set_num_threads(threads)
    return threads


def _uses_cuda(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()


def _cpu_has_native_bf16() -> bool:
    """oneDNN runs bf16 matmuls natively here (AVX512-BF16 or AMX), not emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(requested: str, accelerator: str) -> str:
    """`train.precision` as Lightning takes it; `auto` picks mixed precision where it pays.

    On a GPU: bf16-mixed where the card supports it, else 16-mixed. On a CPU: bf16-mixed
    when the CPU runs bf16 natively (a 2-core AVX512-BF16 machine trains the default net
    about 1.5x faster per step), else 32, because emulated bf16 is slower than fp32.
    Weights, calibration, export and serving stay fp32 either way.
    """
    if requested != "auto":
        if requested == "bf16-mixed" and not _uses_cuda(accelerator) and not _cpu_has_native_bf16():
            log.warning("train.precision bf16-mixed on a CPU without native bf16: emulated, "
                        "likely slower than 32")
        return requested
    if _uses_cuda(accelerator):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if _cpu_has_native_bf16() else "32"


# --------------------------------------------------------------------------- callbacks


class EpochHistory(Callback):
    """Seconds and validation metrics per epoch; saved in checkpoints, so kept across resumes.

    An epoch is recorded when its validation ends, before ModelCheckpoint (always the last
    callback) saves, so `last.ckpt` of epoch k already holds epoch k's row.
    """

    KEYS = ("val_loss", "val_auprc", "val_auroc", "val_f1", "val_precision", "val_recall",
            "val_sens_mae")

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []
        self.start_epoch: int | None = None
        self._t0 = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_epoch = trainer.current_epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def _record(self, trainer: L.Trainer) -> None:
        if self.history and self.history[-1]["epoch"] == trainer.current_epoch:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in self.KEYS}
        self.history.append({"epoch": trainer.current_epoch,
                             "seconds": round(time.perf_counter() - self._t0, 2), **metrics})
        log.info("epoch %d: %s", trainer.current_epoch, self.history[-1])

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._record(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer)  # an epoch without validation
        loss = trainer.callback_metrics.get("train_loss_epoch")
        if loss is not None:
            self.history[-1]["train_loss"] = float(loss)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))


# --------------------------------------------------------------------------- one fit


def datamodule_from_params(
    params: Params,
    features_dir: Path,
    train_subset: np.ndarray | None = None,
    train_file: Path | None = None,
) -> PostFeaturesDataModule:
    train = params.train
    batch = train.batch_finder.init_val if train.batch_size == "auto" else train.batch_size
    return PostFeaturesDataModule(
        features_dir, batch_size=batch, num_workers=train.num_workers,
        oversample=train.oversample, positive_share=train.positive_share, seed=params.seed,
        train_subset=train_subset, train_file=train_file,
    )


def fit_model(
    params: Params,
    datamodule: PostFeaturesDataModule,
    overrides: Mapping[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
    max_epochs: int | None = None,
    limit_train_batches: int | float | None = None,
    limit_val_batches: int | float | None = None,
    logger: Logger | bool = False,
    checkpoint_dir: Path | None = None,
    ckpt_path: str | Path | None = None,
    config: Mapping[str, Any] | None = None,
    enable_progress_bar: bool = True,
    default_root_dir: Path | None = None,
) -> tuple[AdFilterModule, L.Trainer]:
    """Build the net from `params` (+ `overrides`) and fit it once; the tuning stage's entry.

    `checkpoint_dir` adds best + last checkpoints there; without it nothing is written.
    Early stopping follows `train.early_stopping`. `callbacks` come first (e.g. Optuna's
    pruning callback, which reads the metric `tune.metric`, logged here as `val_auprc`).
    """
    params = apply_overrides(params, overrides)
    train = params.train
    configure_threads(params)
    if _uses_cuda(train.accelerator):
        torch.set_float32_matmul_precision("high")
    precision = resolve_precision(train.precision, train.accelerator)
    if precision != train.precision:
        log.info("train.precision auto -> %s", precision)

    sizes = datamodule.input_sizes()
    spec = net_spec(params.model, sizes["feature_dims"], sizes["image_size"],
                    sizes["max_seq_tokens"])
    net = build_from_spec(spec)
    full_config = {"net": rebuild_spec(spec, net), "params": to_dict(params), **(config or {})}
    module = AdFilterModule(net, train, params.model.threshold, config=full_config)

    monitor = train.early_stopping.monitor
    mode = MONITOR_MODE[monitor]
    all_callbacks: list[Callback] = [
        *callbacks,
        EarlyStopping(monitor=monitor, mode=mode, patience=train.early_stopping.patience,
                      min_delta=train.early_stopping.min_delta),
    ]
    if not any(isinstance(c, EpochHistory) for c in all_callbacks):
        all_callbacks.append(EpochHistory())
    if logger:
        all_callbacks.append(LearningRateMonitor(logging_interval="step"))
    if enable_progress_bar:
        all_callbacks.append(TQDMProgressBar(refresh_rate=max(1, train.log_every_n_steps)))
    if checkpoint_dir is not None:
        # Two callbacks: `save_last` alone writes last.ckpt only in epochs that improve `best`,
        # and a run killed after a worse epoch would lose it.
        all_callbacks += [
            ModelCheckpoint(dirpath=checkpoint_dir, filename="best", monitor=monitor, mode=mode,
                            save_top_k=1, enable_version_counter=False),
            ModelCheckpoint(dirpath=checkpoint_dir, filename="last", monitor=None, save_top_k=1,
                            enable_version_counter=False),
        ]

    trainer = L.Trainer(
        max_epochs=max_epochs if max_epochs is not None else train.max_epochs,
        accelerator=train.accelerator,
        devices=train.devices,
        strategy=train.strategy,
        num_nodes=train.num_nodes,
        precision=precision,
        callbacks=all_callbacks,
        logger=logger,
        gradient_clip_val=train.gradient_clip_val or None,
        limit_train_batches=(limit_train_batches if limit_train_batches is not None
                             else train.limit_train_batches),
        limit_val_batches=(limit_val_batches if limit_val_batches is not None
                           else train.limit_val_batches),
        log_every_n_steps=train.log_every_n_steps,
        num_sanity_val_steps=0,
        enable_checkpointing=checkpoint_dir is not None,
        enable_progress_bar=enable_progress_bar,
        enable_model_summary=False,
        default_root_dir=default_root_dir,
    )
    if train.batch_size == "auto" and ckpt_path is None:
        finder = train.batch_finder
        found = Tuner(trainer).scale_batch_size(
            module, datamodule=datamodule, mode=finder.mode, init_val=finder.init_val,
            max_trials=finder.max_trials, steps_per_trial=finder.steps_per_trial,
        )
        log.info("batch-size finder chose %s", found)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module, trainer


# --------------------------------------------------------------------------- the stage


def _fingerprint(params: Params, datamodule: PostFeaturesDataModule) -> str:
    resolved = to_dict(params)
    files = [datamodule.split_path(split) for split in ("train", "val")]
    basis = {
        "seed": resolved["seed"], "model": resolved["model"], "train": resolved["train"],
        "features": [str(f) for f in files] + [content_hash([f], f.parent) for f in files],
    }
    return hashlib.sha256(json.dumps(basis, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_state(checkpoint_dir: Path) -> dict[str, Any]:
    path = checkpoint_dir / RUN_STATE
    return json.loads(path.read_text()) if path.is_file() else {}


@rank_zero_only
def _write_state(checkpoint_dir: Path, state: Mapping[str, Any]) -> None:
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    tmp = checkpoint_dir / f".{RUN_STATE}.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(checkpoint_dir / RUN_STATE)


def _resume_point(
    resume: bool | str | Path, checkpoint_dir: Path, fingerprint: str
) -> tuple[Path | None, dict[str, Any]]:
    """The checkpoint to resume from (or None) and the interrupted run's state."""
    if isinstance(resume, (str, Path)):
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"resume checkpoint {path} not found")
        return path, {}
    state = _read_state(checkpoint_dir)
    last = checkpoint_dir / CKPT_SUBDIR / "last.ckpt"
    if resume and state.get("fingerprint") == fingerprint and not state.get("complete") \
            and last.is_file():
        return last, state
    if resume and last.is_file():
        why = "it finished" if state.get("complete") else "params or features changed"
        log.info("not resuming from %s: %s; starting afresh", last, why)
    return None, {}


def _slim_checkpoint(best: Path, dest: Path) -> dict[str, Any]:
    """`best` without optimiser, scheduler and loop state: what inference needs, and smaller."""
    ckpt = torch.load(best, map_location="cpu", weights_only=False)
    keep = ("state_dict", "epoch", "global_step", "pytorch-lightning_version", "adfilter")
    slim = {k: ckpt[k] for k in keep if k in ckpt}
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(slim, dest)
    return slim


def _val_raw_logits(net: torch.nn.Module, datamodule: PostFeaturesDataModule) -> np.ndarray:
    """The ad head's logits on val, before any Platt scaling."""
    net.set_calibration(IDENTITY.scale, IDENTITY.bias)
    logits = []
    net.eval()
    with torch.inference_mode():
        for batch in datamodule.val_dataloader():
            logits.append(net(*net_inputs(batch))[0].float().cpu().numpy())
    return np.concatenate(logits) if logits else np.zeros(0, np.float32)


def calibrate_checkpoint(params: Params, net: torch.nn.Module, slim: dict[str, Any],
               datamodule: PostFeaturesDataModule, ckpt_path: Path) -> dict[str, Any]:
    """Fit Platt scaling of the best epoch's ad head on val; store it in `ckpt_path`'s weights."""
    state = {k.removeprefix("net."): v for k, v in slim["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state)
    if params.train.calibration == "none":
        return {"method": "none", **IDENTITY.to_dict()}
    if not hasattr(net, "set_calibration"):
        reason = f"{type(net).__name__} has no set_calibration(scale, bias)"
        log.warning("no Platt scaling: %s", reason)
        return {"method": "none", "reason": reason, **IDENTITY.to_dict()}
    logits = _val_raw_logits(net, datamodule)
    labels = datamodule.datasets["val"].labels
    try:
        platt = fit_platt(logits, labels)
    except CalibrationError as exc:
        log.warning("no Platt scaling (%s); the ad head stays as trained", exc)
        return {"method": "none", "reason": str(exc), **IDENTITY.to_dict()}
    net.set_calibration(platt.scale, platt.bias)
    slim["state_dict"]["net.ad_logit_scale"] = net.ad_logit_scale.detach().clone()
    slim["state_dict"]["net.ad_logit_bias"] = net.ad_logit_bias.detach().clone()
    torch.save(slim, ckpt_path)
    report = {"method": "platt", **calibration_report(logits, labels, platt)}
    log.info("Platt scaling on val: scale %.3f, bias %.3f; log loss %.4f -> %.4f, ECE %.4f -> %.4f",
             platt.scale, platt.bias, report["log_loss_before"], report["log_loss_after"],
             report["ece_before"], report["ece_after"])
    return report


def train(
    params: Params,
    features_dir: Path = Path("data/features"),
    featurizer_dir: Path = Path("artifacts/featurizer"),
    out_dir: Path = Path("artifacts/model"),
    best_params_path: Path = Path("reports/best_params.json"),
    checkpoint_dir: Path = Path("artifacts/checkpoints"),
    report_path: Path = Path("reports/train.json"),
    mlflow_run_id: str | None = None,
    resume: bool | str | Path = True,
    train_file: Path | None = None,
) -> dict[str, Any]:
    """Fit the net and write the model, its config and `reports/train.json` (returned).

    `train_file` replaces `features_dir/train.npz` (e.g. `data/augmented/train.npz`).
    `resume`: True resumes an interrupted run of the same params and features from
    `checkpoint_dir/lightning/last.ckpt`; False always starts afresh; a path resumes from that file.
    """
    started = time.perf_counter()
    features_dir, featurizer_dir, out_dir = Path(features_dir), Path(featurizer_dir), Path(out_dir)
    checkpoint_dir = Path(checkpoint_dir)
    overrides = read_best_params(Path(best_params_path))
    params = apply_overrides(params, overrides)
    if overrides:
        log.info("overrides from %s: %s", best_params_path, overrides)
    L.seed_everything(params.seed, workers=True, verbose=False)

    datamodule = datamodule_from_params(params, features_dir, train_file=train_file)
    sizes = datamodule.input_sizes()
    feature_dims = read_feature_dims(featurizer_dir, sizes)
    fingerprint = _fingerprint(params, datamodule)
    ckpt_path, state = _resume_point(resume, checkpoint_dir, fingerprint)
    if ckpt_path is None and rank_zero_only.rank == 0 and checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir)
    if ckpt_path is not None:
        log.info("resuming from %s", ckpt_path)

    run_id = mlflow_run_id or os.environ.get(RUN_ID_ENV) or state.get("mlflow_run_id")
    logger = MLFlowLogger(
        experiment_name=params.mlflow.experiment, tracking_uri=params.mlflow.tracking_uri,
        run_id=run_id, log_model=False, tags={"stage": "train", "profile": params.profile},
    )
    prov = provenance()
    hyper = {**flatten(to_dict(params)), **flatten({"provenance": prov}),
             **flatten({"feature_dims": feature_dims})}
    if ckpt_path is None or not run_id:
        logger.log_hyperparams(hyper)
    _write_state(checkpoint_dir, {"fingerprint": fingerprint, "complete": False,
                                  "mlflow_run_id": logger.run_id if rank_zero_only.rank == 0 else None})

    config = {
        "feature_dims": feature_dims,
        "image_size": sizes["image_size"],
        "max_seq_tokens": sizes["max_seq_tokens"],
        "input_names": list(INPUT_NAMES),
        "output_names": list(OUTPUT_NAMES),
        "inputs": INPUT_CONVENTIONS,
        "score_weights": to_dict(params.model.score_weights),
        "threshold": params.model.threshold,
        "overrides": overrides,
        "provenance": prov,
    }
    module, trainer = fit_model(params, datamodule, logger=logger,
                                checkpoint_dir=checkpoint_dir / CKPT_SUBDIR,
                                ckpt_path=ckpt_path, config=config,
                                default_root_dir=checkpoint_dir)
    if not trainer.is_global_zero:
        return {}

    checkpoint = next(c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.monitor)
    latest = next(c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and not c.monitor)
    best_path = Path(checkpoint.best_model_path or latest.best_model_path)
    slim = _slim_checkpoint(best_path, out_dir / "model.ckpt")
    calibration = calibrate_checkpoint(params, module.net, slim, datamodule, out_dir / "model.ckpt")
    history = next(c for c in trainer.callbacks if isinstance(c, EpochHistory))
    best_epoch = int(slim.get("epoch", -1))
    best_row = next((r for r in history.history if r["epoch"] == best_epoch), {})
    seconds = [r["seconds"] for r in history.history]
    parameters = {"total": count_parameters(module.net), "vision": count_parameters(module.net.vision),
                  "text": count_parameters(module.net.text)}
    parameters["fusion_and_heads"] = parameters["total"] - parameters["vision"] - parameters["text"]
    full_config = {**module.config, "parameter_count": parameters}
    (out_dir / "config.json").write_text(json.dumps(full_config, indent=2, default=str) + "\n")

    report = {
        "epochs": len(history.history),
        "max_epochs": trainer.max_epochs,
        "stopped_early": len(history.history) < (trainer.max_epochs or 0),
        "start_epoch": history.start_epoch,
        "resumed_from": str(ckpt_path) if ckpt_path else None,
        "seconds_per_epoch": seconds,
        "mean_seconds_per_epoch": round(float(np.mean(seconds)), 2) if seconds else None,
        "seconds_this_run": round(time.perf_counter() - started, 1),
        "best": {"epoch": best_epoch, "monitor": checkpoint.monitor,
                 "value": _float(checkpoint.best_model_score), **best_row},
        "history": history.history,
        "parameter_count": parameters,
        "calibration": calibration,
        "batch_size": datamodule.batch_size,
        "train_file": str(datamodule.split_path("train")),
        "train_posts": len(datamodule.datasets["train"]),
        "val_posts": len(datamodule.datasets["val"]),
        "world_size": trainer.world_size,
        "precision": str(trainer.precision),
        "precision_requested": params.train.precision,
        "torch_threads": torch.get_num_threads(),
        "overrides": overrides,
        "mlflow_run_id": logger.run_id,
        "data_version": prov.get("data_version"),
    }
    report_path = Path(report_path)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2) + "\n")

    client = logger.experiment
    client.log_metric(logger.run_id, "parameter_count", parameters["total"])
    for path in (out_dir / "model.ckpt", out_dir / "config.json", report_path):
        client.log_artifact(logger.run_id, str(path), artifact_path="train")
    _write_state(checkpoint_dir, {"fingerprint": fingerprint, "complete": True,
                                  "mlflow_run_id": logger.run_id})
    log.info("best epoch %d (%s = %s); %s, %s, %s written", best_epoch, checkpoint.monitor,
             report["best"]["value"], out_dir / "model.ckpt", out_dir / "config.json", report_path)
    return report


def _float(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def main(argv: list[str] | None = None) -> None:
    from adfilter.logs import setup_logging

    parser = argparse.ArgumentParser(prog="python -m tasks.train", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--mlflow-run-id", default=None,
                        help=f"log into this existing MLflow run (default: ${RUN_ID_ENV})")
    parser.add_argument("--no-resume", action="store_true",
                        help="start afresh even if an interrupted run left a last.ckpt")
    parser.add_argument("--resume-from", default=None, help="resume from this checkpoint file")
    parser.add_argument("--train-file", default=None, type=Path,
                        help="train on this npz instead of data/features/train.npz "
                             "(e.g. data/augmented/train.npz)")
    parser.add_argument("--out-dir", default="artifacts/model", type=Path,
                        help="where model.ckpt and config.json go")
    parser.add_argument("--checkpoint-dir", default="artifacts/checkpoints", type=Path)
    parser.add_argument("--report", default="reports/train.json", type=Path)
    args = parser.parse_args(argv)
    setup_logging()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    resume: bool | str = args.resume_from or not args.no_resume
    train(load_params(args.params), mlflow_run_id=args.mlflow_run_id, resume=resume,
          train_file=args.train_file, out_dir=args.out_dir, checkpoint_dir=args.checkpoint_dir,
          report_path=args.report)


if __name__ == "__main__":
    main()
