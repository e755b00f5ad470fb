"""How far apart two feature-importance distributions are, and how much of that is noise.

The importance distribution of a set of posts is the mean |SHAP value| of each feature group,
normalised to sum to one: the share of the model's attribution each group carries. Two such
distributions `p` (window) and `q` (reference) are compared with the total variation distance

    TVD(p, q) = 1/2 * sum_g |p_g - q_g|  =  max over sets of groups A of |p(A) - q(A)|

which lies in [0, 1]: 0 for identical distributions, 1 for distributions on disjoint groups,
and reads as "the largest share of importance that moved between groups". A shift of 0.15 means
15% of the attribution mass now sits on other groups than in the reference.

The distribution is taken over cells (`attribution_cells`): one per group (`abs`, mean |SHAP|
per group), or two per group (`signed`, the default): the mean part of the group's SHAP value
pushing posts toward "ad" and the mean part pushing them toward "clean". A new ad tactic the
model does not recognise typically shows there first: the ads' "toward ad" evidence shrinks or
moves to other groups while the clean posts' profile stays as it was.

A window is a sample, so its distribution is noisy even when nothing changed. `bootstrap_shift`
resamples the explained posts of both sides to estimate that noise (the standard deviation of
the TVD, and a percentile interval), and `null` resamples the reference alone at the window's
size: the TVD that sampling by itself produces, against which a measured shift can be read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

import numpy as np


def importance_distribution(values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Normalised (weighted) mean |SHAP| per group of `values` (posts x groups).

    A set whose attributions are all zero has no distribution: it gets the uniform one, so the
    distance stays defined (and such a set is reported by its caller, not silently used)."""
    values = np.abs(np.asarray(values, dtype=np.float64))
    if values.ndim != 2:
        raise ValueError(f"SHAP values must be posts x groups, got shape {values.shape}")
    if weights is None:
        mean = values.mean(axis=0) if len(values) else np.zeros(values.shape[1])
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (len(values),) or np.any(w < 0):
            raise ValueError(f"weights must be {len(values)} non-negative numbers, got {w.shape}")
        mean = (w[:, None] * values).sum(axis=0) / max(w.sum(), 1e-300)
    total = mean.sum()
    if not np.isfinite(total) or total <= 0:
        return np.full(values.shape[1], 1.0 / values.shape[1])
    return mean / total


MEASURES: Final = ("signed", "abs")


def attribution_cells(values: np.ndarray, measure: str = "signed") -> np.ndarray:
    """Per-post attribution mass in the cells of the importance distribution.

    `abs`: |SHAP| per group. `signed`: per group, the part of its SHAP value that pushes the
    post toward "ad" and the part that pushes it toward "clean", as two cells (columns
    `[g1+, ..., gk+, g1-, ..., gk-]`). Both keep the total |SHAP| mass; `signed` refines `abs`,
    so its distance is never smaller (merging cells cannot increase a total variation
    distance) and it also sees attribution changing direction: ads the model stops
    recognising move mass from "toward ad" cells to "toward clean" cells even when the groups'
    overall shares stay put."""
    values = np.asarray(values, dtype=np.float64)
    if measure == "abs":
        return np.abs(values)
    if measure == "signed":
        return np.concatenate([np.clip(values, 0.0, None), np.clip(-values, 0.0, None)], axis=1)
    raise ValueError(f"unknown importance measure {measure!r}; known: {', '.join(MEASURES)}")


