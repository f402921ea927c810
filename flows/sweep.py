"""A sweep: several head and/or stage configurations trained side by side, the best one kept.

Each ``sweep`` item (config key, or ``vggflow train --sweep KEY=[V1, V2]``) is a trial: the head
step and the fine-tuning step (``tasks/train_head.py``, ``tasks/finetune.py``, unchanged) with
that item's values, inside a nested MLflow run of its own, as one task run. With
``features.executor: dask`` the trials run on the Dask cluster's workers (a ``prefect_dask``
task runner: hence this subflow), against the cached features, which every worker must reach
(the cache folder on a shared path, as for a local cluster); otherwise one after another here.
The trial whose chosen stage has the best validation metric wins (the earlier one on a tie);
its stages go on to evaluation and the promotion gate as a single configuration's would.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from vggflow.config import Config
from vggflow.executors import dask_task_runner
from vggflow.feature_cache import FeatureSet
from vggflow.runs import TrainingRun, mlflow_client, trial_run
from vggflow.tasks.finetune import finetune
from vggflow.tasks.select import choose_freeze_configuration, choose_trial
from vggflow.tasks.track import log_sweep_task
from vggflow.tasks.train_head import train_head
from vggflow.training import TrainedStages


@task(name="sweep-trial", task_run_name="trial-{index}", cache_policy=NO_CACHE)
def trial_task(
    index: int, overrides: dict[str, Any], cfg: Config, weights, features: FeatureSet, run: TrainingRun
) -> TrainedStages:
    """One configuration: the head, then the stages, in the trial's nested run (on a worker, or here)."""
    import mlflow

    mlflow.set_tracking_uri(run.tracking_uri)  # a worker process has its own MLflow state
    metric = cfg.finetune.selection_metric
    with trial_run(run, index, overrides) as trial:
        head = train_head(cfg, weights, features, trial)
        stages = finetune(cfg, features, head, trial)
        best = choose_freeze_configuration(stages, metric)
        client = mlflow_client()
        client.log_metric(trial.run_id, f"best_{metric}", best.metric(metric))
        client.set_tag(trial.run_id, "vggflow.chosen_stage", best.stage)
    return stages


@flow(name="vggflow-sweep", log_prints=True, validate_parameters=False)
def sweep_flow(
    sweep: list[dict[str, Any]], trials: list[Config], weights, features: FeatureSet, run: TrainingRun
) -> list[TrainedStages]:
    """Every trial as a task run on the flow's task runner; their stages, in trial order."""
    futures = [
        trial_task.submit(index, overrides, trial, weights, features, run)
        for index, (overrides, trial) in enumerate(zip(sweep, trials, strict=True))
    ]
    return [future.result() for future in futures]


def train_sweep(cfg: Config, weights, features: FeatureSet, run: TrainingRun) -> TrainedStages:
    """Train every ``cfg.sweep`` configuration (on the cluster with ``features.executor: dask``); the winner's stages.

    The parent run records every trial (``sweep/trials.json``) and which one won.
    """
    cfg = cfg.with_absolute_paths()  # workers may have another working directory
    features, weights = features.with_absolute_paths(), weights.with_absolute_path()
    runner = dask_task_runner(cfg.features) if cfg.features.executor == "dask" else ThreadPoolTaskRunner(max_workers=1)
    results = sweep_flow.with_options(task_runner=runner)(cfg.sweep, cfg.trial_configs(), weights, features, run)
    choice = choose_trial(cfg.sweep, results, cfg.finetune.selection_metric)
    log_sweep_task(run, cfg.features.executor, cfg.finetune.selection_metric, choice.table, choice.winner)
    return results[choice.winner]
