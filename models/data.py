"""Datasets and loaders over the featurize stage's `data/features/{train,val,test}.npz`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from models.net import HANDCRAFTED

log = logging.getLogger(__name__)

# What a training batch carries: the net's inputs (image still uint8 NHWC) and both targets.
BATCH_KEYS: Final = (
    "token_ids", "image_small", *HANDCRAFTED, "has_text", "has_image", "label", "sensitivity"
)
SPLITS: Final = ("train", "val", "test")


class FeaturesError(ValueError):
    """A features file that does not follow the featurize stage's contract."""


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """All arrays of one split, checked for the keys the net needs and for equal row counts."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the featurize stage first (dvc repro featurize)")
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    missing = [k for k in BATCH_KEYS if k not in arrays]
    if missing:
        raise FeaturesError(f"{path}: missing arrays {missing}; re-run the featurize stage")
    rows = {k: len(v) for k, v in arrays.items()}
    if len(set(rows.values())) != 1:
        raise FeaturesError(f"{path}: arrays are not aligned row by row: {rows}")
    return arrays


class PostFeatures(Dataset):
    """One split's features as tensors, in memory; an item is a dict of `BATCH_KEYS`."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.tensors = {k: torch.from_numpy(np.ascontiguousarray(arrays[k])) for k in BATCH_KEYS}
        self.tensors["label"] = self.tensors["label"].float()
        self.tensors["sensitivity"] = self.tensors["sensitivity"].float()
        self.tensors["token_ids"] = self.tensors["token_ids"].long()
        self.labels = arrays["label"].astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {k: v[index] for k, v in self.tensors.items()}


def oversampling_weights(labels: np.ndarray, positive_share: float) -> np.ndarray:
    """Per-row weights under which a draw is an ad with probability `positive_share`."""
    if not 0.0 < positive_share < 1.0:
        raise ValueError(f"train.positive_share must lie in (0, 1), got {positive_share}")
    n_pos = int((labels == 1).sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return np.ones(len(labels))
    return np.where(labels == 1, positive_share / n_pos, (1.0 - positive_share) / n_neg)


class PostFeaturesDataModule(L.LightningDataModule):
    """Loaders over `features_dir/{train,val,test}.npz`; `train_file` replaces the train split
    (e.g. the augment stage's `data/augmented/train.npz`, same arrays plus provenance columns).

    `batch_size` is a plain attribute because Lightning's batch-size finder rewrites it.
    Oversampling draws `len(train)` rows per epoch with replacement; under DDP Lightning
    wraps the sampler so each process gets its own share.
    """

    def __init__(
        self,
        features_dir: str | Path,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        oversample: bool = True,
        positive_share: float = 0.35,
        seed: int = 0,
        train_subset: np.ndarray | None = None,
        train_file: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.features_dir = Path(features_dir)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.oversample = oversample
        self.positive_share = positive_share
        self.seed = seed
        self.train_subset = train_subset
        self.train_file = Path(train_file) if train_file is not None else None
        self.datasets: dict[str, PostFeatures] = {}

    def split_path(self, split: str) -> Path:
        if split == "train" and self.train_file is not None:
            return self.train_file
        return self.features_dir / f"{split}.npz"

    def input_sizes(self) -> dict[str, object]:
        """Widths of the handcrafted blocks, image side and sequence length, from train.npz."""
        path = self.split_path("train")
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run the featurize stage first")
        with np.load(path, allow_pickle=False) as npz:
            dims = {k: int(npz[k].shape[1]) for k in HANDCRAFTED}
            image_shape = npz["image_small"].shape
            seq_len = int(npz["token_ids"].shape[1])
        return {"feature_dims": dims, "image_size": int(image_shape[1]), "max_seq_tokens": seq_len}

    def setup(self, stage: str | None = None) -> None:
        wanted = ("train", "val") if stage in (None, "fit", "validate") else (stage,)
        for split in wanted:
            if split in self.datasets:
                continue
            arrays = load_npz(self.split_path(split))
            if split == "train" and self.train_subset is not None:
                arrays = {k: v[self.train_subset] for k, v in arrays.items()}
            self.datasets[split] = PostFeatures(arrays)
            log.info("%s: %d posts from %s", split, len(self.datasets[split]),
                     self.split_path(split))

    def train_dataloader(self) -> DataLoader:
        data = self.datasets["train"]
        generator = torch.Generator().manual_seed(self.seed)
        if self.oversample:
            weights = oversampling_weights(data.labels, self.positive_share)
            sampler = WeightedRandomSampler(
                torch.as_tensor(weights, dtype=torch.double), num_samples=len(data),
                replacement=True, generator=generator,
            )
            return DataLoader(data, batch_size=self.batch_size, sampler=sampler,
                              num_workers=self.num_workers, drop_last=len(data) > self.batch_size,
                              persistent_workers=self.num_workers > 0)
        return DataLoader(data, batch_size=self.batch_size, shuffle=True, generator=generator,
                          num_workers=self.num_workers, drop_last=len(data) > self.batch_size,
                          persistent_workers=self.num_workers > 0)

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(self.datasets[split], batch_size=self.eval_batch_size or 2 * self.batch_size,
                          shuffle=False, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
