"""Stage `augment`: a 5-8x larger train set, a held-out obfuscated-ads slice, and the ablation.

Reads `data/split/{train,val,test}.parquet`, `data/features/{train,val,test}.npz` and the fitted
`artifacts/featurizer/` (loaded, never refit). Writes:

- `data/augmented/train.npz`: the train split's arrays (the featurize contract: id, label,
  sensitivity, slice, has_text, has_image, tfidf, sent_emb, sift_bow, hsv, qr, token_ids,
  image_small) for the original posts and every variant, plus `source` (original,
  text_attack, obfuscation, image_transform, gan) and `parent_id` (the post a row was made
  from; an original's own id);
- `data/augmented/heldout_obfuscated.npz`: the `obfuscated_ads_heldout` evaluation slice: test
  ads perturbed with the held-out families of `adfilter.augment.heldout` (never used in
  training), featurised with the fitted pipeline, plus every clean test post unchanged (so a
  false-positive rate can be read on it); the same arrays plus `source`, `parent_id`,
  `families` (the held-out families applied, `+`-joined) and `text` (the raw perturbed text,
  for scorers that read text, such as the baselines and the fastText gate);
- `reports/augmentation.json`: measured expansion factor, rows added per source (and per
  family, recipe or transform), class balance before and after, the GAN's training curve and
  quality figures, the held-out slice's make-up, timings, and `ablation`.

How each source makes a row:

- `text_attack` / `obfuscation`: a new text for a post with text; the text arrays (has_text,
  tfidf, sent_emb, token_ids) come from `FeaturePipeline.featurize_posts` on it, the image
  arrays are the parent's (its image did not change).
- `image_transform`: the parent's image through the torchvision.transforms.v2 pipeline
  (`adfilter.augment.images`), featurised the same way; the text arrays are the parent's.
- `gan`: the five handcrafted blocks come from the parent-conditioned GAN (`models.gan`): it
  varies a real train ad (drawn with weight 1 + `sensitivity_boost` * sensitivity, so that
  sensitive ads are varied more often) into a new point of the ads' feature distribution. A
  GAN sample has no text and no image of its own, so `token_ids` and `image_small` are those
  of the ad it varies, which is also its `parent_id`; `has_text`/`has_image`/`sensitivity`
  are the parent's. The net's raw branches therefore see a real ad while its handcrafted
  tokens see a synthetic one: the GAN adds variety to the handcrafted features only, and says
  so here rather than inventing pixels or token ids it cannot make. Samples are used only
  when the GAN passes its two-sample test, and then only those inside the k-NN ball of a
  real ad.

Originals are always kept. Variants of text and images are made from ads for
`ad_parent_share` of the rows (the rare class), from clean posts for the rest: clean posts
in spammers' spelling are what keeps the false-kill rate down.

The ablation trains a proxy on subsets of the augmented set (no augmentation / text only /
images only / GAN only / all, focal loss and BCE, with and without oversampling), all on the
same split and scored on the same val/test/held-out rows. The proxy is an MLP on the
handcrafted blocks (the same `tfidf`, `sent_emb`, `sift_bow`, `hsv`, `qr` the net reads as
tokens), trained for a fixed number of steps with the net's own loss (`models.lit.ad_loss`,
`train.focal`) and oversampling weights (`models.data.oversampling_weights`): training the
real net 14 x seeds times does not fit a 2-core CPU budget, and a fixed step count makes the
configurations cost the same whatever their size. It does not see `token_ids` or
`image_small`, so it measures what augmentation does through the handcrafted features.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import random
import resource
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import cv2
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from adfilter.augment import (
    ADDED_SOURCES,
    GAN,
    HELDOUT,
    IMAGE_TRANSFORM,
    OBFUSCATION,
    ORIGINAL,
    TEXT_ATTACK,
)
from adfilter.config import AugmentParams, Params, load_params
from adfilter.features.pipeline import FEATURE_ARRAYS, ROW_ARRAYS, FeaturePipeline
from adfilter.features.textnorm import normalize_text
from adfilter.imageio import ImageError, ImageLimits, read_image
from adfilter.logs import setup_logging
from adfilter.schema import HIDDEN_IMAGE_AD
from adfilter.versioning import provenance

log = logging.getLogger(__name__)

CONTRACT: Final = (*ROW_ARRAYS, *FEATURE_ARRAYS)
EXTRA: Final = ("source", "parent_id")
TEXT_KEYS: Final = ("has_text", "tfidf", "sent_emb", "token_ids")
IMAGE_KEYS: Final = ("has_image", "sift_bow", "hsv", "qr", "image_small")
HANDCRAFTED_KEYS: Final = ("tfidf", "sent_emb", "sift_bow", "hsv", "qr")
HELDOUT_FILE: Final = "heldout_obfuscated.npz"
HELDOUT_SLICE: Final = "obfuscated_ads_heldout"
_TAGS: Final = {TEXT_ATTACK: "ta", OBFUSCATION: "ob", IMAGE_TRANSFORM: "im", GAN: "gan"}
_SOURCE_CODE: Final = {s: i + 1 for i, s in enumerate((*ADDED_SOURCES, HELDOUT))}
FEATURIZE_CHUNK: Final = 512

ABLATION_CONFIGS: Final[dict[str, tuple[str, ...]]] = {
    "no_augmentation": (),
    "text_only": (TEXT_ATTACK, OBFUSCATION),
    "images_only": (IMAGE_TRANSFORM,),
    "gan_only": (GAN,),
    "all": ADDED_SOURCES,
}

Arrays = dict[str, np.ndarray]


class AugmentStageError(RuntimeError):
    """Inputs of the augment stage that do not fit together, or an outcome outside params."""


# --------------------------------------------------------------------------- helpers


def _seed(base: int, source: str, row: int, k: int = 0) -> int:
    """A seed for one variant that depends only on what the variant is, not on run order."""
    return (((base * 1_000_003 + _SOURCE_CODE[source]) * 2_000_003 + row) * 97 + k) % (2**31 - 1)


def _load_npz(path: Path) -> Arrays:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the featurize stage first (dvc repro featurize)")
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    missing = [k for k in CONTRACT if k not in arrays]
    if missing:
        raise AugmentStageError(f"{path}: lacks the array(s) {missing}; re-run the featurize stage")
    return arrays


def _read_split(split_dir: Path, name: str) -> pd.DataFrame:
    path = split_dir / f"{name}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the split stage first (dvc repro split)")
    return pd.read_parquet(path)


def _check_aligned(df: pd.DataFrame, arrays: Arrays, name: str) -> None:
    ids = df["id"].astype(str).to_numpy()
    if len(ids) != len(arrays["id"]) or not np.array_equal(ids, arrays["id"].astype(str)):
        raise AugmentStageError(
            f"data/split/{name}.parquet and data/features/{name}.npz are not aligned row by row "
            f"({len(ids)} vs {len(arrays['id'])} rows); re-run `dvc repro featurize`"
        )


def _limits(params: Params) -> ImageLimits:
    v = params.validate
    return ImageLimits(max_bytes=v.max_image_bytes, max_pixels=v.max_image_pixels,
                       min_side=v.min_image_side,
                       formats=tuple(f.upper() for f in v.allowed_image_formats))


def _take(arrays: Arrays, rows: np.ndarray, keys: Iterable[str]) -> Arrays:
    return {k: arrays[k][rows] for k in keys}


def _concat(parts: Sequence[Arrays], keys: Sequence[str]) -> Arrays:
    parts = [p for p in parts if len(p["id"])]
    return {k: np.concatenate([p[k] for p in parts]) for k in keys}


def _part(
    base: Arrays, rows: np.ndarray, new: Arrays, source: str, ids: Sequence[str],
) -> Arrays:
    """Rows of `base` at `rows` with the arrays in `new` replaced, tagged with `source`."""
    keep = [k for k in CONTRACT if k not in new and k != "id"]
    out = _take(base, rows, keep)
    out.update(new)
    out["id"] = np.asarray(ids, dtype=str)
    out["source"] = np.full(len(rows), source)
    out["parent_id"] = base["id"][rows].astype(str)
    return out


def _empty_like(base: Arrays) -> Arrays:
    out = {k: base[k][:0] for k in CONTRACT}
    out["source"] = np.zeros(0, dtype=str)
    out["parent_id"] = np.zeros(0, dtype=str)
    return out


def choose_parents(
    labels: np.ndarray, eligible: np.ndarray, count: int, ad_share: float, rng: np.random.Generator,
) -> np.ndarray:
    """`count` row indices among `eligible` rows, `ad_share` of them ads; each class's rows are
    used in turn (a shuffled cycle), so variants spread evenly over parents. Sorted, so the
    variants of one parent are adjacent."""
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    pos = np.flatnonzero(eligible & (labels == 1))
    neg = np.flatnonzero(eligible & (labels != 1))
    if not len(pos) and not len(neg):
        return np.zeros(0, dtype=np.int64)
    n_pos = round(count * ad_share) if len(pos) and len(neg) else (count if len(pos) else 0)
    picks = []
    for pool, k in ((pos, n_pos), (neg, count - n_pos)):
        if k > 0:
            picks.append(np.resize(rng.permutation(pool), k))
    return np.sort(np.concatenate(picks))


def plan_counts(aug: AugmentParams, n_original: int, available: Mapping[str, bool]) -> dict[str, int]:
    """Rows to add per source: (expansion_factor - 1) * n, split by `mix` over the sources that
    have parents (a source without any gives its share to the others)."""
    from adfilter.augment.text import check_names

    check_names(aug.mix, dict.fromkeys(ADDED_SOURCES), "augment.mix")
    total = max(0, round((aug.expansion_factor - 1.0) * n_original))
    weights = {s: aug.mix.get(s, 0.0) for s in ADDED_SOURCES if available.get(s) and aug.mix.get(s, 0) > 0}
    return _split(total, weights)


def _split(total: int, weights: Mapping[str, float]) -> dict[str, int]:
    """`total` split over `weights` by largest remainder (sums to `total` exactly)."""
    if not weights or total <= 0:
        return dict.fromkeys(weights, 0)
    s = sum(weights.values())
    raw = {k: total * w / s for k, w in weights.items()}
    out = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: raw[k] - out[k], reverse=True)[: total - sum(out.values())]:
        out[k] += 1
    return out


def _featurize_texts(pipeline: FeaturePipeline, texts: list[str], desc: str) -> Arrays:
    chunks = []
    for start in tqdm(range(0, len(texts), FEATURIZE_CHUNK), desc=desc, unit="chunk",
                      disable=not texts):
        batch = texts[start : start + FEATURIZE_CHUNK]
        out = pipeline.featurize_posts(batch, [None] * len(batch))
        chunks.append({k: out[k] for k in TEXT_KEYS})
    return {k: np.concatenate([c[k] for c in chunks]) for k in TEXT_KEYS} if chunks else {}


def _shrink(rgb: np.ndarray, max_side: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    if max(h, w) <= max_side:
        return rgb
    scale = max_side / max(h, w)
    return cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))),
                      interpolation=cv2.INTER_AREA)


def _read(path: Path, limits: ImageLimits, post_id: str) -> np.ndarray:
    try:
        return read_image(path, limits)
    except ImageError as exc:
        raise AugmentStageError(
            f"post {post_id}: image {path} cannot be read ({exc}); the split tables point to "
            f"images under data/raw: re-run `dvc repro ingest validate split featurize`"
        ) from exc


# --------------------------------------------------------------------------- text sources


def text_variants(
    source: str,
    make: Callable[[str, int, int], list[tuple[str, str]]],
    df: pd.DataFrame,
    base: Arrays,
    pipeline: FeaturePipeline,
    count: int,
    ad_share: float,
    seed: int,
    passes: int = 3,
) -> tuple[Arrays, dict[str, Any]]:
    """`count` text variants made by `make(text, n, seed) -> [(variant, family)]`.

    Parents whose text gives fewer variants than asked (too short to change) leave the rest to
    other parents in up to `passes` rounds; whatever is still missing is reported.
    """
    texts = df["text"].fillna("").astype(str).tolist()
    eligible = base["has_text"].astype(bool) & np.array([bool(t.strip()) for t in texts])
    rng = np.random.default_rng(_seed(seed, source, 0))
    rows: list[int] = []
    made: list[str] = []
    families: Counter[str] = Counter()
    used = Counter()
    started = time.perf_counter()
    missing = count
    for round_ in range(passes):
        if missing <= 0:
            break
        parents = choose_parents(base["label"], eligible, missing, ad_share, rng)
        per_parent = Counter(parents.tolist())
        for row, n in tqdm(sorted(per_parent.items()), desc=f"{source} (pass {round_ + 1})",
                           unit="post"):
            for variant, family in make(texts[row], n, _seed(seed, source, row, used[row])):
                rows.append(row)
                made.append(variant)
                families[family] += 1
                used[row] += 1
        missing = count - len(rows)
    make_s = time.perf_counter() - started
    started = time.perf_counter()
    arrays = _featurize_texts(pipeline, made, f"featurize {source}")
    feat_s = time.perf_counter() - started
    rows_arr = np.asarray(rows, dtype=np.int64)
    if not len(rows_arr):
        return _empty_like(base), {"added": 0, "planned": count, "families": {}}
    ids = [f"{base['id'][r]}~{_TAGS[source]}{k}" for r, k in _ordinals(rows)]
    part = _part(base, rows_arr, arrays, source, ids)
    same = sum(normalize_text(v) == normalize_text(texts[r]) for r, v in zip(rows, made, strict=True))
    return part, {
        "added": len(rows_arr),
        "planned": count,
        "shortfall": max(0, count - len(rows_arr)),
        "parents": len(set(rows)),
        "families": dict(sorted(families.items())),
        "normalised_like_parent": int(same),
        "seconds": {"perturb": round(make_s, 2), "featurize": round(feat_s, 2)},
    }


def _ordinals(rows: Sequence[int]) -> list[tuple[int, int]]:
    seen: Counter[int] = Counter()
    out = []
    for r in rows:
        out.append((r, seen[r]))
        seen[r] += 1
    return out


def _obfuscation_maker(params: AugmentParams) -> Callable[[str, int, int], list[tuple[str, str]]]:
    from adfilter.augment.text import Obfuscator

    obfuscator = Obfuscator(params.obfuscation)

    def make(text: str, n: int, seed: int) -> list[tuple[str, str]]:
        rng = random.Random(seed)
        out, seen = [], {text}
        for _ in range(n):
            result = obfuscator.variant(text, rng)
            if result is not None and result[0] not in seen:
                seen.add(result[0])
                out.append((result[0], "+".join(result[1])))
        return out

    return make


def _text_attack_maker(params: AugmentParams, cache_dir: Path) -> Callable[[str, int, int], list[tuple[str, str]]]:
    from adfilter.augment.text import TextAttacker

    attacker = TextAttacker(params.text_attack, cache_dir=cache_dir)
    per_call = max(1, params.text_attack.variants_per_call)

    def make(text: str, n: int, seed: int) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for i in range(0, n, per_call):
            out.extend(attacker.variants(text, min(per_call, n - i), seed + i))
        return out[:n]

    return make


# --------------------------------------------------------------------------- images


def image_variants(
    df: pd.DataFrame,
    base: Arrays,
    pipeline: FeaturePipeline,
    aug: AugmentParams,
    count: int,
    seed: int,
    image_root: Path,
    limits: ImageLimits,
) -> tuple[Arrays, dict[str, Any]]:
    """`count` variants of train images through the v2 pipeline, featurised in batches."""
    from adfilter.augment.images import ImageAugmenter

    augmenter = ImageAugmenter(aug.image)
    paths = df["image"].fillna("").astype(str).tolist()
    eligible = np.array([bool(p) for p in paths]) & base["has_image"].astype(bool)
    rng = np.random.default_rng(_seed(seed, IMAGE_TRANSFORM, 0))
    parents = choose_parents(base["label"], eligible, count, aug.ad_parent_share, rng)
    if not len(parents):
        return _empty_like(base), {"added": 0, "planned": count}
    started = time.perf_counter()
    transform_s = 0.0
    chunks: list[Arrays] = []
    batch: list[np.ndarray] = []
    ordinals = _ordinals(parents.tolist())
    current, rgb = -1, None
    for row, k in tqdm(ordinals, desc="image variants", unit="image"):
        if row != current:
            rgb = _shrink(_read(image_root / paths[row], limits, str(base["id"][row])),
                          aug.image.max_side)
            current = row
        t0 = time.perf_counter()
        with _one_torch_thread():
            batch.append(augmenter.augment(rgb, seed=_seed(seed, IMAGE_TRANSFORM, row, k)))
        transform_s += time.perf_counter() - t0
        if len(batch) >= aug.image.batch_size:
            chunks.append(_featurize_images(pipeline, batch))
            batch = []
    if batch:
        chunks.append(_featurize_images(pipeline, batch))
    arrays = {k: np.concatenate([c[k] for c in chunks]) for k in IMAGE_KEYS}
    ids = [f"{base['id'][r]}~{_TAGS[IMAGE_TRANSFORM]}{k}" for r, k in ordinals]
    part = _part(base, parents, arrays, IMAGE_TRANSFORM, ids)
    changed_qr = int((arrays["qr"][:, 0] != base["qr"][parents, 0]).sum())
    total_s = time.perf_counter() - started
    return part, {
        "added": len(parents),
        "planned": count,
        "parents": len(set(parents.tolist())),
        "transforms": {n: aug.image.transforms[n] for n in augmenter.names},
        "qr_flag_changed": changed_qr,
        "seconds": {"transform": round(transform_s, 2),
                    "read_and_featurize": round(total_s - transform_s, 2)},
    }


def _featurize_images(pipeline: FeaturePipeline, images: list[np.ndarray]) -> Arrays:
    out = pipeline.featurize_posts([""] * len(images), images)
    return {k: out[k] for k in IMAGE_KEYS}


# --------------------------------------------------------------------------- GAN


def _same_kind_rows(pool: np.ndarray, rows: np.ndarray, has_text: np.ndarray,
                    has_image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For every index in `rows`, a random index of `pool` with the same modalities (any of
    `pool` when none has them)."""
    out = np.empty(len(rows), dtype=np.int64)
    for i, r in enumerate(rows):
        same = pool[(has_text[pool] == has_text[r]) & (has_image[pool] == has_image[r])]
        out[i] = rng.choice(same if len(same) else pool)
    return out


