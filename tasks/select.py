"""Step 4: choose the freeze configuration — the stage with the best validation metric wins."""

from __future__ import annotations

from vggflow.training import StageResult, is_better


def choose_freeze_configuration(results: list[StageResult], metric: str) -> StageResult:
    """The stage with the best validation metric (head-only included); earlier stage wins ties.

    Step 4 of the flow: this model is the one evaluated and registered.
    """
    if not results:
        raise ValueError("no stage finished")
    best = results[0]
    for result in results[1:]:
        if is_better(result.metric(metric), best.metric(metric), metric):
            best = result
    return best


def stage_table(results: list[StageResult], chosen: StageResult) -> list[dict]:
    """All stages side by side (the stage-comparison JSON artifact and the model card's rows)."""
    return [result.summary() | {"chosen": result.stage == chosen.stage} for result in results]
