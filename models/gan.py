"""A conditional GAN over the handcrafted feature groups, for realistic samples of the rare class.

What it learns: the joint distribution of the five handcrafted blocks of a post
(`tfidf`, `sent_emb`, `sift_bow`, `hsv`, `qr`, the net's `HANDCRAFTED` tokens), conditioned on
`(label, sensitivity, has_text, has_image)`. It is trained on both classes of the train split,
because the shared structure (what a sentence embedding or an HSV histogram looks like) is
learnt from every post, and it is asked for ads only.

The generator's heads give every block the form the featurizer gives it, so a sample is a
valid input by construction: `tfidf` is free, `sent_emb` is L2-normalised, `sift_bow` and
`hsv` are histograms (softmax, summing to 1), `qr` is 0 or 1 (a straight-through Bernoulli
draw), and the blocks of an absent modality are zeros, as the featurizer writes them.

Quality is measured against real train posts the GAN never saw (`holdout_fraction`):

- `c2st_auc`: a classifier two-sample test (Lopez-Paz & Oquab, 2017): classifiers tell
  generated from held-out real ads (a logistic regression and gradient-boosted trees; the
  higher cross-validated ROC AUC counts), 0.5 = indistinguishable. Above `max_c2st_auc` no
  sample is used at all.
- `mmd2`: the unbiased squared MMD (RBF kernel, median-distance bandwidth) between generated
  and held-out real ads, beside the same figure for real train ads against the held-out ones
  (`mmd2_real_baseline`), so the number has a scale.
- per sample, `knn_realism`: a sample is kept only when it lies inside the k-nearest-neighbour
  ball of at least one real ad (the "improved precision" of Kynkäänniemi et al., 2019); the
  share kept is reported as `precision`.

Training curves (discriminator and generator loss, mean D output on real and fake, per
epoch) are returned as `history` for the report.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm
from tqdm.auto import tqdm

from adfilter.config import GanParams

log = logging.getLogger(__name__)

# The handcrafted blocks and the modality each belongs to (models.net.HANDCRAFTED's order).
GROUPS: Final = ("tfidf", "sent_emb", "sift_bow", "hsv", "qr")
MODALITY: Final = {"tfidf": "text", "sent_emb": "text", "sift_bow": "image", "hsv": "image",
                   "qr": "image"}  # fmt: skip
HISTOGRAMS: Final = ("sift_bow", "hsv")
COND_DIM: Final = 4  # label, sensitivity, has_text, has_image


class GanError(ValueError):
    """Data the GAN cannot learn from (too few posts, missing blocks)."""


@dataclass(frozen=True)
class Layout:
    """Where each group lives in the concatenated feature vector."""

    widths: dict[str, int]

    @property
    def dim(self) -> int:
        return sum(self.widths.values())

    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for name in GROUPS:
            out[name] = slice(start, start + self.widths[name])
            start += self.widths[name]
        return out

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray]) -> Layout:
        missing = [g for g in GROUPS if g not in arrays]
        if missing:
            raise GanError(f"feature arrays lack the handcrafted block(s) {missing}")
        return cls({g: int(arrays[g].shape[1]) for g in GROUPS})

    def concat(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([np.asarray(arrays[g], np.float32) for g in GROUPS], axis=1)

    def split(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {g: np.ascontiguousarray(x[:, s]) for g, s in self.slices().items()}

    def modality_mask(self, has_text: np.ndarray, has_image: np.ndarray) -> np.ndarray:
        """(N, dim) 1.0 where a group's modality is present."""
        mask = np.zeros((len(has_text), self.dim), np.float32)
        for g, s in self.slices().items():
            present = has_text if MODALITY[g] == "text" else has_image
            mask[:, s] = np.asarray(present, np.float32)[:, None]
        return mask


def conditions(label: np.ndarray, sensitivity: np.ndarray, has_text: np.ndarray,
               has_image: np.ndarray) -> np.ndarray:
    """(N, 4) float32 conditioning vectors."""
    return np.stack([np.asarray(label, np.float32), np.asarray(sensitivity, np.float32),
                     np.asarray(has_text, np.float32), np.asarray(has_image, np.float32)], axis=1)


