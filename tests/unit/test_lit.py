"""Training logic: losses, oversampling, overrides, a tiny fit, the batch-size finder, predict."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from adfilter.config import Params, ParamsError, load_params
from models.data import PostFeaturesDataModule, load_npz, oversampling_weights
from models.lit import AdFilterModule, ad_loss
from models.predict import predict_arrays
from models.registry import build_from_spec, net_spec
from tasks.train import (
    TrainError,
    apply_overrides,
    datamodule_from_params,
    fit_model,
    read_best_params,
    resolve_precision,
)
from tests.model_fixtures import write_features


@pytest.fixture
def ci_params(repo_root: Path) -> Params:
    return load_params(repo_root / "params.yaml", profile="ci")


@pytest.fixture
def features(tmp_path: Path) -> Path:
    features_dir, _ = write_features(tmp_path, sizes={"train": 64, "val": 32, "test": 16})
    return features_dir


def _with_train(params: Params, **changes) -> Params:
    return dataclasses.replace(params, train=dataclasses.replace(params.train, **changes))


def test_focal_loss_down_weights_easy_examples(ci_params: Params) -> None:
    logits = torch.tensor([4.0, -4.0, 0.1, -0.2])
    target = torch.tensor([1.0, 0.0, 1.0, 0.0])
    focal = _with_train(ci_params, loss="focal").train
    bce = _with_train(ci_params, loss="bce").train
    torch.testing.assert_close(ad_loss(logits, target, bce),
                               F.binary_cross_entropy_with_logits(logits, target))
    easy, hard = slice(0, 2), slice(2, 4)
    ratio_easy = ad_loss(logits[easy], target[easy], focal) / ad_loss(logits[easy], target[easy], bce)
    ratio_hard = ad_loss(logits[hard], target[hard], focal) / ad_loss(logits[hard], target[hard], bce)
    assert ratio_easy < ratio_hard


def test_oversampling_reaches_the_target_share(features: Path) -> None:
    labels = load_npz(features / "train.npz")["label"]
    weights = oversampling_weights(labels, 0.5)
    assert weights[labels == 1].sum() == pytest.approx(0.5)
    dm = PostFeaturesDataModule(features, batch_size=16, positive_share=0.5, seed=3)
    dm.setup("fit")
    loader = dm.train_dataloader()  # one loader, as in training: its generator moves on per epoch
    drawn = np.concatenate([b["label"].numpy() for _ in range(20) for b in loader])
    assert labels.mean() < 0.4
    assert abs(drawn.mean() - 0.5) < 0.06


def test_overrides_go_through_the_strict_loader(ci_params: Params) -> None:
    tuned = apply_overrides(ci_params, {"lr": 0.002, "dropout": 0.3, "feature_dim": 48,
                                        "train.max_epochs": 1})
    assert (tuned.train.lr, tuned.model.dropout, tuned.model.feature_dim) == (0.002, 0.3, 48)
    assert tuned.train.max_epochs == 1 and tuned.profile == "ci"
    assert tuned.model.vision == ci_params.model.vision
    with pytest.raises(TrainError, match="no key 'train.learning_rate'"):
        apply_overrides(ci_params, {"train.learning_rate": 0.1})
    with pytest.raises(ParamsError, match="'model.feature_dim' must be an integer"):
        apply_overrides(ci_params, {"feature_dim": "wide"})


def test_best_params_keep_only_the_tuned_keys(tmp_path: Path) -> None:
    path = tmp_path / "best_params.json"
    assert read_best_params(path) == {}
    path.write_text(json.dumps({"lr": 1e-4, "dropout": 0.2, "feature_dim": 64, "source": "optuna",
                                "best_value": 0.9}))
    assert read_best_params(path) == {"lr": 1e-4, "dropout": 0.2, "feature_dim": 64}
    path.write_text(json.dumps({"lr": 1e-4}))
    with pytest.raises(TrainError, match="lacks"):
        read_best_params(path)


class TrainLoss(Callback):
    """The loss over the whole train split, in eval mode, before and after the fit."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def _measure(self, trainer, module: AdFilterModule) -> None:
        was_training = module.training
        module.eval()
        batch = dict(trainer.datamodule.datasets["train"].tensors)
        with torch.no_grad():
            self.values.append(float(module._losses(batch)[0]))
        module.train(was_training)

    def on_train_start(self, trainer, module) -> None:
        self._measure(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        self._measure(trainer, module)


def test_a_tiny_fit_lowers_the_loss(ci_params: Params, features: Path, tmp_path: Path) -> None:
    params = _with_train(ci_params, lr=3e-3, warmup_fraction=0.0, max_epochs=3, batch_size=16)
    params = dataclasses.replace(params, model=dataclasses.replace(params.model, dropout=0.0))
    dm = datamodule_from_params(params, features)
    loss = TrainLoss()
    torch.manual_seed(0)
    _, trainer = fit_model(params, dm, callbacks=[loss], enable_progress_bar=False,
                           default_root_dir=tmp_path)
    before, after = loss.values
    assert trainer.current_epoch == 3
    assert after < 0.8 * before
    assert "val_auprc" in trainer.callback_metrics


def test_batch_size_auto_runs_the_finder(
    ci_params: Params, features: Path, tmp_path: Path
) -> None:
    params = _with_train(ci_params, batch_size="auto", max_epochs=1, limit_val_batches=1,
                         batch_finder=dataclasses.replace(ci_params.train.batch_finder,
                                                          init_val=4, max_trials=2,
                                                          steps_per_trial=1))
    dm = datamodule_from_params(params, features)
    assert dm.batch_size == 4
    _, trainer = fit_model(params, dm, limit_train_batches=2, enable_progress_bar=False,
                           default_root_dir=tmp_path)
    # On CPU nothing runs out of memory, so the finder grows until its trials run out: 4, 8.
    assert dm.batch_size == 8
    assert not list(tmp_path.glob(".scale_batch_size*"))
    assert trainer.current_epoch == 1


def test_precision_auto_is_bf16_only_where_the_cpu_runs_it_natively(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import tasks.train as train_module

    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert resolve_precision("auto", "cpu") == ("bf16-mixed" if native else "32")
    assert resolve_precision("32", "cpu") == "32"

    monkeypatch.setattr(train_module, "_cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") == "32"
    with caplog.at_level("WARNING", logger="tasks.train"):
        assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    assert "emulated" in caplog.text

    monkeypatch.setattr(train_module, "_cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16-mixed"


def test_a_bf16_fit_keeps_fp32_weights(
    ci_params: Params, features: Path, tmp_path: Path
) -> None:
    params = _with_train(ci_params, precision="bf16-mixed", max_epochs=1)
    dm = datamodule_from_params(params, features)
    module, trainer = fit_model(params, dm, enable_progress_bar=False, default_root_dir=tmp_path)
    assert str(trainer.precision) == "bf16-mixed"
    assert {p.dtype for p in module.net.parameters()} == {torch.float32}
    assert np.isfinite(float(trainer.callback_metrics["val_loss"]))


def test_drop_modality_is_the_same_as_an_absent_modality(ci_params: Params, features: Path) -> None:
    dm = datamodule_from_params(ci_params, features)
    dims = dm.input_sizes()
    net = build_from_spec(net_spec(ci_params.model, dims["feature_dims"], dims["image_size"],
                                   dims["max_seq_tokens"])).eval()
    arrays = load_npz(features / "val.npz")
    dropped = predict_arrays(net, arrays, batch_size=7, drop_modality="image")
    absent = predict_arrays(net, {**arrays, "has_image": np.zeros(len(arrays["id"]), bool)})
    full = predict_arrays(net, arrays)
    for key in ("p_ad", "sensitivity", "score"):
        np.testing.assert_allclose(dropped[key], absent[key], atol=1e-6)
        assert dropped[key].shape == (len(arrays["id"]),)
    text_only = ~arrays["has_image"]
    np.testing.assert_allclose(dropped["score"][text_only], full["score"][text_only], atol=1e-6)
    assert not np.allclose(dropped["score"][~text_only], full["score"][~text_only])
    with pytest.raises(ValueError, match="drop_modality"):
        predict_arrays(net, arrays, drop_modality="audio")


def test_train_file_replaces_the_train_split(features: Path, tmp_path: Path) -> None:
    arrays = load_npz(features / "test.npz")
    extra = {**arrays, "source": np.array(["gan"] * len(arrays["id"]))}
    np.savez(tmp_path / "augmented.npz", **extra)
    dm = PostFeaturesDataModule(features, train_file=tmp_path / "augmented.npz")
    dm.setup("fit")
    assert len(dm.datasets["train"]) == len(arrays["id"])
    assert len(dm.datasets["val"]) == len(load_npz(features / "val.npz")["id"])
