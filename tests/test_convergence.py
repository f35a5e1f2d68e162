"""Figure 5's steps to a threshold: interpolated crossings, censored runs, a censored median."""

from __future__ import annotations

import math

import pytest

from transfusion.analysis.convergence import (
    ConvergenceSettings,
    RunConvergence,
    _convergence_figure,
    censored_median,
    convergence_markdown,
    convergence_table,
    steps_to_auc,
)
from transfusion.analysis.records import JobRecord

ABSOLUTE = ConvergenceSettings(threshold=0.9, relative=False)


def _run(init: str, seed: int, curve) -> JobRecord:
    return JobRecord(f"{init}{seed}", f"run-{init}-{seed}", "cbr-tiny", init, "full", seed, "FINISHED",
                     val_curve=tuple(curve))  # fmt: skip


def test_crossing_is_interpolated_between_the_evaluations_around_it():
    # 0.8 at step 100, 1.0 at step 200: 0.9 is crossed halfway.
    assert steps_to_auc([(0, 0.5), (100, 0.8), (200, 1.0)], 0.9) == pytest.approx(150.0)
    assert steps_to_auc([(200, 1.0), (0, 0.5), (100, 0.8)], 0.95) == pytest.approx(175.0)  # order-free
    assert isinstance(steps_to_auc([(0, 0.5), (100, 0.8), (200, 1.0)], 0.9), float)
    # Exactly on an evaluation: that step; already there at the first evaluation: its step.
    assert steps_to_auc([(0, 0.5), (100, 0.9)], 0.9) == pytest.approx(100.0)
    assert steps_to_auc([(0, 0.95), (100, 0.97)], 0.9) == 0.0
    # The first crossing counts, not a later dip and rise.
    assert steps_to_auc([(0, 0.5), (10, 0.95), (20, 0.7), (30, 0.96)], 0.9) == pytest.approx(10 * 0.4 / 0.45)
    assert steps_to_auc([(0, 0.5), (100, 0.89)], 0.9) is None


def test_a_run_that_never_reaches_it_is_censored_at_its_last_step_not_dropped():
    fast = [_run("transfer", s, [(0, 0.5), (100, 0.8), (200, 1.0)]) for s in (0, 1)]
    failed = _run("transfer", 2, [(0, 0.5), (100, 0.6), (400, 0.7)])
    (row,) = convergence_table([*fast, failed], ABSOLUTE)
    assert (row.reached, row.runs) == (2, 3)
    assert [(c.seed, c.reached) for c in row.per_run] == [(0, True), (1, True), (2, False)]
    assert row.per_run[2].steps == 400.0 and row.per_run[2].text() == "> 400"
    # The median of {150, 150, > 400} is 150: the failure is counted, and the median is not censored.
    assert row.steps_median == pytest.approx(150.0) and not row.median_censored
    # No mean over the survivors.
    assert math.isnan(row.steps_mean) and math.isnan(row.steps_std)
    text = convergence_markdown([row])
    assert "| 150 | 2/3 reached | s0: 150, s1: 150, s2: > 400 |" in text


def test_the_median_is_censored_when_it_falls_on_a_run_that_never_reached_it():
    one = _run("mean-var", 0, [(0, 0.5), (100, 0.8), (200, 1.0)])
    never = [_run("mean-var", s, [(0, 0.5), (300, 0.6)]) for s in (1, 2)]
    (row,) = convergence_table([one, *never], ABSOLUTE)
    assert row.median_censored and row.steps_median == 300.0 and row.steps_text == "> 300"
    assert "| > 300 | 1/3 reached |" in convergence_markdown([row])
    # An init with failures never looks faster than one whose runs all got there later.
    slow = [_run("random", s, [(0, 0.5), (250, 0.8), (300, 1.0)]) for s in (0, 1, 2)]
    rows = {r.init: r for r in convergence_table([one, *never, *slow], ABSOLUTE)}
    assert rows["random"].steps_median == pytest.approx(275.0) and not rows["random"].median_censored
    assert rows["random"].steps_mean == pytest.approx(275.0)


def test_median_rule_ranks_censored_runs_last_and_bounds_an_even_median():
    reached = [RunConvergence(0, 50.0, True), RunConvergence(1, 30.0, True)]
    assert censored_median(reached) == (40.0, False)
    # Censored at 20 (a shorter run): still ranked after both runs that reached it.
    assert censored_median([*reached, RunConvergence(2, 20.0, False)]) == (50.0, False)
    # Even count with the upper middle censored: only a lower bound, the mean of the two middle values.
    assert censored_median([RunConvergence(0, 30.0, True), RunConvergence(1, 100.0, False)]) == (65.0, True)
    with pytest.raises(ValueError, match="at least one run"):
        censored_median([])


def test_figure5_draws_a_never_reached_run_at_its_last_step_with_an_arrow():
    runs = [_run("random", 0, [(0, 0.5), (100, 0.8), (200, 1.0)]), _run("random", 1, [(0, 0.5), (400, 0.7)])]
    rows = convergence_table(runs, ABSOLUTE)
    fig = _convergence_figure(runs, rows)
    (ax,) = fig.axes
    arrows = [t for t in ax.texts if t.get_text() == "→"]
    assert len(arrows) == 1 and arrows[0].xy[0] > 400 and arrows[0].xy[1] == 0.9
    markers = sorted((line.get_xdata()[0], line.get_ydata()[0]) for line in ax.lines if len(line.get_xdata()) == 1)
    assert markers == [(pytest.approx(150.0), 0.9), (400.0, 0.9)]
