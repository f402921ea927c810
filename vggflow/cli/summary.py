"""The end-of-run summary that `vggflow train` and `vggflow retrain` print."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vggflow.summary import run_link

if TYPE_CHECKING:
    from vggflow.summary import TrainingSummary


def format_training_summary(summary: TrainingSummary, temporary_prefect_server: bool = False) -> str:
    """The end-of-run summary: a compact table of stages, then the outcome, one line per fact.

    With ``temporary_prefect_server``, a last line says the flow run's Prefect server (its runs,
    logs and artifacts) was this command's own and is gone, and how to keep them.
    """
    freeze = summary.freeze_configuration
    rule = "=" * 78
    lines = ["", rule, f"vggflow train: done   run {summary.run_id}", rule]
    if summary.random_init:
        lines += [
            "WARNING: randomly initialised backbone (no ImageNet weights): a pipeline demonstration,",
            f"         not a useful classifier. ({summary.weights_note})",
        ]
    lines += [
        f"data        {summary.data_version}   matches data.dvc: {_yes_no(summary.data_matches_dvc)}",
        "",
        "    stage       val_acc  val_loss  epochs",
    ]
    for stage in summary.stages:
        chosen = stage["chosen"]
        row = (
            f" {'*' if chosen else ' '}  {stage['stage']:<10}  {stage['best_val_accuracy']:7.4f}  "
            f"{stage['best_val_loss']:8.4f}  {stage['epochs_run']:6d}"
        )
        if chosen:
            row += (
                f"   <- chosen: from {freeze['first_trainable_layer']}, {freeze['trainable_layers']} layers, "
                f"{freeze['trainable_params']:,} params, lr {freeze['learning_rate']:g}"
            )
        lines.append(row)
    for name in summary.skipped_stages:
        lines.append(f"    {name:<10}  {'-':>7}  {'-':>8}  {'-':>6}   skipped: the previous stage did not improve")
    lines += [
        "",
        "test        " + "   ".join(f"{k} {v:.4f}" for k, v in summary.test_metrics.items()),
        f"model       {summary.model_name} v{summary.model_version}   {summary.model_uri}",
        f"promotion   {'PROMOTED to @champion' if summary.decision.promoted else 'not promoted'}: "
        f"{summary.decision.reason}",
        f"reports     {summary.report_dir}",
        f"tracking    {summary.tracking_uri}   experiment {summary.experiment_id}",
        f"dashboard   {run_link(summary)}",
    ]
    if temporary_prefect_server:
        lines.append(
            "prefect     this command's temporary server: its runs and artifacts end with it "
            "(set PREFECT_API_URL to a persistent server to keep them, docs/scheduling.md)"
        )
    return "\n".join(lines)


def _yes_no(value: bool | None) -> str:
    return "unknown" if value is None else ("yes" if value else "NO")
