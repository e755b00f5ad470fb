"""The fastText gate: the cheap first step of the serving cascade.

Every post is scored by fastText on its normalised text (tens of thousands of posts a second on
one core). Posts the gate is sure about are decided there; the rest go to the deep model:

    p <= low   -> allow (the gate is sure it is clean)
    p >= high  -> block (the gate is sure it is an ad)
    otherwise  -> the deep model decides (`p_deep > deep_threshold` blocks)

`calibrate` picks `low` and `high` on the validation split so that the cascade loses at most
`max_recall_loss` of the deep model's recall and blocks no clean post that the deep model alone
would have allowed. The search is exact, not a grid:

- Gate blocks can only add false kills, never lose recall, and fewer of them (a higher `high`)
  never helps either figure. So `high` is the lowest validation score above every clean post
  the deep model allows: the gate blocks as much as it can without one new false kill.
- Gate allows can only lose recall (ads the deep model would have caught), never add a false
  kill, and the ads lost grow with `low`. So `low` is the highest validation score (below
  `high`) at which the ads lost, less the ads that only the gate's blocks catch, stay within
  `floor(max_recall_loss * n_ads)`: the cascade's recall is at least the deep model's minus
  `max_recall_loss`.

A deep model that blocks every clean validation post gives no bound for `high`; the gate is
then bounded by every clean post instead. A split without ads or without clean posts cannot
measure either figure and is refused.

`low = -1.0` means the gate allows nothing and `high = 2.0` that it blocks nothing (fastText
probabilities lie in [0, 1]); then every post goes to the deep model, which is always safe.

fastText trains with several threads by default, and its hogwild updates make the result depend
on thread timing; `GateParams.thread = 1` gives the same model for the same data and seed
(training runs in a child process for that too: see `train_fasttext`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final

import numpy as np

from adfilter.config import GateParams

log = logging.getLogger(__name__)

AD_LABEL: Final = "__label__ad"
CLEAN_LABEL: Final = "__label__clean"
MODEL_FILE: Final = "gate.bin"
META_FILE: Final = "gate.json"

GATE_ALLOW: Final = 0
GATE_BLOCK: Final = 1
GATE_DEFER: Final = 2  # to the deep model

NEVER_ALLOW: Final = -1.0
NEVER_BLOCK: Final = 2.0


def _normalizer() -> Callable[[str], str]:
    # The dedicated module first: `adfilter.features.text` also pulls in the TF-IDF and
    # embedding code, which the serving gate has no use for.
    try:
        from adfilter.features.textnorm import normalize_text
    except ImportError:
        from adfilter.features.text import normalize_text
    return normalize_text


def one_line(text: str) -> str:
    """fastText reads one example per line and refuses newlines at prediction time."""
    return " ".join(text.split())


# fastText allocates its input matrix without zeroing it and, with fewer than 10 threads, fills
# only `thread / 10` of its rows at random (DenseMatrix::uniform works in 10 blocks, one per
# thread). The remaining rows hold whatever the allocator hands back: zeros when the block is
# freshly mapped, stale bytes (NaN included) when it is recycled heap. So a one-thread run in a
# busy process fails with "Encountered NaN" or drifts at random. Training therefore runs in a
# child process whose allocator maps every block of 64 KiB or more fresh from the kernel, which
# zeroes it: the result depends on the data, options and seed only.
_MMAP_THRESHOLD = 64 * 1024
_TRAIN_CHILD = """
import json, sys
import fasttext
options = json.loads(sys.argv[3])
fasttext.train_supervised(input=sys.argv[1], verbose=0, **options).save_model(sys.argv[2])
"""


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    tunable = f"glibc.malloc.mmap_threshold={_MMAP_THRESHOLD}"
    env["GLIBC_TUNABLES"] = (
        f"{env['GLIBC_TUNABLES']}:{tunable}" if env.get("GLIBC_TUNABLES") else tunable
    )
    env["MALLOC_MMAP_THRESHOLD_"] = str(_MMAP_THRESHOLD)
    return env


def train_fasttext(texts: Sequence[str], labels: Sequence[int] | np.ndarray, **options: Any) -> Any:
    """A supervised fastText model on `texts` (1 = ad), trained through a temporary file.

    `options` are `fasttext.train_supervised` arguments (`epoch`, `wordNgrams`, `thread`, ...).
    """
    import fasttext

    y = np.asarray(labels).astype(int).ravel()
    if len(texts) != y.size:
        raise ValueError(f"train_fasttext: {len(texts)} texts but {y.size} labels")
    if y.size == 0:
        raise ValueError("train_fasttext: no training texts; check the train split is not empty")
    with tempfile.TemporaryDirectory(prefix="adfilter-fasttext-") as tmp:
        data, model = Path(tmp) / "train.txt", Path(tmp) / "model.bin"
        with data.open("w", encoding="utf-8") as fh:
            for text, label in zip(texts, y, strict=True):
                fh.write(f"{AD_LABEL if label == 1 else CLEAN_LABEL} {one_line(text)}\n")
        done = subprocess.run(
            [sys.executable, "-c", _TRAIN_CHILD, str(data), str(model), json.dumps(options)],
            env=_child_env(),
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            detail = (
                done.stderr.strip().splitlines()[-1]
                if done.stderr.strip()
                else f"exit {done.returncode}"
            )
            hint = " (training diverged: lower the learning rate)" if "NaN" in detail else ""
            raise RuntimeError(
                f"fastText training on {y.size} texts with {options} failed: {detail}{hint}"
            )
        return fasttext.load_model(str(model))


def fasttext_p_ad(model: Any, texts: Sequence[str]) -> np.ndarray:
    """P(ad) for each text, one batched call into fastText's C++ code."""
    if len(texts) == 0:
        return np.zeros(0, dtype=np.float64)
    labels, probs = model.predict([one_line(t) for t in texts], k=-1)
    # fastText adds 1e-5 to every probability, so the top one can exceed 1.
    p = np.fromiter(
        (
            row_probs[row_labels.index(AD_LABEL)] if AD_LABEL in row_labels else 0.0
            for row_labels, row_probs in zip(labels, probs, strict=True)
        ),
        dtype=np.float64,
        count=len(texts),
    )
    return np.clip(p, 0.0, 1.0)


