"""The promotion gate's decision on measured figures (tasks.register.decide)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from adfilter.config import Params, load_params
from tasks.register import decide, format_decision

ROOT = Path(__file__).resolve().parents[2]

INFRA_OK = {"passed": True, "p95_ms": 3.2, "problems": []}
BEHAVIOUR_OK = {"passed": True, "problems": []}


@pytest.fixture(scope="module")
def params() -> Params:
    p = load_params(ROOT / "params.yaml", profile="default")
    register = dataclasses.replace(
        p.register,
        promotion=dataclasses.replace(p.register.promotion, recall_tolerance=0.01,
                                      false_kill_tolerance=0.0, max_false_kill_rate=0.003),
        floors=dataclasses.replace(p.register.floors, min_recall_at_fpr=0.8, min_accuracy=0.95),
    )
    return dataclasses.replace(p, register=register)


def figures(recall: float, fkr: float, accuracy: float = 0.99) -> dict[str, float]:
    return {"recall_at_fpr": recall, "false_kill_rate": fkr, "accuracy": accuracy}


def test_infrastructure_failure_refuses_before_anything_else(params: Params) -> None:
    infra = {"passed": False, "problems": ["model.pt does not load or run in a fresh process"]}
    d = decide(None, figures(0.9, 0.0), infra, None, params)
    assert not d.promote
    assert d.checks == {"infrastructure": False}
    assert d.reasons == ["infrastructure: model.pt does not load or run in a fresh process"]


def test_first_model_needs_the_floors(params: Params) -> None:
    low = decide(figures(0.7, 0.0, accuracy=0.97), None, INFRA_OK, BEHAVIOUR_OK, params)
    assert not low.promote and low.checks["floor_recall"] is False and low.checks["floor_accuracy"]
    assert any("below the floor 0.8" in r for r in low.reasons)
    ok = decide(figures(0.85, 0.001, accuracy=0.97), None, INFRA_OK, BEHAVIOUR_OK, params)
    assert ok.promote and all(ok.checks.values())
    assert "recall_vs_champion" not in ok.checks


def test_recall_compared_with_the_champion_within_tolerance(params: Params) -> None:
    champion = figures(0.90, 0.001)
    assert decide(figures(0.895, 0.001), champion, INFRA_OK, BEHAVIOUR_OK, params).promote
    worse = decide(figures(0.88, 0.001), champion, INFRA_OK, BEHAVIOUR_OK, params)
    assert not worse.promote and worse.checks["recall_vs_champion"] is False
    assert worse.reasons == ["recall at FPR <= 0.003: 0.8800 vs champion 0.9000 (tolerance 0.01)"]


def test_false_kill_rate_neither_higher_nor_above_the_ceiling(params: Params) -> None:
    higher = decide(figures(0.95, 0.002), figures(0.9, 0.001), INFRA_OK, BEHAVIOUR_OK, params)
    assert not higher.promote and higher.checks["false_kill_vs_champion"] is False
    # a champion above the ceiling does not let a challenger above it through
    ceiling = decide(figures(0.95, 0.004), figures(0.9, 0.005), INFRA_OK, BEHAVIOUR_OK, params)
    assert not ceiling.promote
    assert ceiling.checks == {"infrastructure": True, "false_kill_ceiling": False,
                              "recall_vs_champion": True, "false_kill_vs_champion": True,
                              "behaviour": True}


def test_behaviour_failures_are_reasons(params: Params) -> None:
    behaviour = {"passed": False, "problems": ["invariance (case): 1 of 40 clean posts flip (allowed share 0)"]}
    d = decide(figures(0.95, 0.0), figures(0.9, 0.0), INFRA_OK, behaviour, params)
    assert not d.promote
    assert d.reasons == ["behaviour: invariance (case): 1 of 40 clean posts flip (allowed share 0)"]


def test_undefined_champion_figures_do_not_block(params: Params) -> None:
    d = decide(figures(0.9, 0.0), figures(math.nan, math.nan), INFRA_OK, BEHAVIOUR_OK, params)
    assert d.promote
    nan_challenger = decide(figures(math.nan, 0.0), figures(0.9, 0.0), INFRA_OK, BEHAVIOUR_OK, params)
    assert not nan_challenger.promote


def test_format_decision_lists_reasons() -> None:
    text = format_decision({"model": "ad-filter", "version": "3", "decision": "refused",
                            "compared_with": "2", "reasons": ["a", "b"]})
    assert text.splitlines() == ["ad-filter version 3: REFUSED (compared with champion 2)", "  - a", "  - b"]
