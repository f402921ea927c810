"""The training flow: the pipeline's DAG, one call per step (each step is a module in ``tasks/``)."""

from __future__ import annotations

from prefect import flow

from vggflow.config import load_config
from vggflow.config_tree import sweep_grid
from vggflow.flows.extract import extract_features, extract_test_prefix
from vggflow.flows.sweep import train_sweep
from vggflow.runs import closed_on_exit
from vggflow.summary import TrainingSummary, summarize
from vggflow.tasks.evaluate import evaluate_task
from vggflow.tasks.finetune import finetune
from vggflow.tasks.model_card import model_card_task
from vggflow.tasks.preflight import preflight_task
from vggflow.tasks.promote import promote_if_better_task
from vggflow.tasks.publish import publish_artifacts_task
from vggflow.tasks.register import log_model_task, register_task
from vggflow.tasks.select import choose_freeze_configuration
from vggflow.tasks.track import log_results_task, start_run_task
from vggflow.tasks.train_head import train_head
from vggflow.tasks.validate import validate_data


@flow(name="vggflow-train", log_prints=True)
def train_flow(
    config_file: str | None = None,
    overrides: list[str] | None = None,
    data_dir: str | None = None,
    promote: bool | None = None,
    sweep: list[str] | None = None,
) -> TrainingSummary:
    """Validate the data, train and fine-tune a VGG19 classifier, evaluate, log, register and (maybe) promote it.

    Args:
        config_file: YAML config (None: built-in defaults).
        overrides: ``section.key=value`` overrides, as ``--set``.
        data_dir: folder of labelled images (overrides ``data.dir``).
        promote: False registers without moving aliases (overrides ``registry.promote``).
        sweep: ``KEY=[V1, V2]`` axes, as ``--sweep``: every combination is a configuration (overrides ``sweep``).
    """
    values = {"data.dir": data_dir, "registry.promote": promote, "sweep": sweep_grid(sweep) if sweep else None}
    cfg = load_config(config_file, overrides or [], values=values)
    ready = preflight_task(cfg)
    validated = validate_data(cfg)
    run = start_run_task(cfg, config_file, ready, validated)
    with closed_on_exit(run.run_id):
        features = extract_features(cfg, ready.weights, validated)  # on a Dask cluster with features.executor: dask
        if cfg.sweep:  # several head/stage configurations, the best on validation data (on the cluster with dask)
            stages = train_sweep(cfg, ready.weights, features, run)
        else:
            head = train_head(cfg, ready.weights, features, run)
            stages = finetune(cfg, features, head, run)
        chosen = choose_freeze_configuration(stages, cfg.finetune.selection_metric)
        extract_test_prefix(cfg, ready.weights, validated, features, chosen)  # likewise; locally, evaluate does it
        evaluation = evaluate_task(cfg, ready.weights, validated, features, chosen, run)
        log_results_task(cfg, run, features, stages, chosen, evaluation)
        model_uri = log_model_task(cfg, run, chosen, validated)
        version = register_task(cfg, run, model_uri, chosen, evaluation)
        decision = promote_if_better_task(cfg, run, version, evaluation, validated)
        summary = summarize(run, validated, ready.weights, stages, chosen, evaluation, version, decision)
        model_card_task(cfg, summary, validated, evaluation)
        publish_artifacts_task(summary)
    return summary
