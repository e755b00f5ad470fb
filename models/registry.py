"""Nets built by name, the way timm's `create_model` does it.

`params.yaml` names the net (`model.name`) and its backbones; `net_spec` turns the params and
the featurizer's output widths into the name + keyword arguments that `create_model` takes.
That spec is what `artifacts/model/config.json` stores, so a trained net is rebuilt exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from adfilter.config import ModelParams, Params, load_params
from models.net import HANDCRAFTED, MultimodalNet, count_parameters

SENT_EMB_DIM = 384  # all-MiniLM-L6-v2

_MODELS: dict[str, Callable[..., nn.Module]] = {
    "multimodal": MultimodalNet,
}


class UnknownModelError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def list_models() -> list[str]:
    return sorted(_MODELS)


def register_model(name: str, constructor: Callable[..., nn.Module]) -> None:
    if name in _MODELS:
        raise ValueError(f"model '{name}' is already registered")
    _MODELS[name] = constructor


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered net `name` with `kwargs`."""
    if name not in _MODELS:
        raise UnknownModelError(
            f"unknown model '{name}' (params.yaml model.name); known models: "
            f"{', '.join(list_models())}"
        )
    return _MODELS[name](**kwargs)


def net_spec(
    model: ModelParams, feature_dims: Mapping[str, int], image_size: int, max_seq_tokens: int
) -> dict[str, Any]:
    """`{"name": ..., "kwargs": {...}}` for `create_model`, from params and the data's sizes."""
    text = model.text
    return {
        "name": model.name,
        "kwargs": {
            "feature_dims": {k: int(feature_dims[k]) for k in HANDCRAFTED},
            "image_size": int(image_size),
            "max_seq_tokens": int(max_seq_tokens),
            "feature_dim": model.feature_dim,
            "num_heads": model.num_heads,
            "fusion_layers": model.fusion_layers,
            "dropout": model.dropout,
            "vision_backbone": model.vision.backbone,
            "vision_pretrained": model.vision.pretrained,
            "text_pretrained": text.pretrained,
            "text_vocab_size": text.vocab_size,
            "text_embedding_size": text.embedding_size,
            "text_hidden_size": text.hidden_size,
            "text_num_layers": text.num_layers,
            "text_num_heads": text.num_heads,
            "text_intermediate_size": text.intermediate_size,
            "score_weight_ad": model.score_weights.ad,
            "score_weight_sensitivity": model.score_weights.sensitivity,
        },
    }


def build_from_spec(spec: Mapping[str, Any]) -> nn.Module:
    return create_model(spec["name"], **spec["kwargs"])


def rebuild_spec(spec: Mapping[str, Any], net: nn.Module) -> dict[str, Any]:
    """`spec` for rebuilding the built `net` (before loading its weights) with no download:
    no pretrained vision weights, and the text encoder from its own saved config."""
    kwargs = dict(spec["kwargs"])
    kwargs["vision_pretrained"] = False
    kwargs["text_pretrained"] = ""
    kwargs["text_config"] = net.text.encoder.config.to_dict()
    return {"name": spec["name"], "kwargs": kwargs}


def feature_dims_from_params(params: Params) -> dict[str, int]:
    """The handcrafted widths the featurizer makes with `params` (for sizing without data)."""
    image = params.featurize.image
    return {
        "tfidf": params.featurize.text.svd_dim + len(params.featurize.text.margins),
        "sent_emb": SENT_EMB_DIM,
        "sift_bow": image.sift_vocab_size,
        "hsv": math.prod(image.hsv_bins),
        "qr": 1,
    }


def profile_parameter_count(
    params_path: str | Path = "params.yaml", profile: str | None = None
) -> dict[str, int]:
    """Parameters of the net a profile builds, in total and per branch."""
    params = load_params(params_path, profile=profile)
    spec = net_spec(
        params.model,
        feature_dims_from_params(params),
        params.featurize.image.net_image_size,
        params.featurize.text.max_seq_tokens,
    )
    net = build_from_spec(spec)
    total, vision, text = (count_parameters(m) for m in (net, net.vision, net.text))
    return {"total": total, "vision": vision, "text": text, "fusion_and_heads": total - vision - text}