def gan_samples(base: Arrays, aug: AugmentParams, count: int, seed: int,
                n_margins: int = 0) -> tuple[Arrays, dict[str, Any]]:
    """`count` GAN ads that pass the quality bar (fewer, or none, when they do not).
    `n_margins`: the margin columns at the end of the tfidf block, which keep the parent's
    value (`models.gan.principal_bases`)."""
    from sklearn.model_selection import train_test_split

    from models import gan as G

    gp = aug.gan
    layout = G.Layout.of(base)
    x = layout.concat(base)
    labels = base["label"].astype(int)
    has_text, has_image = base["has_text"].astype(bool), base["has_image"].astype(bool)
    sens = base["sensitivity"].astype(np.float32)
    cond = G.conditions(labels, sens, has_text, has_image)
    n = len(x)
    if (labels == 1).sum() < 2 * gp.knn_k + 10 or n < 64:
        return _empty_like(base), {"added": 0, "planned": count, "used": False,
                                   "reason": f"too few posts for the GAN ({n}, {(labels == 1).sum()} ads)"}
    started = time.perf_counter()
    train_idx, hold_idx = train_test_split(np.arange(n), test_size=gp.holdout_fraction,
                                           stratify=labels, random_state=seed)
    gan = G.train_gan(x[train_idx], cond[train_idx], layout, gp, seed=seed,
                      fixed_tail={"tfidf": n_margins})
    train_s = time.perf_counter() - started

    hold_ads = hold_idx[labels[hold_idx] == 1]
    train_ads = train_idx[labels[train_idx] == 1]
    if len(hold_ads) < 10:
        return _empty_like(base), {
            "added": 0, "planned": count, "used": False,
            "reason": f"{len(hold_ads)} held-out ads, fewer than the 10 the two-sample test needs; "
                      f"raise augment.gan.holdout_fraction or use more data",
        }
    # The test: variants of train ads the GAN saw, one per held-out ad and of its kind
    # (modalities), against those held-out ads; real train ads against them give the scale.
    rng = np.random.default_rng(seed)
    hold_parents = _same_kind_rows(train_ads, hold_ads, has_text, has_image, rng)
    fake_hold = gan.sample(x[hold_parents], cond[hold_ads], seed=seed + 1)
    quality = G.quality_report(gan.mean, gan.std, layout, x[hold_ads], fake_hold, x[train_ads],
                               gp, seed=seed, real_parents=x[hold_parents])
    report: dict[str, Any] = {
        "planned": count,
        "trained_on": int(len(train_idx)),
        "quality": quality,
        "history": G.summarize_history(gan.history),
        "raw_inputs": "token_ids and image_small of the real train ad the sample varies, which "
                      "is the sample's parent_id",
        "seconds": {"train": round(train_s, 2)},
    }
    log.info("GAN quality: C2ST AUC %.3f (bar %.2f; real train ads %.3f), MMD2 %.5f (real "
             "baseline %.5f), k-NN precision %.2f", quality["c2st_auc"], gp.max_c2st_auc,
             quality["c2st_auc_real_baseline"], quality["mmd2"], quality["mmd2_real_baseline"],
             quality["knn_precision"])
    if not quality["passed"]:
        log.warning("GAN samples rejected: C2ST AUC %.3f > augment.gan.max_c2st_auc %.2f; the gan "
                    "source adds nothing this run", quality["c2st_auc"], gp.max_c2st_auc)
        return _empty_like(base), {**report, "added": 0, "used": False,
                                   "reason": "failed the two-sample test"}

    ads = np.flatnonzero(labels == 1)
    q_ads = G.quality_space(x[ads], layout, gan.mean, gan.std)
    kept_x: list[np.ndarray] = []
    kept_c: list[np.ndarray] = []
    kept_p: list[np.ndarray] = []
    drawn = rejected = 0
    for round_ in range(gp.max_rounds):
        need = count - sum(len(k) for k in kept_x)
        if need <= 0:
            break
        ask = int(need / max(quality["knn_precision"], 0.1) * 1.2) + 8
        pick, c = G.draw_conditions(sens[ads], has_text[ads], has_image[ads], ask, gp.sensitivity_boost, rng)
        fake = gan.sample(x[ads[pick]], c, seed=seed + 100 + round_)
        ok = G.knn_realism(q_ads, G.quality_space(fake, layout, gan.mean, gan.std), gp.knn_k)
        drawn += len(fake)
        rejected += int((~ok).sum())
        kept_x.append(fake[ok][:need])
        kept_c.append(c[ok][:need])
        kept_p.append(ads[pick][ok][:need])
    fake = np.concatenate(kept_x) if kept_x else np.zeros((0, layout.dim), np.float32)
    c = np.concatenate(kept_c) if kept_c else np.zeros((0, G.COND_DIM), np.float32)
    parents = np.concatenate(kept_p) if kept_p else np.zeros(0, dtype=np.int64)
    if not len(fake):
        return _empty_like(base), {**report, "added": 0, "used": False,
                                   "reason": "no sample passed the k-NN realism check"}

    new = {g: v.astype(np.float32) for g, v in layout.split(fake).items()}
    new["label"] = np.ones(len(fake), dtype=np.int64)
    new["sensitivity"] = c[:, 1].astype(np.float32)
    new["has_text"] = c[:, 2] > 0.5
    new["has_image"] = c[:, 3] > 0.5
    ids = [f"{base['id'][r]}~{_TAGS[GAN]}{k}" for r, k in _ordinals(parents.tolist())]
    part = _part(base, parents, new, GAN, ids)
    report["seconds"]["generate"] = round(time.perf_counter() - started - train_s, 2)
    return part, {
        **report,
        "added": int(len(fake)),
        "used": True,
        "drawn": drawn,
        "rejected_knn": rejected,
        "parents": int(len(set(parents.tolist()))),
        "sensitivity_mean": round(float(c[:, 1].mean()), 4),
    }