def route(p_gate: np.ndarray, low: float, high: float) -> np.ndarray:
    """`GATE_ALLOW`, `GATE_BLOCK` or `GATE_DEFER` for each gate probability."""
    if not low < high:
        raise ValueError(f"gate thresholds must satisfy low < high, got low={low}, high={high}")
    p = np.asarray(p_gate, dtype=np.float64)
    out = np.full(p.shape, GATE_DEFER, dtype=np.int8)
    out[p <= low] = GATE_ALLOW
    out[p >= high] = GATE_BLOCK
    return out


def cascade_blocks(
    p_gate: np.ndarray, p_deep: np.ndarray, deep_threshold: float, low: float, high: float
) -> np.ndarray:
    """The cascade's decision (True = block) when every deferred post is scored by the deep model."""
    routes = route(p_gate, low, high)
    deep = np.asarray(p_deep, dtype=np.float64) > deep_threshold
    return np.where(routes == GATE_DEFER, deep, routes == GATE_BLOCK)


def calibrate(
    p_gate_val: np.ndarray,
    y_val: np.ndarray,
    p_deep_val: np.ndarray,
    deep_threshold: float,
    max_recall_loss: float = 0.002,
    block: bool = True,
    safety_logit: float = 0.0,
) -> tuple[float, float]:
    """`(low, high)` on the validation split (see the module docstring for the search).

    `p_deep_val` is the deep model's score that `deep_threshold` applies to (in this project
    the net's `score` and `model.threshold`); a post is blocked by it when `p > deep_threshold`.
    `block=False` gives `high = NEVER_BLOCK`; `safety_logit` moves `low` down and `high` up by
    that much in logit space from the exact fit, a margin for posts the split did not hold.
    """
    if safety_logit < 0:
        raise ValueError(f"calibrate: safety_logit must be >= 0, got {safety_logit}")
    p = np.asarray(p_gate_val, dtype=np.float64).ravel()
    y = np.asarray(y_val).astype(int).ravel()
    deep = np.asarray(p_deep_val, dtype=np.float64).ravel() > deep_threshold
    if not p.size == y.size == deep.size:
        raise ValueError(
            f"calibrate: p_gate_val, y_val and p_deep_val have {p.size}, {y.size} and "
            f"{deep.size} rows; they must be the same validation posts"
        )
    n_ads = int(y.sum())
    if n_ads == 0:
        raise ValueError(
            "calibrate: the validation split has no ads, so recall loss cannot be measured; "
            "calibrate on a split with both classes"
        )

    clean = y == 0
    if not clean.any():
        raise ValueError(
            "calibrate: the validation split has no clean posts, so false kills cannot be "
            "measured; calibrate on a split with both classes"
        )
    allowed_by_deep = clean & ~deep
    bound = p[allowed_by_deep].max() if allowed_by_deep.any() else p[clean].max()
    above = p[p > bound]
    high = float(above.min()) if above.size and block else NEVER_BLOCK

    budget = math.floor(max_recall_loss * n_ads + 1e-9)
    gained = int(((y == 1) & ~deep & (p >= high)).sum())
    caught_by_deep = (y == 1) & deep
    candidates = np.unique(p[p < high])  # ascending
    # Ads the deep model catches but `p <= c` would allow, for every candidate c at once.
    lost = np.searchsorted(np.sort(p[caught_by_deep]), candidates, side="right")
    ok = np.flatnonzero(lost - gained <= budget)
    low = float(candidates[ok[-1]]) if ok.size else NEVER_ALLOW
    return _shift(low, -safety_logit, NEVER_ALLOW), _shift(high, safety_logit, NEVER_BLOCK)


