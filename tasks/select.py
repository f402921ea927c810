"""Step 5, choose: the freeze configuration whose stage has the best validation metric wins.

In a sweep, the same rule picks among the trials: each trial's chosen stage competes.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from vggflow.training import StageResult, TrainedStages, is_better


def choose_freeze_configuration(stages: TrainedStages, metric: str) -> StageResult:
    """The stage with the best validation metric (head-only included); an earlier stage wins ties.

    This model is the one evaluated and registered.
    """
    if not stages.results:
        raise ValueError("no stage finished")
    best = stages.results[0]
    for result in stages.results[1:]:
        if is_better(result.metric(metric), best.metric(metric), metric):
            best = result
    return best


class SweepChoice(BaseModel):
    """The trial that won a sweep, and one row per trial (what the parent run logs)."""

    winner: int
    table: list[dict[str, Any]]


def choose_trial(sweep: list[dict[str, Any]], results: list[TrainedStages], metric: str) -> SweepChoice:
    """The trial whose chosen stage has the best validation metric; an earlier trial wins ties."""
    chosen = [choose_freeze_configuration(stages, metric) for stages in results]
    winner = 0
    for index, best in enumerate(chosen):
        if is_better(best.metric(metric), chosen[winner].metric(metric), metric):
            winner = index
    table = [
        {"trial": i, "overrides": sweep[i], "stage": best.stage, metric: best.metric(metric), "won": i == winner}
        for i, best in enumerate(chosen)
    ]
    return SweepChoice(winner=winner, table=table)