# --------------------------------------------------------------------------- held-out slice


def heldout_slice(
    params: Params,
    pipeline: FeaturePipeline,
    test_df: pd.DataFrame,
    test: Arrays,
    image_root: Path,
    limits: ImageLimits,
) -> tuple[Arrays, dict[str, Any]]:
    """Test ads through the held-out families (+ every clean test post unchanged)."""
    from adfilter.augment.heldout import TEXT_FAMILIES, HeldoutObfuscator

    hp = params.augment.heldout
    obfuscator = HeldoutObfuscator(hp)
    texts = test_df["text"].fillna("").astype(str).tolist()
    paths = test_df["image"].fillna("").astype(str).tolist()
    slices = test_df["slice"].astype(str).tolist()
    ads = np.flatnonzero(test["label"] == 1)
    rows: list[int] = []
    out_texts: list[str] = []
    out_images: list[np.ndarray | None] = []
    fams: list[str] = []
    families: Counter[str] = Counter()
    text_same = 0
    for row in tqdm(ads.tolist(), desc="held-out slice", unit="ad"):
        rgb = _read(image_root / paths[row], limits, str(test["id"][row])) if paths[row] else None
        for k in range(hp.variants_per_ad):
            rng = random.Random(_seed(params.seed, HELDOUT, row, k))
            text, tf = texts[row], []
            if texts[row].strip() and slices[row] != HIDDEN_IMAGE_AD:
                text, tf = obfuscator.text(texts[row], rng)
            image, imf = rgb, []
            if rgb is not None:
                image, imf = obfuscator.image(rgb, rng)
            if not tf and not imf:
                continue
            if tf and not imf and normalize_text(text) == normalize_text(texts[row]):
                text_same += 1
            rows.append(row)
            out_texts.append(text)
            out_images.append(image)
            fams.append("+".join(tf + imf))
            families.update(tf + imf)
    chunks = []
    for start in range(0, len(rows), FEATURIZE_CHUNK):
        chunks.append(pipeline.featurize_posts(out_texts[start : start + FEATURIZE_CHUNK],
                                               out_images[start : start + FEATURIZE_CHUNK]))
    rows_arr = np.asarray(rows, dtype=np.int64)
    clean = np.flatnonzero(test["label"] != 1)
    if chunks:
        feats = {k: np.concatenate([c[k] for c in chunks]) for k in FEATURE_ARRAYS}
        ids = [f"{test['id'][r]}~ho{k}" for r, k in _ordinals(rows)]
        perturbed = _part(test, rows_arr, feats, HELDOUT, ids)
    else:
        perturbed = _empty_like(test)
    perturbed["families"] = np.asarray(fams, dtype=str)
    perturbed["text"] = np.asarray(out_texts, dtype=str)
    originals = _take(test, clean, CONTRACT)
    originals["source"] = np.full(len(clean), ORIGINAL)
    originals["parent_id"] = test["id"][clean].astype(str)
    originals["families"] = np.full(len(clean), "")
    originals["text"] = np.asarray([texts[i] for i in clean], dtype=str)
    keys = (*CONTRACT, *EXTRA, "families", "text")
    arrays = _concat([perturbed, originals], keys) if len(rows_arr) else {k: originals[k] for k in keys}
    return arrays, {
        "slice": HELDOUT_SLICE,
        "n_test_ads": int(len(ads)),
        "n_obfuscated_ads": int(len(rows_arr)),
        "n_clean": int(len(clean)),
        "families": dict(sorted(families.items())),
        "normaliser_undoes": sorted(n for n, f in TEXT_FAMILIES.items() if f.undone_by_normalize),
        "text_only_variants_normalised_like_original": int(text_same),
    }


