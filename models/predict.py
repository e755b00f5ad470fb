"""Inference with a trained net: load it from `artifacts/model/`, score feature arrays."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from models.net import net_inputs
from models.registry import build_from_spec

MODALITIES = ("image", "text")


def load_net(model_dir: str | Path = "artifacts/model") -> tuple[nn.Module, dict[str, Any]]:
    """The trained net (eval mode, CPU, float32) and its `config.json`."""
    model_dir = Path(model_dir)
    config_path, ckpt_path = model_dir / "config.json", model_dir / "model.ckpt"
    for path in (config_path, ckpt_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run the train stage first (dvc repro train)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    net = build_from_spec(config["net"])
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state)
    net.eval()
    return net, config


def predict_arrays(
    net: nn.Module,
    arrays: Mapping[str, np.ndarray],
    batch_size: int = 256,
    drop_modality: str | None = None,
) -> dict[str, np.ndarray]:
    """`p_ad`, `sensitivity` and `score` (float32, one per row) for featurizer arrays.

    `drop_modality="image"` scores every post as if it had no image (`has_image` False), and
    `"text"` as if it had no text: the ablations behind the per-modality figures.
    """
    if drop_modality is not None and drop_modality not in MODALITIES:
        raise ValueError(f"drop_modality must be one of {MODALITIES} or None, got {drop_modality!r}")
    n = len(arrays["has_text"])
    device = next(net.parameters()).device
    out: dict[str, list[np.ndarray]] = {"p_ad": [], "sensitivity": [], "score": []}
    was_training = net.training
    net.eval()
    with torch.inference_mode():
        for start in tqdm(range(0, n, batch_size), desc="predict", unit="batch",
                          disable=n <= batch_size, leave=False):
            batch = {k: v[start:start + batch_size] for k, v in arrays.items()
                     if isinstance(v, np.ndarray) and v.dtype.kind != "U" and v.dtype.kind != "O"}
            if drop_modality is not None:
                batch[f"has_{drop_modality}"] = np.zeros(len(batch["has_text"]), dtype=bool)
            ad_logit, sensitivity, score = net(*net_inputs(batch, device))
            out["p_ad"].append(torch.sigmoid(ad_logit).float().cpu().numpy())
            out["sensitivity"].append(sensitivity.float().cpu().numpy())
            out["score"].append(score.float().cpu().numpy())
    net.train(was_training)
    return {k: (np.concatenate(v) if v else np.zeros(0, np.float32)).astype(np.float32)
            for k, v in out.items()}


def predict_split(
    model_dir: str | Path, npz_path: str | Path, drop_modality: str | None = None
) -> pd.DataFrame:
    """One row per post of `npz_path`: id, p_ad, sensitivity, score."""
    net, _ = load_net(model_dir)
    npz_path = Path(npz_path)
    if not npz_path.is_file():
        raise FileNotFoundError(f"{npz_path} not found: run the featurize stage first")
    with np.load(npz_path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    scores = predict_arrays(net, arrays, drop_modality=drop_modality)
    return pd.DataFrame({"id": arrays["id"].astype(str), **scores})
