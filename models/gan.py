"""A conditional GAN over the handcrafted feature groups, for realistic samples of the rare class.

What it learns: the distribution of the five handcrafted blocks of a post (`tfidf`,
`sent_emb`, `sift_bow`, `hsv`, `qr`, the net's `HANDCRAFTED` tokens) given its kind
`(label, sensitivity, has_text, has_image)` and a real post of that kind to start from: the
generator is conditioned on a real parent and proposes a new point of the class's
distribution near it (a data-augmentation GAN, Antoniou et al., 2018). A generator from
noise alone had to invent ~1,000 correlated features from ~3,000 posts and failed every
two-sample test (ROC AUC 1.00); a parent keeps the sample on the data's manifold and leaves
the GAN to learn which directions of variation real posts of that kind show. It is trained on
both classes of the train split (the shared structure is learnt from every post) and asked
for ads only.

The generator gives every block the form the featurizer gives it (see `Generator`), so a
sample is a valid input by construction; the discriminator tells real rows from variants;
a hinge keeps each variant at least `min_step` standard deviations from its parent, so that
the GAN cannot pass the tests by copying.

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

Next to them, `c2st_auc_real_baseline` runs the same test on the real parents themselves
against the held-out ads (what a perfect generator would score on this data).

Training curves (discriminator and generator loss, the step from the parent, mean D output on
real and fake, per epoch) are returned as `history` for the report.
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
STEPPED: Final = ("tfidf", "sent_emb", "sift_bow", "hsv")  # qr is the parent's
DENSE: Final = ("tfidf", "sent_emb")
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


class Generator(nn.Module):
    """MLP from a real parent post + noise + condition to a variant of the parent.

    Each block moves from the parent's value in the featurizer's own form, by a step bounded by
    `max_step` (standard deviations along a principal direction, or a factor exp(max_step) on a
    histogram bin):

    - `tfidf`: parent + a step along the block's top `basis_dim` principal directions
      (`principal_bases`);
    - `sent_emb`: the same, L2-normalised again;
    - `sift_bow`, `hsv`: every bin of the parent scaled by exp(step) and rounded back to whole
      counts (`requantize`), so the bins where no keypoint or pixel fell stay exact zeros and
      the values stay multiples of 1 / total, as in a real histogram (a softmax gives neither,
      and a two-sample test notices both);
    - `qr`: the parent's flag (a QR code is there or not; the GAN does not invent one).

    The blocks of an absent modality are the parent's, as the featurizer wrote them.
    """

    def __init__(self, layout: Layout, noise_dim: int, hidden: int, mean: np.ndarray,
                 std: np.ndarray, max_step: float, bases: Mapping[str, np.ndarray]) -> None:
        super().__init__()
        self.layout = layout
        self.noise_dim = noise_dim
        self.max_step = float(max_step)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        self.bases = {g: torch.as_tensor(b, dtype=torch.float32) for g, b in bases.items()}
        self.body = nn.Sequential(
            nn.Linear(layout.dim + noise_dim + COND_DIM, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, 2 * hidden), nn.LayerNorm(2 * hidden), nn.LeakyReLU(0.2),
        )
        width = {g: len(self.bases[g]) if g in self.bases else layout.widths[g] for g in STEPPED}
        self.heads = nn.ModuleDict({g: nn.Linear(2 * hidden, width[g]) for g in STEPPED})
        for head in self.heads.values():  # start near the parent: small first steps
            nn.init.normal_(head.weight, std=1e-3)
            nn.init.zeros_(head.bias)

    def forward(self, parent: Tensor, z: Tensor, cond: Tensor) -> Tensor:
        """(N, dim) raw-space variants of the raw-space `parent` rows."""
        h = self.body(torch.cat([(parent - self.mean) / self.std, z, cond], dim=1))
        parts = []
        for g, s in self.layout.slices().items():
            p = parent[:, s]
            if g == "qr":
                out = p
            else:
                step = self.max_step * torch.tanh(self.heads[g](h))
                if g in HISTOGRAMS:
                    out = requantize(p * torch.exp(step), p)
                else:
                    out = p + step @ self.bases[g]
                    if g == "sent_emb":
                        out = F.normalize(out, dim=1)
            # An absent modality keeps the parent's block: what the featurizer writes for no
            # text or no image (zeros, and the margin models' intercepts for an empty text).
            present = (cond[:, 2:3] if MODALITY[g] == "text" else cond[:, 3:4]) > 0.5
            parts.append(torch.where(present, out, p))
        return torch.cat(parts, dim=1)


def requantize(weights: Tensor, parent: Tensor) -> Tensor:
    """`weights` (>= 0, zero where the parent histogram is) as a histogram of as many counts as
    the parent's: a real row is counts / total, so its values are multiples of 1 / total; the
    total is taken as 1 / the parent's smallest non-zero bin (one keypoint or pixel). Rounded
    to whole counts (a bin keeps at least one count where the parent had one), with the
    gradient passed straight through the rounding."""
    smallest = torch.where(parent > 0, parent, torch.full_like(parent, torch.inf)).amin(dim=1, keepdim=True)
    total = torch.where(torch.isfinite(smallest), torch.round(1.0 / smallest), torch.zeros_like(smallest))
    soft = weights / weights.sum(dim=1, keepdim=True).clamp(min=1e-12)
    counts = torch.where(parent > 0, torch.clamp(torch.round(soft.detach() * total), min=1.0),
                         torch.zeros_like(parent))
    hard = counts / counts.sum(dim=1, keepdim=True).clamp(min=1.0)
    return hard + soft - soft.detach()


def principal_bases(features: np.ndarray, present: Mapping[str, np.ndarray], layout: Layout, k: int,
                    fixed_tail: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Per dense block (`tfidf`, `sent_emb`), its top-`k` principal directions scaled by their
    standard deviations (k, width), over the rows that have the block's modality: a step of 1
    along one is one standard deviation of real posts along it, and steps off the data's
    subspace (which a two-sample test spots at once) are impossible.

    The last `fixed_tail[block]` columns of a block take no part (zero loadings): they keep the
    parent's value. The `tfidf` block ends with the margins of supervised n-gram models on the
    post's text; the text a sample stands for is its parent's, and so are those margins."""
    fixed_tail = fixed_tail or {}
    out = {}
    for g in DENSE:
        width = layout.widths[g]
        free = width - int(fixed_tail.get(g, 0))
        if not 0 < free <= width:
            raise GanError(f"{fixed_tail.get(g)} fixed columns do not fit the {width}-wide block {g}")
        block = features[present[MODALITY[g]], layout.slices()[g]][:, :free].astype(np.float64)
        basis = np.zeros((1, width), np.float32)
        if len(block) >= 2:
            centred = block - block.mean(axis=0)
            _, sv, vt = np.linalg.svd(centred, full_matrices=False)
            keep = min(k, len(sv))
            basis = np.zeros((keep, width), np.float32)
            basis[:, :free] = vt[:keep] * (sv[:keep, None] / math.sqrt(len(block) - 1))
        out[g] = basis
    return out


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