# --------------------------------------------------------------------------- ablation


def _proxy_inputs(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    blocks = [np.asarray(arrays[k], np.float32) for k in HANDCRAFTED_KEYS]
    flags = np.stack([arrays["has_text"], arrays["has_image"]], axis=1).astype(np.float32)
    return np.concatenate([*blocks, flags], axis=1)


def train_proxy(
    x: np.ndarray, y: np.ndarray, train_params: Any, oversample: bool, params: AugmentParams,
    seed: int,
) -> Callable[[np.ndarray], np.ndarray]:
    """An MLP fitted for `ablation.steps` steps with the net's loss; returns a scorer.

    The scorer gives the logit, not P(ad): with BCE many posts reach P(ad) = 1.0 in float32,
    and tied top scores would make every ROC point under a 0.3% FPR empty."""
    import torch
    from torch import nn

    from models.data import oversampling_weights
    from models.lit import ad_loss

    ab = params.ablation
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = nn.Sequential(nn.Linear(x.shape[1], ab.hidden_dim), nn.ReLU(), nn.Dropout(0.1),
                          nn.Linear(ab.hidden_dim, ab.hidden_dim), nn.ReLU(), nn.Linear(ab.hidden_dim, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=ab.lr, weight_decay=1e-4)
    if oversample:
        w = oversampling_weights(y, train_params.positive_share)
        p = w / w.sum()
    else:
        p = None
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.float32))
    model.train()
    for _ in range(ab.steps):
        idx = torch.from_numpy(rng.choice(len(x), size=min(ab.batch_size, len(x)), p=p))
        loss = ad_loss(model(xt[idx]).squeeze(1), yt[idx], train_params)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()

    def score(rows: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(rows)).squeeze(1).numpy().astype(np.float64)

    return score