def histogram_totals(features: np.ndarray, layout: Layout) -> dict[str, np.ndarray]:
    """Per histogram group, the counts behind the real rows' normalised histograms.

    A featurizer histogram is counts / total (keypoints per visual word, pixels per HSV bin):
    the total is the smallest T = k / (smallest non-zero bin), k = 1, 2, ..., that makes every
    bin times T a whole number. Rows where no k up to `max_k` fits keep k = 1.
    """
    max_k = 256
    out = {}
    for g in HISTOGRAMS:
        block = features[:, layout.slices()[g]].astype(np.float64)
        block = block[(block > 0).any(axis=1)]
        if not len(block):
            continue
        smallest = np.where(block > 0, block, np.inf).min(axis=1)
        totals = np.round(1.0 / smallest)
        open_rows = np.arange(len(block))
        for k in range(1, max_k + 1):
            if not len(open_rows):
                break
            t = np.round(k / smallest[open_rows])
            scaled = block[open_rows] * t[:, None]
            fits = (np.abs(scaled - np.round(scaled)) < 1e-2 * np.maximum(1.0, t[:, None] / 1e4)).all(axis=1)
            totals[open_rows[fits]] = t[fits]
            open_rows = open_rows[~fits]
        out[g] = np.clip(totals, 1, 1e7).astype(np.float32)
    return out


class Generator(nn.Module):
    """MLP from noise + condition to the five blocks, each in the featurizer's form.

    Histograms are drawn as Poisson counts around the softmax output, renormalised, with a
    total drawn from the real rows' totals (`histogram_totals`): a real histogram has exact
    zeros where no keypoint or pixel fell, which a softmax alone never gives and any
    two-sample test would notice. Gradients pass straight through the draw.
    """

    def __init__(self, layout: Layout, noise_dim: int, hidden: int,
                 totals: Mapping[str, np.ndarray] | None = None) -> None:
        super().__init__()
        self.layout = layout
        self.noise_dim = noise_dim
        self.totals = {g: torch.as_tensor(v, dtype=torch.float32) for g, v in (totals or {}).items()}
        self.body = nn.Sequential(
            nn.Linear(noise_dim + COND_DIM, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, 2 * hidden), nn.LayerNorm(2 * hidden), nn.LeakyReLU(0.2),
        )
        self.heads = nn.ModuleDict({g: nn.Linear(2 * hidden, w) for g, w in layout.widths.items()})

    def forward(self, z: Tensor, cond: Tensor) -> Tensor:
        h = self.body(torch.cat([z, cond], dim=1))
        parts = []
        for g in GROUPS:
            out = self.heads[g](h)
            if g == "sent_emb":
                out = F.normalize(out, dim=1)
            elif g in HISTOGRAMS:
                out = torch.softmax(out, dim=1)
                if g in self.totals and len(self.totals[g]):
                    pick = torch.randint(len(self.totals[g]), (len(out),))
                    counts = torch.poisson(out.detach() * self.totals[g][pick, None])
                    drawn = counts / counts.sum(dim=1, keepdim=True).clamp(min=1.0)
                    out = drawn + out - out.detach()
            elif g == "qr":
                p = torch.sigmoid(out)
                out = torch.bernoulli(p.detach()) + p - p.detach()  # straight-through draw
            present = cond[:, 2:3] if MODALITY[g] == "text" else cond[:, 3:4]
            parts.append(out * present)
        return torch.cat(parts, dim=1)