def cell_names(groups: Sequence[str], measure: str = "signed") -> list[str]:
    if measure == "abs":
        return list(groups)
    return [f"{g}:ad" for g in groups] + [f"{g}:clean" for g in groups]


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """Total variation distance between two distributions over the same groups (see above)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"distributions over different groups: {p.shape} vs {q.shape}")
    return float(0.5 * np.abs(p - q).sum())


@dataclass(frozen=True)
class ShiftEstimate:
    shift: float                    # TVD between the window's and the reference's distribution
    noise: float                    # standard deviation of the TVD over bootstrap resamples
    low: float                      # 5th percentile of the bootstrap TVD
    high: float                     # 95th percentile
    null_mean: float                # mean TVD of reference resamples of the window's size
    null_p95: float                 # ... and its 95th percentile: what sampling alone gives
    resamples: int
    window_posts: int
    reference_posts: int

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _estimate(shift: float, boot: np.ndarray, null: np.ndarray, n_w: int, n_r: int) -> ShiftEstimate:
    """The estimate from the measured shift and its bootstrap and null resamples."""
    return ShiftEstimate(
        shift=shift,
        noise=float(boot.std(ddof=1)) if len(boot) > 1 else 0.0,
        low=float(np.percentile(boot, 5)),
        high=float(np.percentile(boot, 95)),
        null_mean=float(null.mean()),
        null_p95=float(np.percentile(null, 95)),
        resamples=len(boot),
        window_posts=n_w,
        reference_posts=n_r,
    )


def bootstrap_shift(
    window: np.ndarray,
    reference: np.ndarray,
    resamples: int = 200,
    seed: int = 0,
    window_weights: np.ndarray | None = None,
    window_strata: np.ndarray | None = None,
) -> ShiftEstimate:
    """The TVD between `window` and `reference` (SHAP values, posts x groups) with its
    bootstrap noise and the sampling-only null level (see the module docstring).

    `window_weights` / `window_strata` come from `stratified_sample`: the window's posts are
    resampled within their stratum and keep their weights, the reference's are equally weighted.
    It is `bootstrap_shift_by_kind` with every post of one kind (the same draws, the same
    figures)."""
    one_kind_w = np.zeros(len(window), dtype=np.int64)
    one_kind_r = np.zeros(len(reference), dtype=np.int64)
    estimate, _ = bootstrap_shift_by_kind(window, reference, one_kind_w, one_kind_r, resamples,
                                          seed, window_weights, window_strata)
    return estimate


def stratified_sample(
    weights: np.ndarray, size: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Up to `size` rows to explain, and the weight and stratum of each drawn row.

    The window holds every post the deep model scored (weight 1) but only a share of the posts
    the gate decided (weight 1 / share); rows of one weight form a stratum. The budget is shared
    out in proportion to each stratum's total weight (a stratum with fewer rows than its share
    gives all of them and the rest goes to the others), rows are drawn without repetition, and
    each drawn row carries its stratum's total weight divided by the rows drawn from it, so the
    weighted mean over the drawn rows estimates the mean over all traffic."""
    w = np.asarray(weights, dtype=np.float64)
    rng = np.random.default_rng(seed)
    levels = np.unique(w[w > 0])
    members = [np.flatnonzero(w == level) for level in levels]
    mass = np.array([len(m) * level for m, level in zip(members, levels, strict=True)])
    take = np.zeros(len(members), dtype=np.int64)
    budget, open_ = size, np.ones(len(members), dtype=bool)
    while budget > 0 and open_.any():
        share = mass * open_ / (mass * open_).sum()
        want = np.floor(share * budget).astype(np.int64)
        want[np.argmax(share)] += budget - want.sum()  # rounding remainder to the biggest stratum
        room = np.array([len(m) for m in members]) - take
        add = np.minimum(want, room)
        take += add
        budget -= int(add.sum())
        open_ &= take < np.array([len(m) for m in members])
        if add.sum() == 0:
            break
    rows, row_w, row_s = [], [], []
    for s, (m, k) in enumerate(zip(members, take, strict=True)):
        if k == 0:
            continue
        rows.append(np.sort(rng.choice(m, size=int(k), replace=False)))
        row_w.append(np.full(int(k), mass[s] / k))
        row_s.append(np.full(int(k), s))
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64)
    return (np.concatenate(rows).astype(np.int64), np.concatenate(row_w),
            np.concatenate(row_s).astype(np.int64))


def representative_sample(weights: np.ndarray, size: int | None = None, seed: int = 0) -> np.ndarray:
    """Row indices, without repetition, whose unweighted mix stands for the weighted rows.

    The window holds every post the deep model scored (weight 1) but only a share of the posts
    the gate decided (weight 1 / share). Rows are grouped by weight; each group contributes in
    proportion to its total weight, as many rows as the scarcest group allows (and at most
    `size` in all), drawn at random. The result is an equally weighted sample of all traffic
    with no duplicated post, which is what the bootstrap and Evidently's tests assume."""
    w = np.asarray(weights, dtype=np.float64)
    if not len(w) or w.sum() <= 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    levels = np.unique(w[w > 0])
    members = [np.flatnonzero(w == level) for level in levels]
    mass = np.array([len(m) * level for m, level in zip(members, levels, strict=True)])
    scale = min(len(m) / ms for m, ms in zip(members, mass, strict=True))
    if size is not None:
        scale = min(scale, size / mass.sum())
    picked = [rng.choice(m, size=min(len(m), int(round(scale * ms))), replace=False)
              for m, ms in zip(members, mass, strict=True)]
    return np.sort(np.concatenate(picked)).astype(np.int64)


KIND_NAMES: Final = {1: "text_only", 2: "image_only", 3: "text_image"}


def post_kinds(has_text: np.ndarray, has_image: np.ndarray) -> np.ndarray:
    """1 = text only, 2 = image only, 3 = text and image (0 = neither, which no post is)."""
    return np.asarray(has_text, dtype=np.int64) + 2 * np.asarray(has_image, dtype=np.int64)