def run_ablation(
    params: Params, augmented: Arrays, val: Arrays, test: Arrays, heldout: Arrays,
) -> dict[str, Any]:
    """Every configuration x loss (x oversampling for none/all), mean and std over seeds."""
    from models.metrics import binary_metrics, json_safe, operating_point

    aug = params.augment
    max_fpr = params.evaluate.max_fpr
    mean = _proxy_inputs(augmented)[augmented["source"] == ORIGINAL].mean(axis=0)
    std = np.maximum(_proxy_inputs(augmented)[augmented["source"] == ORIGINAL].std(axis=0), 1e-4)

    def prep(a: Mapping[str, np.ndarray]) -> np.ndarray:
        return ((_proxy_inputs(a) - mean) / std).astype(np.float32)

    x_all, y_all = prep(augmented), augmented["label"].astype(int)
    x_val, x_test, x_held = prep(val), prep(test), prep(heldout)
    held_ads = heldout["source"] == HELDOUT
    runs = [(name, loss, params.train.oversample) for name in ABLATION_CONFIGS for loss in ("focal", "bce")]
    runs += [(name, loss, not params.train.oversample) for name in ("no_augmentation", "all")
             for loss in ("focal", "bce")]
    results: dict[str, Any] = {}
    started = time.perf_counter()
    for name, loss, oversample in tqdm(runs, desc="ablation", unit="config"):
        sources = (ORIGINAL, *ABLATION_CONFIGS[name])
        mask = np.isin(augmented["source"], sources)
        train_params = dataclasses.replace(params.train, loss=loss)
        per_seed = []
        for seed in aug.ablation.seeds:
            score = train_proxy(x_all[mask], y_all[mask], train_params, oversample, aug, seed)
            s_val, s_test, s_held = score(x_val), score(x_test), score(x_held)
            _, threshold = operating_point(val["label"], s_val, max_fpr)
            overall = binary_metrics(test["label"], s_test, threshold, max_fpr=max_fpr)
            held = binary_metrics(heldout["label"], s_held, threshold, max_fpr=max_fpr)
            per_seed.append({
                "recall_at_fpr": overall["recall_at_fpr"],
                "heldout_recall_at_fpr": held["recall_at_fpr"],
                "recall": overall["recall"],
                "heldout_recall": float((s_held[held_ads] > threshold).mean()) if held_ads.any() else float("nan"),
                "false_kill_rate": overall["false_kill_rate"],
                "pr_auc": overall["pr_auc"],
                "heldout_pr_auc": held["pr_auc"],
            })
        key = f"{name}|{loss}|{'oversample' if oversample else 'no_oversample'}"
        results[key] = {
            "config": name, "loss": loss, "oversample": oversample,
            "sources": list(sources), "train_rows": int(mask.sum()),
            "train_ad_share": round(float(y_all[mask].mean()), 4),
            **_mean_std(per_seed),
        }
    return json_safe({
        "proxy": (f"MLP on the handcrafted blocks ({', '.join(HANDCRAFTED_KEYS)}) + modality flags, "
                  f"{aug.ablation.steps} steps of batch {aug.ablation.batch_size} per configuration, "
                  "the net's loss (models.lit.ad_loss, train.focal) and oversampling weights "
                  "(models.data.oversampling_weights); not the net: training the net for every "
                  "configuration and seed does not fit the 2-core CPU budget"),
        "threshold": f"per run, the val threshold with FPR <= {max_fpr} (models.metrics.operating_point)",
        "metrics": {
            "recall_at_fpr": f"test split, best recall with FPR <= {max_fpr}",
            "heldout_recall_at_fpr": f"{HELDOUT_SLICE} (obfuscated test ads + clean test posts)",
            "recall": "test ads blocked at the val threshold",
            "heldout_recall": "obfuscated held-out ads blocked at the val threshold",
            "false_kill_rate": "clean test posts blocked at the val threshold",
        },
        "seeds": list(aug.ablation.seeds),
        "seconds": round(time.perf_counter() - started, 1),
        "runs": results,
    })


