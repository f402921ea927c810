"""Registered versions and the promotion gate's rule: when a candidate model replaces the champion.

Like TFX's Evaluator "blessing": a candidate passes when it meets absolute thresholds and beats
the current ``@champion`` by at least ``min_delta`` on the primary metric, the champion being
scored on the candidate's own test split. Pure: applying the decision to the registry is the
promotion step's job (``tasks/promote.py``).
"""

from __future__ import annotations

from pydantic import BaseModel

from vggflow.config import RegistryConfig


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


def decide(
    candidate: dict[str, float],
    champion: dict[str, float] | None,
    cfg: RegistryConfig,
    candidate_version: str,
    champion_version: str | None,
) -> Decision:
    """Apply the gate (pure).

    The candidate must meet every threshold; with a champion, it must also improve the primary
    metric by more than zero and by at least ``min_delta`` (a tie keeps the champion).
    """
    metric = cfg.primary_metric
    failed = {
        name: candidate.get(name, float("nan"))
        for name, minimum in cfg.thresholds.items()
        if not candidate.get(name, float("nan")) >= minimum
    }
    thresholds_text = ", ".join(
        f"{name} {candidate.get(name, float('nan')):.4f} ≥ {minimum}" for name, minimum in cfg.thresholds.items()
    )
    common = dict(
        model_name=cfg.model_name,
        candidate_version=candidate_version,
        champion_version=champion_version,
        primary_metric=metric,
        candidate_value=candidate[metric],
        min_delta=cfg.min_delta,
        thresholds=dict(cfg.thresholds),
        failed_thresholds=failed,
    )
    if failed:
        below = ", ".join(f"{name} {value:.4f} < {cfg.thresholds[name]}" for name, value in failed.items())
        reason = f"below the absolute threshold(s): {below}"
        if champion is not None:
            delta = candidate[metric] - champion[metric]
            return Decision(promoted=False, reason=reason, champion_value=champion[metric], delta=delta, **common)
        return Decision(promoted=False, reason=reason + " (no champion yet)", **common)
    if champion is None:
        return Decision(
            promoted=True, reason=f"no champion yet; thresholds met ({thresholds_text or 'none set'})", **common
        )
    delta = candidate[metric] - champion[metric]
    if delta > 0 and delta >= cfg.min_delta:
        reason = (
            f"beats champion v{champion_version} on {metric}: {candidate[metric]:.4f} vs {champion[metric]:.4f} "
            f"(Δ {delta:+.4f} ≥ {cfg.min_delta})"
        )
        return Decision(promoted=True, reason=reason, champion_value=champion[metric], delta=delta, **common)
    reason = (
        f"does not beat champion v{champion_version} on {metric}: {candidate[metric]:.4f} vs {champion[metric]:.4f} "
        f"(Δ {delta:+.4f}, needs > 0 and ≥ {cfg.min_delta}), same test split"
    )
    return Decision(promoted=False, reason=reason, champion_value=champion[metric], delta=delta, **common)
