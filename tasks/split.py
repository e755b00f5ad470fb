"""The `split` stage: train / val / test, stratified by label and slice, duplicate-aware.

Posts that are the same post in disguise must not sit on both sides of a split, or the test
score measures memory. Two posts are linked when their normalised texts have the same
fingerprint (`text_fingerprint`), or when their images' 64-bit perceptual hashes
(`imagehash.phash`) differ in at most `split.phash_max_distance` bits (a re-compressed, resized
or brightened copy); the connected components of these links are the duplicate groups
(`scipy.sparse.csgraph.connected_components`), and a group never crosses splits.

The assignment is sklearn's `StratifiedGroupKFold` over the label x slice strata with as many
folds as the ratios need (0.7 / 0.15 / 0.15 -> 20 folds: 14 train, 3 val, 3 test), the folds
dealt to the splits by the seed. Near-duplicate image pairs are found exactly by banding: split
the 64 bits into `d + 1` bands; two hashes within distance `d` agree on at least one whole band
(pigeonhole), so only hashes that share a band value are compared, which keeps it close to
linear in the number of images instead of quadratic.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

from adfilter.config import Params, SplitParams, load_params
from adfilter.features.textnorm import text_fingerprint
from adfilter.imageio import ImageError, ImageLimits, read_image
from adfilter.logs import setup_logging
from adfilter.schema import COLUMNS
from adfilter.versioning import MANIFEST, data_version
from tasks.validate import POSTS_FILE, image_limits

log = logging.getLogger("tasks.split")

SPLITS = ("train", "val", "test")
MAX_FOLDS = 100


class SplitError(RuntimeError):
    """The clean posts cannot be split as asked."""


def split(
    params: Params,
    clean_dir: Path = Path("data/clean"),
    out_dir: Path = Path("data/split"),
    report_path: Path = Path("reports/split.json"),
    root: Path = Path("."),
) -> dict[str, Any]:
    """Write `out_dir/{train,val,test}.parquet` (the clean columns + `group`); return the report.

    Image paths are relative to `root`, the repository root.
    """
    started = time.perf_counter()
    sp = params.split
    ratios = _ratios(sp)
    n_folds = folds_for(ratios)
    posts = _read_clean(Path(clean_dir) / POSTS_FILE)
    n = len(posts)
    log.info("splitting %d posts %s with %d folds", n, "/".join(f"{r:g}" for r in ratios.values()), n_folds)

    fingerprints = [text_fingerprint(t) for t in posts["text"]]
    hashes, has_image = image_hashes(posts["image"].tolist(), image_limits(params.validate), Path(root))
    groups, links = duplicate_groups(fingerprints, hashes, has_image, sp.phash_max_distance)
    posts["group"] = groups.astype(np.int64)

    strata = (posts["slice"] + "|" + posts["label"].astype(str)).to_numpy()
    assignment = assign_splits(strata, groups, ratios, n_folds, params.seed)
    posts["_split"] = assignment

    crossing = int((posts.groupby("group")["_split"].nunique() > 1).sum())
    if crossing:
        raise SplitError(f"{crossing} duplicate groups ended up in more than one split; this is a bug in tasks/split.py")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        part = posts.loc[posts["_split"] == name, [*COLUMNS, "group"]].reset_index(drop=True)
        part.to_parquet(out_dir / f"{name}.parquet", index=False)
    version = _data_version(Path(clean_dir))
    manifest = {"data_version": version, "stage": "split", "posts": n}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")

    sizes = Counter(groups.tolist())
    largest = max(sizes.values()) if sizes else 0
    multi = [s for s in sizes.values() if s > 1]
    report: dict[str, Any] = {
        "posts": n,
        "ratios": ratios,
        "n_folds": n_folds,
        "seed": params.seed,
        "sizes": {s: int((assignment == s).sum()) for s in SPLITS},
        "fractions": {s: round(float((assignment == s).mean()), 4) if n else 0.0 for s in SPLITS},
        "labels": {s: _counts(posts.loc[assignment == s, "label"].astype(str)) for s in SPLITS},
        "slices": {s: _counts(posts.loc[assignment == s, "slice"]) for s in SPLITS},
        "stratification": _stratification(strata, assignment, ratios),
        "groups": {
            "count": len(sizes),
            "largest": largest,
            "largest_fraction": round(largest / n, 4) if n else 0.0,
            "multi_member_groups": len(multi),
            "posts_in_multi_member_groups": int(sum(multi)),
            "text_links": links["text"],
            "image_links": links["image"],
        },
        "groups_crossing_splits": crossing,
        "no_group_crosses_splits": crossing == 0,
        "data_version": version,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if n and largest / n > sp.max_group_fraction:
        biggest = max(sizes, key=sizes.__getitem__)
        sample = posts.loc[posts["group"] == biggest, "id"].head(5).tolist()
        log.warning(
            "the largest duplicate group holds %d posts (%.1f%% of %d, above split.max_group_fraction "
            "= %.1f%%), which skews the split ratios; first ids: %s. Check near-identical images or "
            "texts, or lower split.phash_max_distance",
            largest, 100 * largest / n, n, 100 * sp.max_group_fraction, ", ".join(sample),
        )  # fmt: skip
        report["groups"]["largest_group_warning"] = True
    report_path = Path(report_path)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    log.info(
        "split %s; %d groups, largest %d, %d posts in %d multi-member groups; report %s",
        ", ".join(f"{k} {v}" for k, v in report["sizes"].items()), len(sizes), largest,
        sum(multi), len(multi), report_path,
    )  # fmt: skip
    return report


# --------------------------------------------------------------------------- pieces


def _ratios(sp: SplitParams) -> dict[str, float]:
    ratios = {"train": sp.train, "val": sp.val, "test": sp.test}
    if any(not 0.0 <= r <= 1.0 for r in ratios.values()) or sp.train == 0 or sp.test == 0:
        raise SplitError(f"params.yaml: split.train / val / test are {ratios}; train and test must be > 0, all in [0, 1]")
    if not math.isclose(sum(ratios.values()), 1.0, abs_tol=1e-6):
        raise SplitError(f"params.yaml: split.train + val + test = {sum(ratios.values()):g}; they must add up to 1")
    return ratios


def folds_for(ratios: dict[str, float]) -> int:
    """The fewest folds that give each split a whole number of them (0.7/0.15/0.15 -> 20)."""
    for k in range(2, MAX_FOLDS + 1):
        if all(math.isclose(r * k, round(r * k), abs_tol=1e-6) for r in ratios.values()):
            return k
    raise SplitError(
        f"params.yaml: split ratios {ratios} need more than {MAX_FOLDS} folds; use multiples of 0.01"
    )


def image_hashes(images: list[str], limits: ImageLimits, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """64-bit pHash per post as uint64 (0 where there is no image) and a has-image mask."""
    import imagehash
    from PIL import Image

    def one(path: str) -> int:
        rgb = read_image(Path(path) if Path(path).is_absolute() else root / path, limits)
        bits = imagehash.phash(Image.fromarray(rgb)).hash.flatten()
        return int(np.packbits(bits).view(">u8")[0])

    has_image = np.array([bool(p) for p in images], dtype=bool)
    hashes = np.zeros(len(images), dtype=np.uint64)
    todo = [i for i in range(len(images)) if has_image[i]]
    with ThreadPoolExecutor() as pool:
        results = pool.map(lambda i: one(images[i]), todo)
        try:
            for i, value in tqdm(zip(todo, results, strict=True), total=len(todo), desc="split phash", unit="img"):
                hashes[i] = value
        except ImageError as exc:
            raise SplitError(f"{exc.detail}: an image validate accepted cannot be read now; rerun validate") from exc
    return hashes, has_image


def near_duplicate_pairs(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Index pairs (i < j) of `hashes` (uint64) within `max_distance` bits, found by banding."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    if len(hashes) < 2 or max_distance < 0:
        return np.zeros((0, 2), dtype=np.int64)
    n_bands = min(max_distance + 1, 64)
    edges = np.linspace(0, 64, n_bands + 1).round().astype(int)
    found: set[tuple[int, int]] = set()
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        mask = np.uint64((1 << int(hi - lo)) - 1)
        keys = (hashes >> np.uint64(lo)) & mask
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for start, end in zip(starts[ends - starts > 1], ends[ends - starts > 1], strict=True):
            members = np.sort(order[start:end])
            dist = np.bitwise_count(hashes[members][:, None] ^ hashes[members][None, :])
            ii, jj = np.nonzero(np.triu(dist <= max_distance, k=1))
            found.update(zip(members[ii].tolist(), members[jj].tolist(), strict=True))
    return np.array(sorted(found), dtype=np.int64).reshape(-1, 2)


def duplicate_groups(
    fingerprints: list[str], hashes: np.ndarray, has_image: np.ndarray, max_distance: int
) -> tuple[np.ndarray, dict[str, int]]:
    """Group id per post (0, 1, ... in order of first appearance) and the number of links."""
    n = len(fingerprints)
    rows: list[int] = []
    cols: list[int] = []
    first: dict[str, int] = {}
    for i, fp in enumerate(fingerprints):
        if not fp:
            continue  # no words: nothing to compare (image-only posts)
        j = first.setdefault(fp, i)
        if j != i:
            rows.append(j)
            cols.append(i)
    text_links = len(rows)
    with_image = np.flatnonzero(has_image)
    # Identical hashes are linked directly, so that banding compares each distinct hash once.
    unique, first_of, inverse = np.unique(hashes[with_image], return_index=True, return_inverse=True)
    representative = with_image[first_of]
    same = representative[inverse] != with_image
    rows.extend(representative[inverse][same].tolist())
    cols.extend(with_image[same].tolist())
    pairs = near_duplicate_pairs(unique, max_distance)
    rows.extend(representative[pairs[:, 0]].tolist())
    cols.extend(representative[pairs[:, 1]].tolist())
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels.astype(np.int64), {"text": text_links, "image": int(same.sum()) + len(pairs)}


def assign_splits(
    strata: np.ndarray, groups: np.ndarray, ratios: dict[str, float], n_folds: int, seed: int
) -> np.ndarray:
    """'train' / 'val' / 'test' per post, whole groups at a time, stratified by `strata`."""
    from sklearn.model_selection import StratifiedGroupKFold

    n = len(strata)
    n_groups = len(np.unique(groups))
    if n_groups < n_folds:
        raise SplitError(
            f"only {n_groups} duplicate groups among {n} posts, fewer than the {n_folds} folds the "
            f"split ratios need: ingest more data or use coarser ratios in params.yaml"
        )
    fold = np.empty(n, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # Tiny strata (fewer posts than folds) are expected in small profiles; they still land
        # somewhere, and the report shows how far each stratum is from the ratios.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for k, (_, test_idx) in enumerate(splitter.split(np.zeros(n), strata, groups)):
            fold[test_idx] = k
    # The splitter fills folds greedily, so fold numbers are not exchangeable; deal them out at random.
    dealt = np.random.default_rng(seed).permutation(n_folds)
    counts = [round(ratios[s] * n_folds) for s in SPLITS]
    split_of_fold = np.empty(n_folds, dtype=object)
    split_of_fold[dealt] = [s for s, c in zip(SPLITS, counts, strict=True) for _ in range(c)]
    return split_of_fold[fold].astype(str)


def _stratification(strata: np.ndarray, assignment: np.ndarray, ratios: dict[str, float]) -> dict[str, Any]:
    by_stratum: dict[str, dict[str, float]] = {}
    worst = 0.0
    for stratum in sorted(set(strata.tolist())):
        mask = strata == stratum
        total = int(mask.sum())
        shares = {s: round(float((assignment[mask] == s).mean()), 4) for s in SPLITS}
        by_stratum[stratum] = {"posts": total, **shares}
        if total >= 10 * len(SPLITS):  # tiny strata cannot follow the ratios; not counted
            worst = max(worst, *(abs(shares[s] - ratios[s]) for s in SPLITS))
    return {"max_abs_deviation": round(worst, 4), "by_stratum": by_stratum}


def _counts(values: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in sorted(Counter(values.tolist()).items())}


def _read_clean(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise SplitError(f"{path} not found: run the validate stage first (dvc repro validate)")
    posts = pd.read_parquet(path)
    missing = [c for c in COLUMNS if c not in posts.columns]
    if missing:
        raise SplitError(f"{path} lacks the column(s) {', '.join(missing)}; rerun validate")
    return posts[list(COLUMNS)].copy()


def _data_version(clean_dir: Path) -> str | None:
    try:
        return data_version(clean_dir)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        log.warning("no data version for %s (%s); the report records null", clean_dir, exc)
        return None


def main() -> None:
    setup_logging()
    params = load_params("params.yaml")
    try:
        split(params)
    except SplitError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from exc


if __name__ == "__main__":
    main()
