"""Registered versions and the promotion gate's rule: when a candidate model replaces the champion.

Like TFX's Evaluator "blessing": a candidate passes when it meets absolute thresholds and beats
the current ``@champion`` by at least ``min_delta`` on the primary metric, the champion being
scored on the candidate's own test split. The rule is MLflow's model validation: the thresholds
are ``MetricThreshold``s checked by ``mlflow.validate_evaluation_results`` against the two
models' evaluation results (``vggflow.scoring.mlflow_evaluation``). No I/O: applying the
decision to the registry is the promotion step's job (``tasks/promote.py``).
"""

from __future__ import annotations

from pydantic import BaseModel

from vggflow.config import RegistryConfig
from vggflow.scoring import MLFLOW_METRICS

#: "Beats the champion" means by more than zero; MLflow's ``MetricThreshold`` needs a positive
#: minimum change, and test metrics move in steps of at least 1/(test images).
SMALLEST_IMPROVEMENT = 1e-9


class RegisteredVersion(BaseModel):
    """A registered model version (a reference)."""

    name: str
    version: str
    model_uri: str
    run_id: str


class Decision(BaseModel):
    """The promotion decision, as logged, printed and tagged."""

    promoted: bool
    reason: str
    model_name: str
    candidate_version: str
    champion_version: str | None = None
    primary_metric: str
    candidate_value: float
    champion_value: float | None = None
    delta: float | None = None
    min_delta: float
    thresholds: dict[str, float]
    failed_thresholds: dict[str, float] = {}
    aliases_changed: bool = False


def gate_thresholds(cfg: RegistryConfig, against_champion: bool) -> dict:
    """The gate as MLflow ``MetricThreshold``s, keyed by MLflow's metric names.

    Each ``registry.thresholds`` entry is an absolute minimum; against a champion, the primary
    metric must also improve by at least ``max(min_delta, SMALLEST_IMPROVEMENT)``.
    """
    from mlflow.models import MetricThreshold

    names = set(cfg.thresholds) | ({cfg.primary_metric} if against_champion else set())
    return {
        MLFLOW_METRICS[name]: MetricThreshold(
            threshold=cfg.thresholds.get(name),
            min_absolute_change=(
                max(cfg.min_delta, SMALLEST_IMPROVEMENT) if against_champion and name == cfg.primary_metric else None
            ),
            greater_is_better=True,
        )
        for name in sorted(names)
    }


def passes_gate(candidate: dict[str, float], champion: dict[str, float] | None, cfg: RegistryConfig) -> bool:
    """MLflow's validation of the candidate's metrics against the thresholds and the champion's."""
    import logging

    import mlflow
    from mlflow.models import EvaluationResult
    from mlflow.models.evaluation.validation import ModelValidationFailedException

    def result(metrics: dict[str, float]) -> EvaluationResult:
        return EvaluationResult({MLFLOW_METRICS[k]: v for k, v in metrics.items() if k in MLFLOW_METRICS}, {})

    validation_logger = logging.getLogger("mlflow.models.evaluation.validation")
    level = validation_logger.level
    validation_logger.setLevel(logging.WARNING)  # the decision is printed and logged by the gate
    try:
        mlflow.validate_evaluation_results(
            gate_thresholds(cfg, champion is not None), result(candidate), result(champion) if champion else None
        )
    except ModelValidationFailedException:
        return False
    finally:
        validation_logger.setLevel(level)
    return True


def decide(
    candidate: dict[str, float],
    champion: dict[str, float] | None,
    cfg: RegistryConfig,
    candidate_version: str,
    champion_version: str | None,
) -> Decision:
    """Apply the gate: the verdict is MLflow's validation (:func:`passes_gate`), the reason names the numbers.

    The candidate must meet every threshold; with a champion, it must also improve the primary
    metric by more than zero and by at least ``min_delta`` (a tie keeps the champion).
    """
    metric = cfg.primary_metric
    promoted = passes_gate(candidate, champion, cfg)
    failed = {
        name: candidate.get(name, float("nan"))
        for name, minimum in cfg.thresholds.items()
        if not candidate.get(name, float("nan")) >= minimum
    }
    delta = candidate[metric] - champion[metric] if champion is not None else None
    common = dict(
        model_name=cfg.model_name,
        candidate_version=candidate_version,
        champion_version=champion_version,
        primary_metric=metric,
        candidate_value=candidate[metric],
        champion_value=champion[metric] if champion is not None else None,
        delta=delta,
        min_delta=cfg.min_delta,
        thresholds=dict(cfg.thresholds),
        failed_thresholds=failed,
    )
    if promoted and champion is None:
        met = ", ".join(f"{name} {candidate.get(name, float('nan')):.4f} ≥ {m}" for name, m in cfg.thresholds.items())
        reason = f"no champion yet; thresholds met ({met or 'none set'})"
    elif promoted:
        reason = (
            f"beats champion v{champion_version} on {metric}: {candidate[metric]:.4f} vs {champion[metric]:.4f} "
            f"(Δ {delta:+.4f} ≥ {cfg.min_delta})"
        )
    elif failed:
        below = ", ".join(f"{name} {value:.4f} < {cfg.thresholds[name]}" for name, value in failed.items())
        reason = f"below the absolute threshold(s): {below}" + (" (no champion yet)" if champion is None else "")
    else:
        reason = (
            f"does not beat champion v{champion_version} on {metric}: {candidate[metric]:.4f} vs "
            f"{champion[metric]:.4f} (Δ {delta:+.4f}, needs > 0 and ≥ {cfg.min_delta}), same test split"
        )
    return Decision(promoted=promoted, reason=reason, **common)