class Discriminator(nn.Module):
    """Spectral-normalised MLP on standardised features + the condition."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            spectral_norm(nn.Linear(dim + COND_DIM, 2 * hidden)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Linear(2 * hidden, hidden)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Linear(hidden, 1)),
        )

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        return self.net(torch.cat([x, cond], dim=1)).squeeze(1)


@dataclass
class FeatureGAN:
    """A trained generator with the statistics that standardise its inputs, and its history."""

    layout: Layout
    generator: Generator
    mean: np.ndarray
    std: np.ndarray
    history: list[dict[str, float]] = field(default_factory=list)

    @torch.no_grad()
    def sample(self, cond: np.ndarray, seed: int) -> np.ndarray:
        """(N, dim) raw-space features for the conditions `cond` (N, 4)."""
        gen = torch.Generator().manual_seed(seed)
        self.generator.eval()
        c = torch.from_numpy(np.asarray(cond, np.float32))
        out = []
        for start in range(0, len(c), 4096):
            chunk = c[start : start + 4096]
            z = torch.randn(len(chunk), self.generator.noise_dim, generator=gen)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + start)  # the qr and histogram draws
                out.append(self.generator(z, chunk).numpy())
        if not out:
            return np.zeros((0, self.layout.dim), np.float32)
        x = np.concatenate(out)
        # The straight-through draws carry float rounding (0.99999994); give exact values.
        sl = self.layout.slices()
        x[:, sl["qr"]] = np.round(x[:, sl["qr"]])
        for g in HISTOGRAMS:
            block = np.clip(x[:, sl[g]], 0.0, None)
            total = block.sum(axis=1, keepdims=True)
            x[:, sl[g]] = np.where(total > 0, block / np.where(total > 0, total, 1.0), 0.0)
        return x


def train_gan(
    features: np.ndarray,
    cond: np.ndarray,
    layout: Layout,
    params: GanParams,
    seed: int = 0,
    progress: bool = True,
) -> FeatureGAN:
    """Fit the conditional GAN on real rows `features` (N, dim) with conditions `cond` (N, 4)."""
    n = len(features)
    if n < 32:
        raise GanError(f"the GAN needs at least 32 training posts, got {n}; lower augment.mix.gan "
                       f"to 0 for data this small")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    mean = features.mean(axis=0).astype(np.float32)
    std = np.maximum(features.std(axis=0), 1e-3).astype(np.float32)
    x_all = torch.from_numpy(((features - mean) / std).astype(np.float32))
    c_all = torch.from_numpy(np.asarray(cond, np.float32))
    mean_t, std_t = torch.from_numpy(mean), torch.from_numpy(std)

    gen = Generator(layout, params.noise_dim, params.hidden_dim, histogram_totals(features, layout))
    disc = Discriminator(layout.dim, params.hidden_dim)
    opt_g = torch.optim.Adam(gen.parameters(), lr=params.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=params.lr, betas=(0.5, 0.999))
    batch = min(params.batch_size, n)
    history: list[dict[str, float]] = []
    for epoch in tqdm(range(params.epochs), desc="GAN", unit="epoch", disable=not progress):
        order = torch.from_numpy(rng.permutation(n))
        sums = {"d_loss": 0.0, "g_loss": 0.0, "g_moment": 0.0, "d_real": 0.0, "d_fake": 0.0}
        steps = 0
        for start in range(0, n - batch + 1, batch):
            idx = order[start : start + batch]
            real, c = x_all[idx], c_all[idx]
            z = torch.randn(len(idx), params.noise_dim)
            fake = (gen(z, c) - mean_t) / std_t

            d_real, d_fake = disc(real, c), disc(fake.detach(), c)
            # Hinge loss: steadier than the log loss on small tabular data.
            d_loss = F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()

            # Moment matching (per-feature mean and std of the batch, standardised space) on top
            # of the adversarial term: a linear two-sample test sees exactly these moments, and
            # it keeps the generator from collapsing while the discriminator is ahead.
            g_adv = -disc(fake, c).mean()
            g_mom = (fake.mean(0) - real.mean(0)).pow(2).mean() + (fake.std(0) - real.std(0)).pow(2).mean()
            g_loss = g_adv + params.moment_weight * g_mom
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()

            sums["d_loss"] += d_loss.item()
            sums["g_loss"] += g_loss.item()
            sums["g_moment"] += g_mom.item()
            sums["d_real"] += d_real.detach().mean().item()
            sums["d_fake"] += d_fake.detach().mean().item()
            steps += 1
        history.append({"epoch": epoch, **{k: round(v / max(1, steps), 5) for k, v in sums.items()}})
    if history:
        log.info("GAN: %d epochs on %d posts; last epoch %s", params.epochs, n, history[-1])
    return FeatureGAN(layout, gen, mean, std, history)


# --------------------------------------------------------------------------- quality


def quality_space(x: np.ndarray, layout: Layout, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Standardised features with every group weighted equally (each divided by sqrt(width)),
    so distances are not ruled by the widest block."""
    z = (x - mean) / std
    for g, s in layout.slices().items():
        z[:, s] /= math.sqrt(layout.widths[g])
    return z.astype(np.float32)


