"""How the augment stage sizes and spreads its variants."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from adfilter.augment import ADDED_SOURCES, GAN, IMAGE_TRANSFORM
from adfilter.augment.text import AugmentError
from adfilter.config import load_params
from tasks.augment import _seed, _split, choose_parents, plan_counts


@pytest.fixture(scope="module")
def aug(repo_root):
    return load_params(repo_root / "params.yaml").augment


def test_plan_adds_expansion_minus_one_times_the_train_size(aug):
    plan = plan_counts(aug, 1000, dict.fromkeys(ADDED_SOURCES, True))
    assert sum(plan.values()) == round((aug.expansion_factor - 1) * 1000)
    assert set(plan) == {s for s in ADDED_SOURCES if aug.mix[s] > 0}
    lo, hi = aug.expansion_range
    assert lo <= aug.expansion_factor <= hi


def test_a_source_without_parents_gives_its_share_to_the_others(aug):
    available = {**dict.fromkeys(ADDED_SOURCES, True), IMAGE_TRANSFORM: False}
    plan = plan_counts(aug, 1000, available)
    assert IMAGE_TRANSFORM not in plan
    assert sum(plan.values()) == round((aug.expansion_factor - 1) * 1000)


def test_unknown_source_in_mix_fails_naming_the_key(aug):
    bad = dataclasses.replace(aug, mix={**aug.mix, "llm": 0.5})
    with pytest.raises(AugmentError, match="augment.mix.*llm"):
        plan_counts(bad, 10, dict.fromkeys(ADDED_SOURCES, True))


def test_split_is_exact_and_proportional():
    out = _split(101, {"a": 1.0, "b": 1.0, "c": 2.0})
    assert sum(out.values()) == 101 and out["c"] in (50, 51) and abs(out["a"] - out["b"]) <= 1


def test_parents_follow_the_ad_share_and_spread_evenly():
    labels = np.array([1] * 10 + [0] * 90)
    eligible = np.ones(100, dtype=bool)
    eligible[:2] = False
    rows = choose_parents(labels, eligible, 400, 0.7, np.random.default_rng(0))
    assert len(rows) == 400 and np.all(np.diff(rows) >= 0)
    assert (labels[rows] == 1).sum() == 280
    assert not np.isin(rows, [0, 1]).any()
    counts = np.bincount(rows[labels[rows] == 1], minlength=10)[2:]
    assert counts.max() - counts.min() <= 1  # a shuffled cycle, not random repeats


def test_variant_seeds_depend_on_the_variant_only():
    assert _seed(0, GAN, 5, 1) == _seed(0, GAN, 5, 1)
    assert len({_seed(0, s, r, k) for s in ADDED_SOURCES for r in range(50) for k in range(3)}) == 600