def step_size(fake: Tensor, parent: Tensor, std: Tensor, mask: Tensor) -> Tensor:
    """(N,) root-mean-square move of each variant from its parent, in standard deviations, over
    the features of the modalities the post has."""
    d2 = (((fake - parent) / std) ** 2) * mask
    return torch.sqrt(d2.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0) + 1e-12)


@dataclass
class FeatureGAN:
    """A trained generator with the statistics that standardise its inputs, and its history."""

    layout: Layout
    generator: Generator
    mean: np.ndarray
    std: np.ndarray
    history: list[dict[str, float]] = field(default_factory=list)

    @torch.no_grad()
    def sample(self, parents: np.ndarray, cond: np.ndarray, seed: int) -> np.ndarray:
        """(N, dim) raw-space variants of the raw-space `parents` (N, dim) under `cond` (N, 4)."""
        if len(parents) != len(cond):
            raise GanError(f"{len(parents)} parents but {len(cond)} conditions")
        gen = torch.Generator().manual_seed(seed)
        self.generator.eval()
        p = torch.from_numpy(np.asarray(parents, np.float32))
        c = torch.from_numpy(np.asarray(cond, np.float32))
        out = []
        for start in range(0, len(c), 4096):
            chunk = slice(start, start + 4096)
            z = torch.randn(len(c[chunk]), self.generator.noise_dim, generator=gen)
            out.append(self.generator(p[chunk], z, c[chunk]).numpy())
        if not out:
            return np.zeros((0, self.layout.dim), np.float32)
        return np.concatenate(out)


