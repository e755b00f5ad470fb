"""The model's inputs as named feature groups, and exact group-level SHAP values over them.

The net reads seven blocks per post (see `models/net.py`); each is one group:

| group          | input        | what it is                                  | modality |
|----------------|--------------|---------------------------------------------|----------|
| `text_branch`  | `token_ids`  | the ALBERT text branch (WordPiece ids)      | text     |
| `tfidf`        | `tfidf`      | TF-IDF word + char, SVD-reduced             | text     |
| `sent_emb`     | `sent_emb`   | MiniLM sentence embedding                   | text     |
| `image_branch` | `image_small`| the EfficientNet image branch (the pixels)  | image    |
| `sift_bow`     | `sift_bow`   | SIFT bag of visual words                    | image    |
| `hsv`          | `hsv`        | HSV colour histogram                        | image    |
| `qr`           | `qr`         | QR-code flag                                | image    |

Why groups and not single values: seven players make exact Shapley values affordable (at most
2^7 = 128 model evaluations per post), every one of them is a part of the model a person can
name, and none of them needs gradients or a model-specific rule (DeepExplainer trips over the
backbones; see API_NOTES). "Absent" means the group takes the value of a baseline: by
default (`drift.background: reference`) a reference post of the same kind (text only, image only
or both) drawn at random for each explained post, which makes the values interventional SHAP
values with the reference set as background distribution (estimated with `draws` baselines per
post); or (`mean`) one fixed row: the mean of each handcrafted block over the reference posts
that have the modality, the tokens of an empty text ([CLS] [SEP]) for the text branch and a
plain image of the reference images' mean colour for the image branch. The reference baseline
is the default because the fixed row is not a typical post: the model scores it lower than
most clean posts, so nearly every attribution would point "toward ad" and the sign would say
nothing. The post's `has_text`/`has_image` flags are never masked, so the explanation stays
inside the kind of post it is.

The groups of a missing modality are null players (the net masks those inputs out), so a
text-only post is explained over its three text groups (2^3 = 8 coalitions) and an image-only
post over its four image groups (16); their other groups get exactly 0.

Posts with more than `max_exact_groups` groups (text + image: seven) can instead get sampled
values: antithetic permutation sampling (each random order of the groups and its reverse; the
marginal contribution of a group where it joins, averaged over the orders), the estimator shap's
PermutationExplainer uses. With 6 orders that is 2 + 6 * 6 = 38 model rows per post instead of
128; each order adds up to output - base, so the values stay additive, and they are unbiased.
The full multimodal net runs at about 100-150 rows/s on 2 cores, which is what makes this matter
for the drift job's 2-minute budget.

Why the enumeration is done here rather than with `shap.explainers.Exact`: shap evaluates one
post at a time (a model call of 8 to 128 rows per post) and compiles its numba kernels on first
use in every process (10-40 s on the 2-core machines, a large part of the drift job's 2-minute
budget). With at most seven players, exact Shapley values are the textbook sum over coalitions
with weights |S|! (k - |S| - 1)! / k!, evaluated here for many posts per model call;
`tests/integration/test_drift_shap_oracle.py` checks them against shap's ExactExplainer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

log = logging.getLogger(__name__)

GROUPS: Final = ("text_branch", "tfidf", "sent_emb", "image_branch", "sift_bow", "hsv", "qr")
GROUP_INPUT: Final = {
    "text_branch": "token_ids",
    "tfidf": "tfidf",
    "sent_emb": "sent_emb",
    "image_branch": "image_small",
    "sift_bow": "sift_bow",
    "hsv": "hsv",
    "qr": "qr",
}
GROUP_MODALITY: Final = {
    "text_branch": "text", "tfidf": "text", "sent_emb": "text",
    "image_branch": "image", "sift_bow": "image", "hsv": "image", "qr": "image",
}
GROUP_LABELS: Final = {
    "text_branch": "text branch (tokens)",
    "tfidf": "TF-IDF",
    "sent_emb": "sentence embedding",
    "image_branch": "image branch (pixels)",
    "sift_bow": "SIFT visual words",
    "hsv": "HSV histogram",
    "qr": "QR flag",
}
DENSE_BLOCKS: Final = ("tfidf", "sent_emb", "sift_bow", "hsv", "qr")
# (has_text, has_image) of the kinds of post; a post with neither is not a post.
PATTERNS: Final = ((True, False), (False, True), (True, True))

Predict = Callable[[Mapping[str, np.ndarray]], np.ndarray]


class ExplainError(ValueError):
    """Arrays that cannot be explained: a missing input, or groups the background lacks."""


def available_groups(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """The groups whose input is present in `arrays` (`image_small` is only in the store's blobs
    when `serve.store.store_image_small` is on)."""
    return [g for g in GROUPS if GROUP_INPUT[g] in arrays]


def make_background(
    reference: Mapping[str, np.ndarray], empty_token_ids: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """One "absent" value per model input (see the module docstring), from reference arrays."""
    has_text = np.asarray(reference["has_text"], dtype=bool)
    has_image = np.asarray(reference["has_image"], dtype=bool)
    out: dict[str, np.ndarray] = {}
    for block in DENSE_BLOCKS:
        x = np.asarray(reference[block], dtype=np.float32)
        rows = has_text if GROUP_MODALITY[block] == "text" else has_image
        out[block] = (x[rows].mean(axis=0) if rows.any() else np.zeros(x.shape[1:])).astype(np.float32)
    width = np.asarray(reference["token_ids"]).shape[1]
    tokens = np.zeros(width, dtype=np.int32)
    if empty_token_ids is not None:
        given = np.asarray(empty_token_ids, dtype=np.int32).reshape(-1)[:width]
        tokens[: len(given)] = given
    out["token_ids"] = tokens
    if "image_small" in reference:
        images = np.asarray(reference["image_small"])
        colour = images[has_image].reshape(-1, 3).mean(axis=0) if has_image.any() else np.full(3, 128.0)
        out["image_small"] = np.broadcast_to(
            np.round(colour).astype(np.uint8), images.shape[1:]
        ).copy()
    return out


@dataclass(frozen=True)
class Explanation:
    """SHAP values of posts over `groups`: `values[i, g]`, with `base[i] + values[i].sum() ==
    output[i]` (the model's output on the whole post; exact up to float rounding)."""

    values: np.ndarray              # (posts, groups) float64
    base: np.ndarray                # (posts,) the output with every group absent (mean over baselines)
    output: np.ndarray              # (posts,) the output on the post itself
    groups: tuple[str, ...]
    evaluations: int                # model rows evaluated
    baselines: np.ndarray           # (posts, draws) reference rows used as "absent"; -1 = the mean row


class GroupExplainer:
    """Exact Shapley values of `predict` over the feature groups of each post.

    "Absent" is either one fixed background row (`background`, from `make_background`), or,
    when `baselines` (reference rows) are given, a reference post of the same kind drawn at
    random for each post (`draws` of them, averaged). The second is interventional SHAP with the
    reference as the background distribution, estimated with `draws` samples per post: its base
    value is a typical reference post's output rather than the output on an average vector, so
    the sign of a group's value says whether it makes the post look more or less like an ad
    than the reference does."""

    def __init__(
        self,
        predict: Predict,
        background: Mapping[str, np.ndarray],
        groups: Sequence[str] = GROUPS,
        batch_size: int = 256,
        baselines: Mapping[str, np.ndarray] | None = None,
        draws: int = 1,
        seed: int = 0,
        max_exact_groups: int = 7,
        permutations: int = 8,
    ) -> None:
        unknown = [g for g in groups if g not in GROUP_INPUT]
        if unknown:
            raise ExplainError(f"unknown feature group(s) {unknown}; known: {', '.join(GROUPS)}")
        missing = [GROUP_INPUT[g] for g in GROUPS if GROUP_INPUT[g] not in background]
        if missing:
            raise ExplainError(f"the background lacks {missing}; build it with make_background")
        self.predict = predict
        self.background = {k: np.asarray(v) for k, v in background.items()}
        self.groups = tuple(groups)
        self.batch_size = max(1, batch_size)
        self.baselines = None if baselines is None else {k: np.asarray(v) for k, v in baselines.items()}
        if self.baselines is not None:
            lacking = [k for k in ("has_text", "has_image", *self.background) if k not in self.baselines]
            if lacking:
                raise ExplainError(f"the baseline rows lack {lacking}")
        self.draws = max(1, draws) if baselines is not None else 1
        self.seed = seed
        self.max_exact_groups = max_exact_groups
        self.permutations = max(2, permutations + permutations % 2)  # antithetic pairs
        self.evaluations = 0

    def explain(self, arrays: Mapping[str, np.ndarray], progress: bool = False) -> Explanation:
        """Explain every post of `arrays` (feature arrays as the featurizer or the store give
        them). Groups outside `self.groups` take the baseline's value throughout."""
        need = ["has_text", "has_image", *(GROUP_INPUT[g] for g in self.groups)]
        missing = [k for k in need if k not in arrays]
        if missing:
            raise ExplainError(f"feature arrays lack {missing} needed by groups {list(self.groups)}")
        has_text = np.asarray(arrays["has_text"], dtype=bool).reshape(-1)
        has_image = np.asarray(arrays["has_image"], dtype=bool).reshape(-1)
        n = len(has_text)
        values = np.zeros((n, len(self.groups)))
        base = np.zeros(n)
        output = np.zeros(n)
        chosen = np.full((n, self.draws), -1, dtype=np.int64)
        rng = np.random.default_rng(self.seed)
        start = self.evaluations
        for text, image in PATTERNS:
            rows = np.flatnonzero((has_text == text) & (has_image == image))
            active = [g for g in self.groups
                      if (GROUP_MODALITY[g] == "text" and text) or (GROUP_MODALITY[g] == "image" and image)]
            if not len(rows) or not active:
                continue
            posts = {GROUP_INPUT[g]: np.asarray(arrays[GROUP_INPUT[g]])[rows] for g in active}
            picks, fill = self._baselines_for(len(rows), text, image, rng)
            if picks is not None:
                chosen[rows] = picks.reshape(len(rows), self.draws)
            k = len(active)
            n_rows = len(rows) * self.draws
            if k <= self.max_exact_groups:
                masks = np.tile(np.arange(1 << k), (n_rows, 1))
                f = self._outputs(posts, active, text, image, fill, masks, progress)
                phi, empty, full = shapley_values(f), f[:, 0], f[:, -1]
            else:
                order = _antithetic_orders(n_rows, k, self.permutations, rng)
                masks = _chain_masks(order)
                f = self._outputs(posts, active, text, image, fill, masks, progress)
                phi = _permutation_values(f, order)
                empty, full = f[:, 0], f[:, -1]
            cols = [self.groups.index(g) for g in active]
            values[np.ix_(rows, cols)] = phi.reshape(len(rows), self.draws, k).mean(axis=1)
            base[rows] = empty.reshape(len(rows), self.draws).mean(axis=1)
            output[rows] = full.reshape(len(rows), self.draws).mean(axis=1)
        return Explanation(values, base, output, self.groups, self.evaluations - start, chosen)

    def _baselines_for(
        self, n_posts: int, text: bool, image: bool, rng: np.random.Generator
    ) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        """The "absent" value of every input for each (post, draw): reference rows of the same
        kind of post, or the fixed background row."""
        n = n_posts * self.draws
        if self.baselines is None:
            return None, {k: np.broadcast_to(v, (n, *v.shape)) for k, v in self.background.items()}
        bt = self.baselines["has_text"].astype(bool)
        bi = self.baselines["has_image"].astype(bool)
        candidates = np.flatnonzero((bt == text) & (bi == image))
        if not len(candidates):
            log.warning("no reference post has has_text=%s, has_image=%s; those posts are "
                        "explained against the mean background", text, image)
            return None, {k: np.broadcast_to(v, (n, *v.shape)) for k, v in self.background.items()}
        picks = candidates[rng.integers(0, len(candidates), n)]
        return picks, {k: self.baselines[k][picks] for k in self.background}

    def _outputs(
        self, posts: Mapping[str, np.ndarray], active: Sequence[str], text: bool, image: bool,
        fill: Mapping[str, np.ndarray], masks: np.ndarray, progress: bool,
    ) -> np.ndarray:
        """The model's output for each (post, draw) row and each coalition in its row of
        `masks` (bit j set: group `active[j]` is the post's own value, else the baseline's).
        A coalition that repeats within a row is evaluated once."""
        from tqdm.auto import tqdm

        n_rows, width = masks.shape
        bits = {GROUP_INPUT[g]: j for j, g in enumerate(active)}
        codes = np.arange(n_rows)[:, None] * (1 << len(active)) + masks
        unique, inverse = np.unique(codes.reshape(-1), return_inverse=True)
        row_of, mask_of = unique >> len(active), unique & ((1 << len(active)) - 1)
        out = np.empty(len(unique), dtype=np.float64)
        starts = range(0, len(unique), self.batch_size)
        for s in tqdm(starts, desc=f"SHAP over {len(active)} groups", unit="batch", leave=False,
                      disable=not progress or len(starts) < 20):
            sel = slice(s, s + self.batch_size)
            row, mask = row_of[sel], mask_of[sel]
            post = row // self.draws
            batch: dict[str, np.ndarray] = {}
            for key, values in fill.items():
                absent = values[row]
                if key in bits:
                    own = ((mask >> bits[key]) & 1).astype(bool).reshape((len(row),) + (1,) * (absent.ndim - 1))
                    batch[key] = np.where(own, posts[key][post], absent).astype(absent.dtype, copy=False)
                else:
                    batch[key] = np.ascontiguousarray(absent)
            batch["has_text"] = np.full(len(row), text)
            batch["has_image"] = np.full(len(row), image)
            out[sel] = np.asarray(self.predict(batch), dtype=np.float64).reshape(-1)
        self.evaluations += len(unique)
        return out[inverse].reshape(n_rows, width)


def _antithetic_orders(n_rows: int, k: int, permutations: int, rng: np.random.Generator) -> np.ndarray:
    """(rows, permutations, k) orders of the players: random ones and each one reversed."""
    half = rng.permuted(np.tile(np.arange(k), (n_rows, permutations // 2, 1)), axis=2)
    return np.concatenate([half, half[:, :, ::-1]], axis=1)


def _chain_masks(order: np.ndarray) -> np.ndarray:
    """The coalitions met walking each order: empty first, full last, then the ones between,
    as (rows, 2 + permutations * (k - 1)) masks."""
    n_rows, n_perm, k = order.shape
    steps = np.cumsum(1 << order, axis=2)  # coalition after adding the t-th player
    inner = steps[:, :, :-1].reshape(n_rows, -1)
    return np.concatenate([np.zeros((n_rows, 1), np.int64), np.full((n_rows, 1), (1 << k) - 1),
                           inner], axis=1)


def _permutation_values(f: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Shapley values estimated from the outputs `_chain_masks` laid out: the mean, over the
    orders, of each player's marginal contribution where it joined."""
    n_rows, n_perm, k = order.shape
    empty, full = f[:, :1], f[:, 1:2]
    inner = f[:, 2:].reshape(n_rows, n_perm, k - 1)
    chain = np.concatenate([np.repeat(empty[:, None], n_perm, axis=1), inner,
                            np.repeat(full[:, None], n_perm, axis=1)], axis=2)
    marginal = np.diff(chain, axis=2)  # (rows, perms, k): the contribution of order[..., t]
    values = np.zeros((n_rows, k))
    np.add.at(values, (np.arange(n_rows)[:, None, None], order), marginal)
    return values / n_perm


def shapley_values(f: np.ndarray) -> np.ndarray:
    """Exact Shapley values from the outputs of every coalition: `f` is (posts, 2^k) with bit j of
    the column index marking player j present; returns (posts, k)."""
    n_masks = f.shape[1]
    k = n_masks.bit_length() - 1
    if 1 << k != n_masks:
        raise ValueError(f"expected 2^k coalition outputs per post, got {n_masks}")
    masks = np.arange(n_masks)
    size = np.array([bin(m).count("1") for m in masks])
    weight = np.array([math.factorial(s) * math.factorial(k - s - 1) / math.factorial(k)
                       if s < k else 0.0 for s in size])
    out = np.zeros((f.shape[0], k))
    for j in range(k):
        without = masks[(masks >> j) & 1 == 0]
        out[:, j] = ((f[:, without | (1 << j)] - f[:, without]) * weight[without]).sum(axis=1)
    return out