def _by_kind(window: np.ndarray, weights: np.ndarray, kinds: np.ndarray,
             q: dict[int, np.ndarray]) -> tuple[float, dict[int, tuple[float, float]]]:
    """Weighted mean over kinds of TVD(window's kind distribution, q[kind]), and per kind
    (share of the window's weight, TVD)."""
    total = weights.sum()
    out, parts = 0.0, {}
    for k, qk in q.items():
        m = kinds == k
        share = float(weights[m].sum() / total) if total > 0 else 0.0
        if share == 0.0:
            continue
        tv = total_variation(importance_distribution(window[m], weights[m]), qk)
        parts[k] = (share, tv)
        out += share * tv
    return out, parts


def bootstrap_shift_by_kind(
    window: np.ndarray,
    reference: np.ndarray,
    window_kinds: np.ndarray,
    reference_kinds: np.ndarray,
    resamples: int = 200,
    seed: int = 0,
    window_weights: np.ndarray | None = None,
    window_strata: np.ndarray | None = None,
) -> tuple[ShiftEstimate, dict[str, dict[str, Any]]]:
    """Like `bootstrap_shift`, but the distance is taken within each post kind (text only,
    image only, text and image) and averaged with the kinds' shares of the window's traffic.

    Which groups a post has depends on its kind, so a pooled distribution also moves when the
    traffic's mix of kinds moves, which is a data shift (Evidently's report), not a change in
    how the model weighs what it sees; and changes of opposite sign in two kinds partly cancel
    in a pooled distribution. Kinds the reference lacks are left out (and listed with
    `reference_posts: 0`). The bootstrap resamples each side within kind (and the window
    within its sampling strata); the null draws, per kind, a window of the same effective size
    from the reference's posts of that kind."""
    window = np.abs(np.asarray(window, dtype=np.float64))
    reference = np.abs(np.asarray(reference, dtype=np.float64))
    if window.shape[1:] != reference.shape[1:]:
        raise ValueError(f"window {window.shape} and reference {reference.shape} differ in groups")
    wk, rk = np.asarray(window_kinds), np.asarray(reference_kinds)
    n_w, n_r = len(window), len(reference)
    if not n_w or not n_r:
        raise ValueError("the shift bootstrap needs at least one explained post on each side")
    weights = np.ones(n_w) if window_weights is None else np.asarray(window_weights, dtype=np.float64)
    strata = np.zeros(n_w, dtype=np.int64) if window_strata is None else np.asarray(window_strata)
    shared = [k for k in np.unique(wk) if (rk == k).any()]
    detail: dict[str, dict[str, Any]] = {
        KIND_NAMES.get(int(k), str(k)): {"window_posts": int((wk == k).sum()),
                                         "reference_posts": int((rk == k).sum())}
        for k in np.unique(np.concatenate([wk, rk]))}
    if not shared:
        raise ValueError("the window and the reference have no kind of post in common")
    keep = np.isin(wk, shared)
    window, weights, strata, wk = window[keep], weights[keep], strata[keep], wk[keep]
    ref_rows = {k: np.flatnonzero(rk == k) for k in shared}
    q = {k: importance_distribution(reference[rows]) for k, rows in ref_rows.items()}
    shift, parts = _by_kind(window, weights, wk, q)
    for k, (share, tv) in parts.items():
        detail[KIND_NAMES.get(int(k), str(k))].update(share=round(share, 6), shift=round(tv, 6))
    if resamples <= 0:
        return ShiftEstimate(shift, 0.0, shift, shift, 0.0, 0.0, 0, int(keep.sum()), n_r), detail
    rng = np.random.default_rng(seed)
    cells = [np.flatnonzero((strata == s) & (wk == k)) for s in np.unique(strata) for k in shared]
    cells = [c for c in cells if len(c)]
    eff = {}
    for k in shared:
        w = weights[wk == k]
        eff[k] = max(1, int(round(w.sum() ** 2 / max((w**2).sum(), 1e-300))))
    shares = {k: weights[wk == k].sum() / weights.sum() for k in shared}
    boot = np.empty(resamples)
    null = np.empty(resamples)
    for b in range(resamples):
        rows = np.concatenate([c[rng.integers(0, len(c), len(c))] for c in cells])
        qb = {k: importance_distribution(reference[r[rng.integers(0, len(r), len(r))]])
              for k, r in ref_rows.items()}
        boot[b] = _by_kind(window[rows], weights[rows], wk[rows], qb)[0]
        null[b] = sum(shares[k] * total_variation(
            importance_distribution(reference[r[rng.integers(0, len(r), eff[k])]]), q[k])
            for k, r in ref_rows.items())
    return _estimate(shift, boot, null, int(keep.sum()), n_r), detail