def c2st_auc(real: np.ndarray, fake: np.ndarray, seed: int = 0, folds: int = 5) -> float:
    """Cross-validated ROC AUC of a logistic regression telling `fake` rows from `real` rows.

    The larger set is subsampled to the smaller one's size, so 0.5 means indistinguishable.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(seed)
    m = min(len(real), len(fake))
    if m < folds * 2:
        raise GanError(f"the two-sample test needs at least {folds * 2} rows per side, got {m}")
    r = real[rng.choice(len(real), m, replace=False)]
    f = fake[rng.choice(len(fake), m, replace=False)]
    x = np.concatenate([r, f])
    y = np.r_[np.zeros(m), np.ones(m)]
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    # Two testers, the stricter one counts: a linear one sees shifted means, the trees see
    # what a linear score cannot (a spread that is too wide or too narrow, wrong sparsity).
    linear = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    trees = HistGradientBoostingClassifier(max_iter=60, max_depth=3, learning_rate=0.1,
                                           random_state=seed)
    # One OpenMP thread: on shared cores the trees' threads spin-wait more than they work.
    with threadpool_limits(1):
        return float(max(np.mean(cross_val_score(clf, x, y, cv=cv, scoring="roc_auc"))
                         for clf in (linear, trees)))


def mmd2(x: np.ndarray, y: np.ndarray, max_rows: int = 2000, seed: int = 0) -> float:
    """Unbiased squared MMD with an RBF kernel whose bandwidth is the median pairwise distance."""
    from sklearn.metrics.pairwise import euclidean_distances

    rng = np.random.default_rng(seed)
    if len(x) > max_rows:
        x = x[rng.choice(len(x), max_rows, replace=False)]
    if len(y) > max_rows:
        y = y[rng.choice(len(y), max_rows, replace=False)]
    if len(x) < 2 or len(y) < 2:
        return float("nan")
    dxx = euclidean_distances(x, x, squared=True)
    dyy = euclidean_distances(y, y, squared=True)
    dxy = euclidean_distances(x, y, squared=True)
    median = float(np.median(np.concatenate([dxx[np.triu_indices(len(x), 1)], dxy.ravel()])))
    gamma = 1.0 / max(median, 1e-12)
    kxx, kyy, kxy = np.exp(-gamma * dxx), np.exp(-gamma * dyy), np.exp(-gamma * dxy)
    n, m = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (n * (n - 1))
                 + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2.0 * kxy.mean())


def knn_realism(real: np.ndarray, fake: np.ndarray, k: int) -> np.ndarray:
    """Bool per fake row: inside the k-NN ball (radius to the k-th nearest real) of some real row."""
    from sklearn.neighbors import NearestNeighbors

    if len(real) <= k:
        raise GanError(f"k-NN realism needs more than k={k} real rows, got {len(real)}")
    nn_real = NearestNeighbors(n_neighbors=k + 1).fit(real)
    radii = nn_real.kneighbors(real)[0][:, -1]  # column 0 is the point itself
    keep = np.zeros(len(fake), dtype=bool)
    for start in range(0, len(fake), 2048):
        chunk = fake[start : start + 2048]
        d2 = ((chunk**2).sum(1)[:, None] - 2.0 * chunk @ real.T + (real**2).sum(1)[None, :])
        keep[start : start + 2048] = (np.sqrt(np.maximum(d2, 0.0)) <= radii[None, :]).any(axis=1)
    return keep


def quality_report(
    gan_mean: np.ndarray,
    gan_std: np.ndarray,
    layout: Layout,
    heldout_real: np.ndarray,
    generated: np.ndarray,
    train_real: np.ndarray,
    params: GanParams,
    seed: int = 0,
) -> dict[str, Any]:
    """C2ST AUC, MMD² (with a real-vs-real baseline) and k-NN precision of `generated` ads
    against held-out real ads; `passed` is the global bar (`max_c2st_auc`)."""
    q = {name: quality_space(x, layout, gan_mean, gan_std)
         for name, x in (("heldout", heldout_real), ("fake", generated), ("train", train_real))}
    auc = c2st_auc(q["heldout"], q["fake"], seed=seed)
    manifold = np.concatenate([q["train"], q["heldout"]])
    precision = float(knn_realism(manifold, q["fake"], params.knn_k).mean())
    return {
        "c2st_auc": round(auc, 4),
        "c2st_classifier": "max of logistic regression (C=0.1, standardised) and gradient-boosted "
                           "trees (60 x depth 3), 5-fold CV ROC AUC",
        "max_c2st_auc": params.max_c2st_auc,
        "mmd2": round(mmd2(q["fake"], q["heldout"], seed=seed), 6),
        "mmd2_real_baseline": round(mmd2(q["train"], q["heldout"], seed=seed), 6),
        "knn_precision": round(precision, 4),
        "knn_k": params.knn_k,
        "n_heldout_real": int(len(heldout_real)),
        "n_generated": int(len(generated)),
        "passed": bool(auc <= params.max_c2st_auc),
    }


def nearest_rows(reference: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Index of the nearest `reference` row for every query row (Euclidean)."""
    from sklearn.neighbors import NearestNeighbors

    return NearestNeighbors(n_neighbors=1).fit(reference).kneighbors(queries)[1][:, 0]


def draw_conditions(
    sensitivity: np.ndarray, has_text: np.ndarray, has_image: np.ndarray, n: int,
    boost: float, rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the real ads drawn, their conditions as ads): ads are drawn with weight
    1 + boost * sensitivity, so sensitive ads are asked for more often."""
    w = 1.0 + boost * np.asarray(sensitivity, np.float64)
    idx = rng.choice(len(w), size=n, replace=True, p=w / w.sum())
    return idx, conditions(np.ones(n), sensitivity[idx], has_text[idx], has_image[idx])


def summarize_history(history: Sequence[Mapping[str, float]], points: int = 20) -> list[dict[str, float]]:
    """At most `points` evenly spaced epochs of the training curve (the last one included)."""
    if len(history) <= points:
        return [dict(h) for h in history]
    picks = np.unique(np.linspace(0, len(history) - 1, points).round().astype(int))
    return [dict(history[i]) for i in picks]
