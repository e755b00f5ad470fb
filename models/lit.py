"""Training logic for the multimodal net: loss, validation metrics and optimisation.

The net comes in as an argument (any module with `MultimodalNet`'s forward); this module
owns only what training adds to it. Validation metrics are torchmetrics objects, so under
DDP they are computed over every process's share of the validation set, not just one.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MetricCollection
from torchmetrics.classification import (
    BinaryAUROC,
    BinaryAveragePrecision,
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
)
from torchvision.ops import sigmoid_focal_loss
from transformers import get_cosine_schedule_with_warmup

from adfilter.config import TrainParams
from models.net import net_inputs

MONITOR_MODE = {"val_loss": "min", "val_auprc": "max"}


def ad_loss(logit: Tensor, target: Tensor, train: TrainParams) -> Tensor:
    if train.loss == "focal":
        return sigmoid_focal_loss(
            logit, target, alpha=train.focal.alpha, gamma=train.focal.gamma, reduction="mean"
        )
    return F.binary_cross_entropy_with_logits(logit, target)


class AdFilterModule(L.LightningModule):
    """`net` + focal (or BCE) loss on the ad head + weighted MSE on the sensitivity head.

    `config` (the resolved params, the net's spec, provenance) is embedded in every checkpoint
    under the key `adfilter`, so a checkpoint says what made it.
    """

    def __init__(
        self,
        net: nn.Module,
        train: TrainParams,
        threshold: float,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.train_params = train
        self.threshold = threshold
        self.config = config or {}
        # p_ad ranks posts (PR/ROC AUC); the decision metrics use the final score > threshold.
        self.val_ranking = MetricCollection(
            {"auprc": BinaryAveragePrecision(), "auroc": BinaryAUROC()}, prefix="val_"
        )
        self.val_decision = MetricCollection(
            {
                "f1": BinaryF1Score(threshold=threshold),
                "precision": BinaryPrecision(threshold=threshold),
                "recall": BinaryRecall(threshold=threshold),
            },
            prefix="val_",
        )
        self.val_sens_mae = MeanAbsoluteError()

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        return self.net(*net_inputs(batch))

    def _losses(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, ...]]:
        outputs = self(batch)
        ad_logit, sensitivity = outputs[0].float(), outputs[1].float()
        ad = ad_loss(ad_logit, batch["label"], self.train_params)
        sens = F.mse_loss(sensitivity, batch["sensitivity"])
        return ad + self.train_params.sensitivity_weight * sens, ad, sens, outputs

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, ad, sens, _ = self._losses(batch)
        n = batch["label"].shape[0]
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        self.log_dict({"train_ad_loss": ad, "train_sens_loss": sens}, on_step=False,
                      on_epoch=True, batch_size=n)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, _, _, (ad_logit, sensitivity, score) = self._losses(batch)
        label = batch["label"].long()
        self.val_ranking.update(torch.sigmoid(ad_logit.float()), label)
        self.val_decision.update(score.float(), label)
        self.val_sens_mae.update(sensitivity.float(), batch["sensitivity"])
        self.log("val_loss", loss, on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=label.shape[0])

    def on_validation_epoch_end(self) -> None:
        metrics = {**self.val_ranking.compute(), **self.val_decision.compute(),
                   "val_sens_mae": self.val_sens_mae.compute()}
        self.log("val_auprc", metrics.pop("val_auprc"), prog_bar=True)
        self.log_dict(metrics)
        for metric in (self.val_ranking, self.val_decision, self.val_sens_mae):
            metric.reset()

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        ad_logit, sensitivity, score = self(batch)
        return {"p_ad": torch.sigmoid(ad_logit), "sensitivity": sensitivity, "score": score}

    def configure_optimizers(self) -> dict[str, Any]:
        train = self.train_params
        # No weight decay on biases, norms and embeddings-as-offsets (the 1-d parameters).
        decay = [p for p in self.net.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.net.parameters() if p.requires_grad and p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": train.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=train.lr,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(train.warmup_fraction * total)
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["adfilter"] = self.config
