"""Per-run report artifacts: figures, the per-class table and the model card.

- :mod:`vggflow.reports.evaluation_figures`: the test split's confusion matrix, per-class table and
  chart, and the grid of the most confident mistakes.
- :mod:`vggflow.reports.stage_figures`: learning curves and the stage comparison.
- :mod:`vggflow.reports.figures`: what both draw with (palette, headless figures, atomic PNG writes).
- :mod:`vggflow.reports.model_card`: the model card, rendered from a Jinja2 template
  (``templates/model_card.md.j2``) that a user can copy and change.

Nothing here imports TensorFlow, Prefect or MLflow; matplotlib and Jinja2 are imported when
something is drawn or rendered.
"""
