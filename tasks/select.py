"""Step 5, choose: the freeze configuration whose stage has the best validation metric wins."""

from __future__ import annotations

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