def _shift(p: float, by: float, never: float) -> float:
    """`p` moved by `by` in logit space; the never-values and exact 0/1 stay as they are."""
    if by == 0 or p == never or not 0.0 < p < 1.0:
        return p
    logit = math.log(p / (1.0 - p)) + by
    return float(1.0 / (1.0 + math.exp(-logit)))


def cascade_report(
    p_gate: np.ndarray,
    y: np.ndarray,
    p_deep: np.ndarray,
    deep_threshold: float,
    low: float,
    high: float,
) -> dict[str, float | int]:
    """The deep model alone against the cascade on one split: recall, false kills, traffic."""
    y = np.asarray(y).astype(int).ravel()
    deep = np.asarray(p_deep, dtype=np.float64).ravel() > deep_threshold
    cascade = cascade_blocks(p_gate, p_deep, deep_threshold, low, high)
    routes = route(p_gate, low, high)
    n_ads = int(y.sum())
    n_clean = int(y.size - n_ads)
    return {
        "n": int(y.size),
        "recall_deep": float(deep[y == 1].mean()) if n_ads else float("nan"),
        "recall_cascade": float(cascade[y == 1].mean()) if n_ads else float("nan"),
        "false_kills_deep": int((deep & (y == 0)).sum()),
        "false_kills_cascade": int((cascade & (y == 0)).sum()),
        "false_kill_rate_cascade": float((cascade & (y == 0)).sum() / n_clean)
        if n_clean
        else float("nan"),
        "gate_allowed": int((routes == GATE_ALLOW).sum()),
        "gate_blocked": int((routes == GATE_BLOCK).sum()),
        "deferred_share": float((routes == GATE_DEFER).mean()) if y.size else float("nan"),
    }


class FastTextGate:
    """fastText on normalised text, with the cascade thresholds it was calibrated to."""

    def __init__(
        self,
        model: Any,
        params: GateParams,
        low: float = NEVER_ALLOW,
        high: float = NEVER_BLOCK,
    ) -> None:
        self.model = model
        self.params = params
        self.low = low
        self.high = high
        self._normalize = _normalizer()

    @classmethod
    def train(
        cls, texts: Sequence[str], labels: Sequence[int] | np.ndarray, params: GateParams
    ) -> FastTextGate:
        normalize = _normalizer()
        model = train_fasttext(
            [normalize(t) for t in texts],
            labels,
            epoch=params.epoch,
            lr=params.lr,
            wordNgrams=params.word_ngrams,
            minn=params.minn,
            maxn=params.maxn,
            dim=params.dim,
            bucket=params.bucket,
            minCount=params.min_count,
            thread=params.thread,
            seed=params.seed,
        )
        log.info("gate trained on %d texts (%d ads)", len(texts), int(np.sum(labels)))
        return cls(model, params)

    def predict_proba(self, texts: Iterable[str]) -> np.ndarray:
        """P(ad) for each text (raw text; the gate normalises it as training did)."""
        return fasttext_p_ad(self.model, [self._normalize(t) for t in texts])

    def calibrate(
        self,
        texts_val: Sequence[str],
        y_val: np.ndarray,
        p_deep_val: np.ndarray,
        deep_threshold: float,
    ) -> tuple[float, float]:
        """Sets and returns `(low, high)` from validation posts, with `params.max_recall_loss`."""
        self.low, self.high = calibrate(
            self.predict_proba(texts_val),
            y_val,
            p_deep_val,
            deep_threshold,
            self.params.max_recall_loss,
            block=self.params.block,
            safety_logit=self.params.safety_logit,
        )
        return self.low, self.high

    def route(self, texts: Iterable[str]) -> np.ndarray:
        """`GATE_ALLOW`, `GATE_BLOCK` or `GATE_DEFER` for each text."""
        return route(self.predict_proba(texts), self.low, self.high)

    def save(self, directory: str | Path) -> Path:
        """Writes `gate.bin` (the fastText model) and `gate.json` (params, thresholds); returns
        the folder."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_model(str(directory / MODEL_FILE))
        meta = {
            "params": asdict(self.params),
            "low": self.low,
            "high": self.high,
            "labels": [CLEAN_LABEL, AD_LABEL],
            "normalized_text": True,
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> FastTextGate:
        import fasttext

        directory = Path(directory)
        model_path, meta_path = directory / MODEL_FILE, directory / META_FILE
        for path in (model_path, meta_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} not found: a gate folder holds {MODEL_FILE} and {META_FILE} "
                    "written by FastTextGate.save; train and export the gate first"
                )
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        model = fasttext.load_model(str(model_path))
        # gate.json files written before `block` and `safety_logit` existed blocked, no margin.
        params = GateParams(**{"block": True, "safety_logit": 0.0, **meta["params"]})
        return cls(model, params, float(meta["low"]), float(meta["high"]))
