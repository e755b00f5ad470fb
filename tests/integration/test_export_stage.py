"""`tasks.export.export` on a net trained by `tasks.train.train` on tiny synthetic features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from adfilter.config import Params, params_from_dict
from tests.model_fixtures import write_features

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
AD_WORDS = ["win", "cash", "prize", "call", "now", "free", "offer", "txt"]
CLEAN_WORDS = ["see", "you", "at", "lunch", "tomorrow", "thanks", "mum", "ok"]


def _params(tmp: Path) -> Params:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["mlflow"]["tracking_uri"] = f"sqlite:///{tmp / 'mlflow.db'}"
    ci = raw["profiles"]["ci"]
    ci["train"].update(max_epochs=1, num_threads=1)
    ci["export"].update(latency_repeats=2)
    return params_from_dict(raw, profile="ci")


def _write_splits(features: Path, split_dir: Path) -> None:
    """Split parquets whose ids match the features, with texts that tell ads from clean posts."""
    rng = np.random.default_rng(0)
    split_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        with np.load(features / f"{split}.npz") as npz:
            ids, labels, has_text, slices = npz["id"], npz["label"], npz["has_text"], npz["slice"]
        texts = [
            " ".join(rng.choice(AD_WORDS if y else CLEAN_WORDS, 6)) if t else ""
            for y, t in zip(labels, has_text, strict=True)
        ]
        pd.DataFrame({"id": ids.astype(str), "text": texts, "image": "", "label": labels,
                      "sensitivity": 0.0, "slice": slices.astype(str), "group": np.arange(len(ids))}
                     ).to_parquet(split_dir / f"{split}.parquet")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Params, Path, dict]:
    from tasks.export import export
    from tasks.train import train

    tmp = tmp_path_factory.mktemp("export")
    features, featurizer = write_features(tmp, sizes={"train": 96, "val": 48, "test": 48})
    _write_splits(features, tmp / "data/split")
    params = _params(tmp)
    train(params, features, featurizer, out_dir=tmp / "artifacts/model",
          best_params_path=tmp / "none.json", checkpoint_dir=tmp / "ckpt",
          report_path=tmp / "reports/train.json", resume=False)
    out = tmp / "artifacts/export"
    report = export(params, model_dir=tmp / "artifacts/model", features_dir=features,
                    split_dir=tmp / "data/split", out_dir=out, featurizer_dir=featurizer)
    return params, out, report


def test_parity_holds_on_at_least_min_posts_at_several_batch_sizes(exported) -> None:
    params, out, report = exported
    parity = report["parity"]
    assert parity["ok"] and parity["max_abs_diff"] <= params.export.parity_atol
    # 48 test posts are topped up from val and train to reach 100.
    assert parity["n_posts"] == params.export.parity_posts == 100
    assert parity["sources"] == {"test": 48, "val": 48, "train": 4}
    assert set(parity["max_abs_diff_by_batch_size"]) == {
        str(b) for b in params.export.parity_batch_sizes
    }
    assert params.export.trace_batch_size not in params.export.parity_batch_sizes
    on_disk = json.loads((out / "export.json").read_text())
    assert on_disk["parity"]["max_abs_diff"] == parity["max_abs_diff"]


def test_model_pt_embeds_config_and_answers_like_the_trained_net(exported) -> None:
    from models.net import INPUT_NAMES, net_inputs
    from models.predict import load_net
    from tasks.export import read_embedded_config
    from tests.model_fixtures import synthetic_arrays

    params, out, report = exported
    config = read_embedded_config(out / "model.pt")
    assert config["input_names"] == list(INPUT_NAMES)
    assert config["params"]["profile"] == "ci"
    assert set(config["provenance"]) >= {"data_version", "git_commit"}
    assert config["feature_dims"]["tfidf"] == 16
    assert [s["dtype"] for s in config["inputs"]][-2:] == ["bool", "bool"]

    # A batch of 11 fresh posts (neither the trace batch size nor a parity one).
    net, _ = load_net(out.parent / "model")
    inputs = net_inputs(synthetic_arrays(11, seed=7))
    model = torch.jit.load(str(out / "model.pt"))
    with torch.inference_mode():
        for a, b in zip(net(*inputs), model(*inputs), strict=True):
            assert a.shape == (11,)
            assert float((a - b).abs().max()) <= params.export.parity_atol


def test_fresh_process_check_ran_with_torch_only(exported) -> None:
    _, out, report = exported
    fresh = report["fresh_process"]
    assert fresh["ok"] and fresh["foreign_modules"] == []
    assert fresh["n_posts"] == torch.load(out / "example_inputs.pt")["inputs"]["has_text"].shape[0]


def test_gate_file_exists_loads_and_keeps_its_thresholds(exported) -> None:
    from models.gate import FastTextGate

    _, out, report = exported
    assert (out / "gate.bin").stat().st_size > 0
    gate = FastTextGate.load(out)
    assert (gate.low, gate.high) == (report["gate"]["low"], report["gate"]["high"])
    assert gate.low < gate.high
    p = gate.predict_proba(["win cash prize call now free", "see you at lunch tomorrow mum"])
    assert p[0] > p[1]
    meta = json.loads((out / "gate.json").read_text())
    assert meta["deep_threshold"] == 0.85 and "val" in meta["cascade"]


def test_triton_repository_holds_the_model_and_its_config(exported) -> None:
    _, out, report = exported
    model_dir = out / "triton" / "ad_filter"
    assert (model_dir / "1" / "model.pt").read_bytes() == (out / "model.pt").read_bytes()
    text = (model_dir / "config.pbtxt").read_text()
    assert 'platform: "pytorch_libtorch"' in text and "INPUT__8" in text and "OUTPUT__2" in text
    assert set(report["files"]) >= {"model.pt", "example_inputs.pt", "gate.bin", "gate.json",
                                    "export.json", "triton/ad_filter/config.pbtxt",
                                    "triton/ad_filter/1/model.pt"}
    assert report["latency"]["torchscript_ms_per_post"]["1"] > 0


def test_bundle_carries_its_featurizer(exported) -> None:
    _, out, report = exported
    assert (out / "featurizer" / "meta.json").is_file()
    assert "featurizer/meta.json" in report["files"]