def _mean_std(rows: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in rows[0]:
        values = np.array([r[key] for r in rows], dtype=np.float64)
        finite = values[np.isfinite(values)]
        out[key] = round(float(finite.mean()), 4) if len(finite) else None
        out[f"{key}_std"] = round(float(finite.std()), 4) if len(finite) > 1 else None
    return out


# --------------------------------------------------------------------------- the stage


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Small torch ops (one image, one 128-row batch) run on one thread: on shared cores more
    threads only add hand-over cost (an image took 30x longer with 2 threads than with 1 on a
    loaded 2-core machine). The sentence model keeps every thread: its batches are large."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _balance(labels: np.ndarray) -> dict[str, Any]:
    ads = int((labels == 1).sum())
    return {"ads": ads, "clean": int(len(labels) - ads),
            "ad_share": round(ads / len(labels), 4) if len(labels) else None}


def augment(
    params: Params,
    split_dir: Path = Path("data/split"),
    features_dir: Path = Path("data/features"),
    featurizer_dir: Path = Path("artifacts/featurizer"),
    out_dir: Path = Path("data/augmented"),
    report_path: Path = Path("reports/augmentation.json"),
    image_root: Path = Path("."),
    cache_dir: Path = Path(".cache"),
    raw_dir: Path = Path("data/raw"),
) -> dict[str, Any]:
    """Write the augmented train set, the held-out slice and the report (returned)."""
    started = time.perf_counter()
    cpu_started = _cpu_seconds()
    split_dir, features_dir, out_dir = Path(split_dir), Path(features_dir), Path(out_dir)
    aug = params.augment
    lo, hi = (aug.expansion_range + [0.0, 0.0])[:2]
    if not lo <= aug.expansion_factor <= hi:
        raise AugmentStageError(
            f"params.yaml augment.expansion_factor {aug.expansion_factor} lies outside "
            f"augment.expansion_range {aug.expansion_range}"
        )
    frames = {s: _read_split(split_dir, s) for s in ("train", "test")}
    arrays = {s: _load_npz(features_dir / f"{s}.npz") for s in ("train", "val", "test")}
    for s in ("train", "test"):
        _check_aligned(frames[s], arrays[s], s)
    pipeline = FeaturePipeline.load(featurizer_dir)
    limits = _limits(params)
    train_df, train = frames["train"], arrays["train"]
    n = len(train_df)

    original = {k: train[k] for k in CONTRACT}
    original["source"] = np.full(n, ORIGINAL)
    original["parent_id"] = train["id"].astype(str)
    parts: list[Arrays] = [original]
    sources: dict[str, Any] = {}
    timings: dict[str, float] = {}

    has_text = train["has_text"].astype(bool)
    has_image = train["has_image"].astype(bool)
    available = {TEXT_ATTACK: has_text.any(), OBFUSCATION: has_text.any(),
                 IMAGE_TRANSFORM: has_image.any(), GAN: (train["label"] == 1).any()}
    plan = plan_counts(aug, n, available) if aug.enabled else {}
    log.info("augment: %d train posts, expansion %.1fx -> adding %s", n, aug.expansion_factor, plan)

    if plan.get(GAN, 0) > 0:
        t0 = time.perf_counter()
        with _one_torch_thread():
            part, sources[GAN] = gan_samples(train, aug, plan[GAN], params.seed,
                                                  n_margins=len(params.featurize.text.margins))
        parts.append(part)
        timings[GAN] = time.perf_counter() - t0
        shortfall = plan[GAN] - sources[GAN]["added"]
        if shortfall > 0:
            others = {s: aug.mix[s] for s in plan if s != GAN and plan[s] > 0}
            for s, extra in _split(shortfall, others).items():
                plan[s] += extra
            log.info("GAN gave %d of %d rows; the rest goes to %s", sources[GAN]["added"],
                     sources[GAN]["added"] + shortfall, others)

    makers = {
        OBFUSCATION: lambda: _obfuscation_maker(aug),
        TEXT_ATTACK: lambda: _text_attack_maker(aug, Path(cache_dir)),
    }
    for source in (OBFUSCATION, TEXT_ATTACK):
        if plan.get(source, 0) > 0:
            t0 = time.perf_counter()
            part, sources[source] = text_variants(
                source, makers[source](), train_df, train, pipeline, plan[source],
                aug.ad_parent_share, params.seed,
            )
            parts.append(part)
            timings[source] = time.perf_counter() - t0
    if plan.get(IMAGE_TRANSFORM, 0) > 0:
        t0 = time.perf_counter()
        part, sources[IMAGE_TRANSFORM] = image_variants(
            train_df, train, pipeline, aug, plan[IMAGE_TRANSFORM], params.seed, Path(image_root), limits,
        )
        parts.append(part)
        timings[IMAGE_TRANSFORM] = time.perf_counter() - t0

    merged = _concat(parts, (*CONTRACT, *EXTRA))
    factor = len(merged["id"]) / n if n else 0.0
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    np.savez_compressed(out_dir / "train.npz", **merged)
    timings["write"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    heldout, heldout_report = heldout_slice(params, pipeline, frames["test"], arrays["test"],
                                            Path(image_root), limits)
    np.savez_compressed(out_dir / HELDOUT_FILE, **heldout)
    timings["heldout"] = time.perf_counter() - t0
    augment_s = time.perf_counter() - started
    augment_cpu_s = _cpu_seconds() - cpu_started

    per_source = Counter(merged["source"].tolist())
    by_source_label = {
        s: _balance(merged["label"][merged["source"] == s]) for s in (ORIGINAL, *ADDED_SOURCES)
        if per_source.get(s)
    }
    report: dict[str, Any] = {
        "expansion_factor": round(factor, 4),
        "expansion_target": aug.expansion_factor,
        "expansion_range": list(aug.expansion_range),
        "n_original": n,
        "n_augmented": int(len(merged["id"])),
        "counts": {s: int(per_source.get(s, 0)) for s in (ORIGINAL, *ADDED_SOURCES)},
        "planned": plan,
        "mix": dict(aug.mix),
        "class_balance": {"before": _balance(train["label"]), "after": _balance(merged["label"]),
                          "by_source": by_source_label},
        "sources": sources,
        "heldout": heldout_report,
        # Wall time depends on whoever else shares the cores; CPU time (all threads of this
        # process) is what the stage itself needs.
        "timings_s": {**{k: round(v, 2) for k, v in timings.items()},
                      "augment_total": round(augment_s, 2),
                      "augment_cpu": round(augment_cpu_s, 2)},
        "outputs": {"train": str(out_dir / "train.npz"), "heldout": str(out_dir / HELDOUT_FILE)},
    }
    report["expansion_in_range"] = bool(lo <= factor <= hi) or not aug.enabled
    if not report["expansion_in_range"]:
        report_path = Path(report_path)
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        raise AugmentStageError(
            f"augment: measured expansion {factor:.2f}x lies outside augment.expansion_range "
            f"{aug.expansion_range} (added per source: {report['counts']}); lower "
            f"augment.expansion_factor or give the sources with too few parents a smaller share "
            f"of augment.mix; the figures are in {report_path}"
        )
    if aug.ablation.enabled:
        with _one_torch_thread():
            report["ablation"] = run_ablation(params, merged, arrays["val"], arrays["test"], heldout)
        report["ablation"]["table"] = ablation_table(report["ablation"])
        log.info("ablation (%s):\n%s", "proxy", report["ablation"]["table"])
    else:
        report["ablation"] = {"enabled": False}
    report["timings_s"]["stage_total"] = round(time.perf_counter() - started, 2)
    report["timings_s"]["stage_cpu"] = round(_cpu_seconds() - cpu_started, 2)
    report["provenance"] = provenance(raw_dir)
    report_path = Path(report_path)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    log.info("augment: %d -> %d rows (%.2fx) in %.1f s (%s); held-out slice %d obfuscated ads + %d "
             "clean; report %s", n, len(merged["id"]), factor, augment_s, report["counts"],
             heldout_report["n_obfuscated_ads"], heldout_report["n_clean"], report_path)
    return report


def ablation_table(ablation: Mapping[str, Any]) -> str:
    """The ablation as a fixed-width table (models.metrics.format_table)."""
    from models.metrics import format_table

    columns = (("R@fpr", "recall_at_fpr"), ("±", "recall_at_fpr_std"),
               ("heldout R@fpr", "heldout_recall_at_fpr"), ("±", "heldout_recall_at_fpr_std"),
               ("heldout recall", "heldout_recall"), ("kill_rate", "false_kill_rate"),
               ("rows", "train_rows"))
    return format_table(ablation["runs"], columns)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tasks.augment", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    setup_logging()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    augment(load_params(args.params))


if __name__ == "__main__":
    main()