def same_kind_partners(cond: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For every row, a random other row with the same label and modalities (itself when it is
    the only one of its kind): the parent a training step varies for that row's condition."""
    kinds = np.round(cond[:, [0, 2, 3]]).astype(int) @ np.array([4, 2, 1])
    out = np.arange(len(cond))
    for kind in np.unique(kinds):
        rows = np.flatnonzero(kinds == kind)
        out[rows] = rng.permutation(rows)
    return out


def train_gan(
    features: np.ndarray,
    cond: np.ndarray,
    layout: Layout,
    params: GanParams,
    seed: int = 0,
    progress: bool = True,
    fixed_tail: Mapping[str, int] | None = None,
) -> FeatureGAN:
    """Fit the parent-conditioned GAN on real rows `features` (N, dim) with conditions `cond` (N, 4).

    Each step the generator varies real parents of the batch's kinds (same label and
    modalities); the discriminator tells the batch's real rows from the variants. Next to the
    adversarial term the generator minimises a batch moment-matching term and a hinge that keeps
    each variant at least `min_step` standard deviations (RMS) from its parent, without which a
    copy of the parent would be the perfect "realistic sample". `fixed_tail`: see
    `principal_bases`."""
    n = len(features)
    if n < 32:
        raise GanError(f"the GAN needs at least 32 training posts, got {n}; lower augment.mix.gan "
                       f"to 0 for data this small")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    mean = features.mean(axis=0).astype(np.float32)
    std = np.maximum(features.std(axis=0), 1e-3).astype(np.float32)
    x_raw = torch.from_numpy(np.asarray(features, np.float32))
    x_all = torch.from_numpy(((features - mean) / std).astype(np.float32))
    c_all = torch.from_numpy(np.asarray(cond, np.float32))
    mask_all = torch.from_numpy(layout.modality_mask(cond[:, 2] > 0.5, cond[:, 3] > 0.5))
    mean_t, std_t = torch.from_numpy(mean), torch.from_numpy(std)

    present = {"text": np.asarray(cond[:, 2] > 0.5), "image": np.asarray(cond[:, 3] > 0.5)}
    bases = principal_bases(np.asarray(features, np.float32), present, layout, params.basis_dim,
                            fixed_tail)
    gen = Generator(layout, params.noise_dim, params.hidden_dim, mean, std, params.max_step, bases)
    disc = Discriminator(layout.dim, params.hidden_dim)
    opt_g = torch.optim.Adam(gen.parameters(), lr=params.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=params.lr, betas=(0.5, 0.999))
    batch = min(params.batch_size, n)
    history: list[dict[str, float]] = []
    for epoch in tqdm(range(params.epochs), desc="GAN", unit="epoch", disable=not progress):
        order = torch.from_numpy(rng.permutation(n))
        partner = torch.from_numpy(same_kind_partners(cond, rng))
        sums = {"d_loss": 0.0, "g_loss": 0.0, "g_moment": 0.0, "step": 0.0, "d_real": 0.0,
                "d_fake": 0.0}
        steps = 0
        for start in range(0, n - batch + 1, batch):
            idx = order[start : start + batch]
            parent_idx = partner[idx]
            real, c = x_all[idx], c_all[idx]
            z = torch.randn(len(idx), params.noise_dim)
            fake_raw = gen(x_raw[parent_idx], z, c)
            fake = (fake_raw - mean_t) / std_t

            d_real, d_fake = disc(real, c), disc(fake.detach(), c)
            # Hinge loss: steadier than the log loss on small tabular data.
            d_loss = F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()

            # Moment matching (per-feature mean and std of the batch, standardised space): a
            # linear two-sample test sees exactly these moments.
            g_adv = -disc(fake, c).mean()
            g_mom = (fake.mean(0) - real.mean(0)).pow(2).mean() + (fake.std(0) - real.std(0)).pow(2).mean()
            moved = step_size(fake_raw, x_raw[parent_idx], std_t, mask_all[parent_idx])
            g_step = F.relu(params.min_step - moved).mean()
            g_loss = g_adv + params.moment_weight * g_mom + params.step_weight * g_step
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()

            sums["d_loss"] += d_loss.item()
            sums["g_loss"] += g_loss.item()
            sums["g_moment"] += g_mom.item()
            sums["step"] += moved.detach().mean().item()
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
    real_parents: np.ndarray | None = None,
) -> dict[str, Any]:
    """C2ST AUC, MMD² (with a real-vs-real baseline) and k-NN precision of `generated` ads
    against held-out real ads; `passed` is the global bar (`max_c2st_auc`).

    With `real_parents` (the real train ads the samples vary, one per sample) the same test is
    run on them against the held-out ads (`c2st_auc_real_baseline`): what a perfect generator
    would score on this data, and the typical move of a sample from its parent
    (`step_from_parent`, RMS in standard deviations) is reported."""
    q = {name: quality_space(x, layout, gan_mean, gan_std)
         for name, x in (("heldout", heldout_real), ("fake", generated), ("train", train_real))}
    auc = c2st_auc(q["heldout"], q["fake"], seed=seed)
    manifold = np.concatenate([q["train"], q["heldout"]])
    precision = float(knn_realism(manifold, q["fake"], params.knn_k).mean())
    out: dict[str, Any] = {
        "c2st_auc": round(auc, 4),
        "c2st_classifier": "max of logistic regression (C=0.1, standardised) and gradient-boosted "
                           "trees (60 x depth 3), 5-fold CV ROC AUC",
        "max_c2st_auc": params.max_c2st_auc,
    }
    if real_parents is not None:
        q_parents = quality_space(real_parents, layout, gan_mean, gan_std)
        out["c2st_auc_real_baseline"] = round(c2st_auc(q["heldout"], q_parents, seed=seed), 4)
        present = np.abs(real_parents) + np.abs(generated) > 0
        d2 = (((generated - real_parents) / gan_std) ** 2 * present).sum(1) / np.maximum(present.sum(1), 1)
        out["step_from_parent"] = round(float(np.median(np.sqrt(d2))), 4)
    return {
        **out,
        "mmd2": round(mmd2(q["fake"], q["heldout"], seed=seed), 6),
        "mmd2_real_baseline": round(mmd2(q["train"], q["heldout"], seed=seed), 6),
        "knn_precision": round(precision, 4),
        "knn_k": params.knn_k,
        "n_heldout_real": int(len(heldout_real)),
        "n_generated": int(len(generated)),
        "passed": bool(auc <= params.max_c2st_auc),
    }


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
